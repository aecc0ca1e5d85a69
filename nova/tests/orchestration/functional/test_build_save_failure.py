#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
#    WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
#    License for the specific language governing permissions and limitations
#    under the License.

"""A host that cannot save the instance it spawned destroys its guest."""

import oslo_messaging as messaging

from nova.compute import task_states
from nova import objects
from nova.tests.orchestration.functional import test_build


class SaveAfterSpawnFailsTest(test_build.BuildFlowTestBase):

    def test_guest_destroyed_and_build_rescheduled(self):
        # The conductor serving the save of the spawned instance dies: the
        # host gets a messaging error, while its guest runs.
        failed = []
        real_save = objects.Instance.save

        def save(instance, *args, **kwargs):
            if (kwargs.get('expected_task_state') == task_states.SPAWNING and
                    not failed):
                failed.append(instance.host)
                raise messaging.MessagingTimeout()
            return real_save(instance, *args, **kwargs)

        self.stub_out('nova.objects.Instance.save', save)
        server = self._create_server(
            networks=[{'uuid': self.neutron.network_1['id']}])
        self.assertEqual(1, len(failed))
        other = ({'compute', 'host2'} - set(failed)).pop()
        # Not shown ACTIVE while rescheduled: ACTIVE on the other host.
        self.assertEqual(other, server['OS-EXT-SRV-ATTR:host'])

        # No guest is left on the host that could not save it.
        self.assertNotIn(server['id'],
                         self.computes[failed[0]].driver.list_instance_uuids())
        self.assertEqual(
            1, len(self._get_allocations_by_server_uuid(server['id'])))
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])
        for host in ('compute', 'host2'):
            self.assertNotIn(server['id'],
                             self.computes[host].driver.list_instance_uuids())
