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

"""The compute host building a server dies mid-build and restarts.

The host dies at each point of its build: before it started the build
(its first save), right before the resource claim (the build has marked
the instance as awaited), right after it, once the ports are bound,
once the volumes are attached and once the guest is spawned but before
the instance is ACTIVE. From that point on its build runs none of its
code, clean-up included, as its process is gone. The conductor waiting
for the build gets no reply (the call times out); the host's service
restarts with the same hypervisor; the conductor asks again. Every case
that died before the build started, or once it claimed resources, must
end with the server ACTIVE, a single guest, the allocations of one host,
and nothing left once it is deleted. A build that died after its start
but before its claim is set ERROR by the restarted host, as before build
flows (nova's
``test_restart_compute_while_instance_waiting_for_resource_claim``, bug
1833581), and nothing is left once the server is deleted.

The server boots from a volume with a port, so that every point leaves
something behind a restarted host must not duplicate or leak.
"""

import threading

import ddt
import oslo_messaging as messaging

from nova.compute import claims
from nova.compute import manager as compute_manager
from nova.compute import resource_tracker
from nova.compute import rpcapi as compute_rpcapi
from nova.orchestration.flows import boot as build_flows
from nova.orchestration import states
from nova.tests import fixtures as nova_fixtures
from nova.tests.orchestration.functional import test_build
from nova.virt import fake

WAIT = 30


class ComputeDied(BaseException):
    """The process of the compute service building the server is gone."""


