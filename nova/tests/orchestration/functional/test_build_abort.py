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

"""An operator aborts a build: the server ends ERROR and holds nothing."""

import io
import time
from unittest import mock

from nova.cmd import manage
from nova.orchestration.flows import boot as build_flows
from nova.orchestration import states
from nova.tests import fixtures as nova_fixtures
from nova.tests.orchestration.functional import test_build
from nova.virt import fake


class AbortBuildTest(test_build.BuildFlowTestBase):

    def _abort_while_spawning(self, server):
        """Post the server; abort its build while its host spawns it."""
        spawning = []
        real_spawn = fake.FakeDriver.spawn

        def spawn(driver, *args, **kwargs):
            spawning.append(driver)
            # Polled with time.sleep, which yields under eventlet too.
            for _ in range(300):
                if not spawning:
                    break
                time.sleep(0.1)
            return real_spawn(driver, *args, **kwargs)

        self.stub_out('nova.virt.fake.FakeDriver.spawn', spawn)
        server = self.api.post_server({'server': server})
        self._wait_for_assert(lambda: self.assertEqual(1, len(spawning)))
        host = spawning[0]
        with mock.patch('sys.stdout', new=io.StringIO()) as output:
            self.assertEqual(0, manage.OrchestrationCommands().abort(
                build_flows.instance_flow_uuid(server['id'])))
        self.assertIn('will be reverted', output.getvalue())
        spawning.clear()

        server = self._wait_for_state_change(server, 'ERROR')
        flows = self._ended_flows(server['id'])
        self.assertEqual(states.REVERTED,
                         flows[build_flows.INSTANCE_KIND].state)
        self.assertEqual('aborted by operator', server['fault']['message'])
        self.assertIsNone(server['OS-EXT-SRV-ATTR:host'])
        # The host built the guest and undid it.
        self.assertEqual([], host.list_instance_uuids())
        self._assert_nothing_leaked(server['id'])
        return server

    def test_abort_during_spawn(self):
        port = self.neutron.port_1
        server = self._abort_while_spawning(self._build_server(
            networks=[{'port': port['id']}]))
        self.assertEqual('', self.neutron.show_port(
            port['id'])['port']['device_id'])
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])

    def test_abort_during_spawn_from_volume(self):
        volume = nova_fixtures.CinderFixture.IMAGE_BACKED_VOL
        server = self._build_server(networks='none')
        server['imageRef'] = ''
        server['block_device_mapping_v2'] = [{
            'boot_index': 0, 'uuid': volume, 'source_type': 'volume',
            'destination_type': 'volume'}]
        server = self._abort_while_spawning(server)
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])