@ddt.ddt
class ComputeCrashMatrixTest(test_build.BuildFlowTestBase):
    # The compute's build dies, not its RPC handler: the conductor's call
    # must not wait for the handler's reply.
    CAST_AS_CALL = False

    def setUp(self):
        super().setUp()
        self.point = None
        self.died = threading.Event()
        self.restarted = threading.Event()
        self.dead_host = None
        self.guests_at_spawn = []
        self.called = False
        self.stub_out(
            'nova.orchestration.flows.boot.host.HOST_RETRY_INTERVAL', 0.1)
        # A test that fails before the restart does not leave its flow
        # asking the host until the test times out.
        self.flags(host_restart_timeout=2 * WAIT, group='orchestration')
        self.addCleanup(self.restarted.set)
        self._die_at_the_point()
        self._lose_the_reply()
        self._run_no_clean_up_when_dying()

    def _wait_for(self, event):
        # Polled with time.sleep, which yields under eventlet too.
        self._wait_for_assert(lambda: self.assertTrue(event.is_set()),
                              max_retries=WAIT * 10, sleep=0.1)

    def _die(self, manager):
        self.dead_host = manager.host
        raise ComputeDied()

    def _die_at_the_point(self):
        """Stub the compute manager so that its build dies at the point."""
        mgr = compute_manager.ComputeManager
        mgr_path = 'nova.compute.manager.ComputeManager.'
        real_claim = resource_tracker.ResourceTracker.instance_claim
        real_build_resources = mgr._build_resources
        real_networks = mgr._build_networks_for_instance
        real_prep = mgr._prep_block_device
        real_spawn = fake.FakeDriver.spawn
        real_build = mgr._do_build_and_run_instance

        def dying(point):
            return self.point == point and not self.died.is_set()

        def instance_claim(rt, *args, **kwargs):
            if dying('unclaimed'):
                self.dead_host = rt.host
                raise ComputeDied()
            return real_claim(rt, *args, **kwargs)

        def build_resources(mgr, *args, **kwargs):
            if dying('claimed'):
                self._die(mgr)
            return real_build_resources(mgr, *args, **kwargs)

        def networks(mgr, *args, **kwargs):
            network_info = real_networks(mgr, *args, **kwargs)
            if dying('ports-bound'):
                network_info.wait(do_raise=True)
                self._die(mgr)
            return network_info

        def prep_block_device(mgr, *args, **kwargs):
            block_device_info = real_prep(mgr, *args, **kwargs)
            if dying('volumes-attached'):
                self._die(mgr)
            return block_device_info

        def spawn(driver, context, instance, *args, **kwargs):
            self.guests_at_spawn.append(instance.uuid in driver.instances)
            real_spawn(driver, context, instance, *args, **kwargs)
            if dying('spawned'):
                self.dead_host = instance.host
                raise ComputeDied()

        def do_build(mgr, *args, **kwargs):
            try:
                if dying('not-started'):
                    self._die(mgr)
                return real_build(mgr, *args, **kwargs)
            except ComputeDied:
                # Nothing after this point ran in the dead process; what
                # follows only ends the test's thread quietly.
                self.died.set()

        self.stub_out('nova.compute.resource_tracker.ResourceTracker.'
                      'instance_claim', instance_claim)
        self.stub_out(mgr_path + '_build_resources', build_resources)
        self.stub_out(mgr_path + '_build_networks_for_instance', networks)
        self.stub_out(mgr_path + '_prep_block_device', prep_block_device)
        self.stub_out('nova.virt.fake.FakeDriver.spawn', spawn)
        self.stub_out(mgr_path + '_do_build_and_run_instance', do_build)

    def _lose_the_reply(self):
        """The first call reaches the host; its reply never comes back."""
        real = compute_rpcapi.ComputeAPI.build_and_run_instance

        def build_and_run_instance(rpcapi, ctxt, instance, host, **kwargs):
            if self.restarted.is_set() or not kwargs.get('wait'):
                return real(rpcapi, ctxt, instance, host, **kwargs)
            if not self.called:
                self.called = True
                cctxt = rpcapi.router.client(ctxt).prepare(server=host,
                                                           version='6.6')
                limits = kwargs.pop('limits')
                cctxt.cast(ctxt, 'build_and_run_instance', instance=instance,
                           limits=limits.to_dict() if limits else None,
                           **kwargs)
            # The call monitor notices the host stopped answering; asked
            # again before it restarted, it does not answer either.
            raise messaging.MessagingTimeout()

        self.stub_out('nova.compute.rpcapi.ComputeAPI.build_and_run_instance',
                      build_and_run_instance)

    def _run_no_clean_up_when_dying(self):
        """A dead process does not abort its resource claim."""
        real_exit = claims.Claim.__exit__

        def claim_exit(claim, exc_type, exc_value, exc_tb):
            if exc_type is ComputeDied:
                return False
            return real_exit(claim, exc_type, exc_value, exc_tb)

        self.stub_out('nova.compute.claims.Claim.__exit__', claim_exit)

    def _boot_from_volume_with_a_port(self):
        server = self._build_server(
            networks=[{'port': self.neutron.port_1['id']}])
        server['imageRef'] = ''
        server['block_device_mapping_v2'] = [{
            'boot_index': 0,
            'uuid': nova_fixtures.CinderFixture.IMAGE_BACKED_VOL,
            'source_type': 'volume', 'destination_type': 'volume'}]
        return self.api.post_server({'server': server})

    def test_compute_dies_before_its_build_claims(self):
        self.point = 'unclaimed'
        server = self._boot_from_volume_with_a_port()
        self._wait_for(self.died)

        host = self.computes[self.dead_host]
        self.computes[self.dead_host] = self.restart_compute_service(host)
        self.restarted.set()

        # Without a fault, as before build flows.
        server = self._wait_for_state_change(server, 'ERROR',
                                             wait_for_fault_key=False)
        # Asked again, the host reports the instance in ERROR.
        flows = self._ended_flows(server['id'])
        self.assertEqual(
            {build_flows.REQUEST_KIND: states.SUCCESS,
             build_flows.INSTANCE_KIND: states.REVERTED},
            {kind: row.state for kind, row in flows.items()})
        self.assertEqual([], self.guests_at_spawn)
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])

    @ddt.data('not-started', 'claimed', 'ports-bound', 'volumes-attached',
              'spawned')
    def test_compute_dies_and_restarts(self, point):
        self.point = point
        server = self._boot_from_volume_with_a_port()
        self._wait_for(self.died)

        # The host's service restarts on the same hypervisor: it leaves
        # the instance in BUILD, to the flow that waits for it.
        host = self.computes[self.dead_host]
        self.computes[self.dead_host] = self.restart_compute_service(host)
        self.assertEqual(
            'BUILD', self.api.get_server(server['id'])['status'])
        self.restarted.set()

        server = self._wait_for_state_change(server, 'ACTIVE')
        self.assertEqual(self.dead_host, server['OS-EXT-SRV-ATTR:host'])
        self._wait_for_assert(lambda: self.assertEqual(
            {states.SUCCESS},
            {row.state for row in self._flows(server['id']).values()}))
        # A guest is never spawned beside another of the same server.
        self.assertNotIn(True, self.guests_at_spawn)
        self.assertEqual(
            1, len(self._get_allocations_by_server_uuid(server['id'])))
        self.assertEqual(
            [self.neutron.port_1['id']],
            [port['id'] for port in self.neutron.list_ports(
                True, device_id=server['id'])['ports']])
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])
