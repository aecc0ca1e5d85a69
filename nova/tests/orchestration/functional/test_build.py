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

"""Servers booted through the REST API and the build flows.

These run on nova's functional fixtures (placement, neutron, glance, the
fake virt driver) with a conductor and a compute service.
"""

import time
from unittest import mock

import oslo_messaging as messaging

from nova.compute import build_results
from nova.compute import rpcapi as compute_rpcapi
from nova import context as nova_context
from nova.db.main import api as main_db_api
from nova import exception
from nova import objects
from nova.orchestration.flows import boot as build_flows
from nova.orchestration import persistence
from nova.orchestration import states
from nova.tests import fixtures as nova_fixtures
from nova.tests.functional import integrated_helpers
from nova.tests.orchestration.unit import helpers
from nova.virt import fake


class BuildFlowTestBase(integrated_helpers._IntegratedTestBase):
    """A conductor, two compute hosts and the leak checks."""

    api_major_version = 'v2.1'
    microversion = 'latest'

    def setUp(self):
        self.flags(compute_driver='fake.MediumFakeDriver')
        super().setUp()
        self.ctxt = nova_context.get_admin_context()
        self.engine = self.conductor.manager.compute_task_mgr.orchestration
        self._start_compute('host2')

    def _assert_nothing_leaked(self, server_id):
        """No allocation, bound port or volume attachment is left."""
        self.assertEqual({}, self._get_allocations_by_server_uuid(server_id))
        self.assertEqual(
            [], self.neutron.list_ports(True, device_id=server_id)['ports'])
        self.assertEqual(
            [], [vol for vol, attachments in
                 self.cinder.volume_to_attachment.items()
                 if any(a['instance_uuid'] == server_id
                        for a in attachments.values())])

    def _boot_and_delete(self, **kwargs):
        server = self._create_server(**kwargs)
        self.assertEqual(
            {states.SUCCESS},
            {row.state for row in self._ended_flows(server['id']).values()})
        allocations = self._get_allocations_by_server_uuid(server['id'])
        self.assertEqual(1, len(allocations))
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])
        return server

    def _take_over(self, server_id):
        """A second conductor takes the server's flows over.

        The first conductor is gone: its service is stopped, the leases of
        the server's active flows are expired and the second conductor's
        sweep resumes them.
        """
        self.conductor.stop()
        second = self.start_service('conductor').manager.compute_task_mgr
        for row in persistence.flows_of_instance(self.ctxt, server_id):
            if row.state in states.ACTIVE:
                helpers.expire_lease(self.ctxt, row.uuid)
        for future in second.orchestration.sweep(
                nova_context.get_admin_context()):
            future.result()

    def _flows(self, server_id):
        return {row.kind: row for row in
                persistence.flows_of_instance(self.ctxt, server_id)}

    def _ended_flows(self, server_id):
        """The server's flows once they ended.

        The host sets the instance ACTIVE before the flow waiting for its
        build records the outcome.
        """
        def ended():
            flows = self._flows(server_id)
            self.assertTrue(all(row.state in states.FINISHED
                                for row in flows.values()), flows)
            return flows
        return self._wait_for_assert(ended)

    def _stages(self, flow_uuid):
        _, stages = persistence.load(self.ctxt, flow_uuid)
        return [(stage.name, stage.state) for stage in stages]

    def _create_action(self, server_id):
        """The create action of a server, with its events in order."""
        action = next(a for a in self.admin_api.get_instance_actions(
            server_id) if a['action'] == 'create')
        action = self.admin_api.get_instance_action_details(
            server_id, action['request_id'])
        action['events'].sort(key=lambda e: e['start_time'])
        return action


class BuildFlowTest(BuildFlowTestBase):

    def test_boot_runs_both_flows_to_success(self):
        server = self._create_server(networks='none')

        flows = self._ended_flows(server['id'])
        self.assertEqual(
            {build_flows.REQUEST_KIND: states.SUCCESS,
             build_flows.INSTANCE_KIND: states.SUCCESS},
            {kind: row.state for kind, row in flows.items()})
        self.assertEqual(
            [('create-instance', 'SUCCESS'), ('record-instance', 'SUCCESS'),
             ('delete-build-request', 'SUCCESS'), ('choose-host', 'SUCCESS'),
             ('accelerators', 'SUCCESS'), ('build-on-host', 'SUCCESS')],
            self._stages(flows[build_flows.INSTANCE_KIND].uuid))
        # nova-api stored the request's flow; the conductor ran it.
        self.assertEqual(self.engine.owner,
                         flows[build_flows.REQUEST_KIND].owner)
        # The host stage shows up as an event of the create action, around
        # the host's build, and the action succeeded. The accelerators
        # stage had nothing to do and is not reported.
        action = self._create_action(server['id'])
        self.assertIsNone(action['message'])
        self.assertEqual(
            [('conductor_build_on_host', 'Success'),
             ('compute__do_build_and_run_instance', 'Success')],
            [(e['event'], e['result']) for e in action['events']])

    def test_boot_with_a_port_and_delete(self):
        port = self.neutron.port_1
        self._boot_and_delete(networks=[{'port': port['id']}])
        self.assertEqual('', self.neutron.show_port(
            port['id'])['port']['device_id'])

    def test_boot_from_volume_and_delete(self):
        volume = nova_fixtures.CinderFixture.IMAGE_BACKED_VOL
        server = self._build_server(networks='none')
        server['imageRef'] = ''
        server['block_device_mapping_v2'] = [{
            'boot_index': 0, 'uuid': volume, 'source_type': 'volume',
            'destination_type': 'volume'}]
        server = self.api.post_server({'server': server})
        server = self._wait_for_state_change(server, 'ACTIVE')
        self.assertEqual([volume], [
            v['id'] for v in server['os-extended-volumes:volumes_attached']])
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])

    def test_multi_create(self):
        server = self._build_server(networks='none')
        server['min_count'] = 3
        server['return_reservation_id'] = True
        reservation = self.api.post_server({'server': server})
        servers = self.api.get_servers(
            search_opts={'reservation_id': reservation['reservation_id']})
        self.assertEqual(3, len(servers))
        request_flows = []
        for server in servers:
            self._wait_for_state_change(server, 'ACTIVE')
            flows = self._ended_flows(server['id'])
            self.assertEqual(states.SUCCESS,
                             flows[build_flows.INSTANCE_KIND].state)
            if build_flows.REQUEST_KIND in flows:
                request_flows.append(flows[build_flows.REQUEST_KIND])
        # One flow scheduled the three of them.
        self.assertEqual([states.SUCCESS],
                         [flow.state for flow in request_flows])
        for server in servers:
            self._delete_server(server)
            self._assert_nothing_leaked(server['id'])

    def test_reschedule_to_an_alternate(self):
        spawned = []
        real_spawn = fake.FakeDriver.spawn

        def spawn(driver, context, instance, *args, **kwargs):
            spawned.append(instance.host)
            if len(spawned) == 1:
                raise exception.ComputeResourcesUnavailable(reason='test')
            return real_spawn(driver, context, instance, *args, **kwargs)

        self.stub_out('nova.virt.fake.FakeDriver.spawn', spawn)
        server = self._create_server(networks='none')

        self.assertEqual(2, len(spawned))
        self.assertNotEqual(spawned[0], spawned[1])
        self.assertEqual(spawned[1], server['OS-EXT-SRV-ATTR:host'])
        # Each attempt is an event; a reschedule is no error of the action.
        # The host sets the server ACTIVE before the stage's event ends.
        self._ended_flows(server['id'])
        action = self._create_action(server['id'])
        self.assertIsNone(action['message'])
        self.assertEqual(
            {'Success'}, {e['result'] for e in action['events']
                          if e['event'].startswith('conductor_')})
        self.assertEqual(
            ['conductor_build_on_host', 'conductor_build_on_host_2'],
            [e['event'] for e in action['events']
             if e['event'].startswith('conductor_')])
        # The flow rescheduled: no build_instances round trip.
        flow = self._flows(server['id'])[build_flows.INSTANCE_KIND]
        self.assertEqual(
            [('choose-host', 'SUCCESS'), ('choose-host', 'SUCCESS'),
             ('accelerators', 'REVERTED'), ('accelerators', 'SUCCESS'),
             ('build-on-host', 'REVERTED'), ('build-on-host', 'SUCCESS')],
            self._stages(flow.uuid)[3:])
        allocations = self._get_allocations_by_server_uuid(server['id'])
        self.assertEqual(
            [self._get_provider_uuid_by_host(
                server['OS-EXT-SRV-ATTR:hypervisor_hostname'])],
            list(allocations))
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])

    def test_exhausted_alternates_end_in_error(self):
        self.stub_out('nova.virt.fake.FakeDriver.spawn', mock.Mock(
            side_effect=exception.ComputeResourcesUnavailable(
                reason='test')))
        server = self._create_server(networks='none', expected_state='ERROR')
        self.assertIn('Exceeded maximum number of retries',
                      server['fault']['message'])
        self._assert_nothing_leaked(server['id'])
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])

    def _fail_first_spawn_and_force_down(self, alternates):
        """The first spawn fails reschedulably, once the given alternates
        (by index in the flow's selections) are forced down.

        Returns the hosts spawned on, and the hosts forced down.
        """
        spawned, down = [], []
        real_spawn = fake.FakeDriver.spawn

        def spawn(driver, context, instance, *args, **kwargs):
            spawned.append(instance.host)
            if len(spawned) > 1:
                return real_spawn(driver, context, instance, *args, **kwargs)
            flow = self._flows(instance.uuid)[build_flows.INSTANCE_KIND]
            selections = persistence.decode(flow.inputs)['selections']
            for index in alternates:
                host = objects.Selection.obj_from_primitive(
                    selections[index]).service_host
                service = objects.Service.get_by_compute_host(
                    self.ctxt, host)
                service.forced_down = True
                service.save()
                down.append(host)
            raise exception.ComputeResourcesUnavailable(reason='test')

        self.stub_out('nova.virt.fake.FakeDriver.spawn', spawn)
        return spawned, down

    def test_alternate_found_down_is_skipped(self):
        self._start_compute('host3')
        spawned, down = self._fail_first_spawn_and_force_down([1])

        server = self._create_server(networks='none')

        # The alternate forced down was not asked: the next one built.
        self.assertEqual(2, len(spawned))
        self.assertNotIn(server['OS-EXT-SRV-ATTR:host'], down + spawned[:1])
        self.assertEqual(spawned[1], server['OS-EXT-SRV-ATTR:host'])
        self._ended_flows(server['id'])
        flow = self._flows(server['id'])[build_flows.INSTANCE_KIND]
        self.assertEqual(
            [('build-on-host', 'REVERTED'), ('build-on-host', 'REVERTED'),
             ('build-on-host', 'SUCCESS')],
            [s for s in self._stages(flow.uuid) if s[0] == 'build-on-host'])
        # No event failed: a host found down is a reschedule.
        self.assertIsNone(self._create_action(server['id'])['message'])
        # Only the building host holds an allocation.
        self.assertEqual(
            [self._get_provider_uuid_by_host(
                server['OS-EXT-SRV-ATTR:hypervisor_hostname'])],
            list(self._get_allocations_by_server_uuid(server['id'])))
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])

    def test_alternates_all_down_end_in_error(self):
        spawned, down = self._fail_first_spawn_and_force_down([1])

        server = self._create_server(networks='none', expected_state='ERROR')

        self.assertEqual(1, len(spawned))
        self.assertEqual(1, len(down))
        self.assertIn('Exceeded maximum number of retries',
                      server['fault']['message'])
        # The claim made for the host found down was released.
        self._assert_nothing_leaked(server['id'])
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])

    def test_host_giving_no_outcome_is_replaced_and_fenced(self):
        # The call to the selected host is lost: the conductor gives up on
        # that host and builds on the alternate. The lost call, delivered
        # to the host once the server is ACTIVE, builds nothing and
        # releases nothing.
        self.flags(host_restart_timeout=0, group='orchestration')
        lost = []
        real_call = compute_rpcapi.ComputeAPI.build_and_run_instance

        def build_and_run_instance(api, ctxt, **kwargs):
            if kwargs.get('wait') and not lost:
                lost.append((api, ctxt, kwargs))
                raise messaging.MessagingTimeout('lost')
            return real_call(api, ctxt, **kwargs)

        self.stub_out('nova.compute.rpcapi.ComputeAPI.build_and_run_instance',
                      build_and_run_instance)
        server = self._create_server(networks='none')

        api, ctxt, kwargs = lost[0]
        first_host = kwargs['host']
        self.assertNotEqual(first_host, server['OS-EXT-SRV-ATTR:host'])
        self._ended_flows(server['id'])
        flow = self._flows(server['id'])[build_flows.INSTANCE_KIND]
        self.assertEqual(
            [('build-on-host', 'REVERTED'), ('build-on-host', 'SUCCESS')],
            [s for s in self._stages(flow.uuid) if s[0] == 'build-on-host'])
        self.assertIsNone(self._create_action(server['id'])['message'])
        allocations = [self._get_provider_uuid_by_host(
            server['OS-EXT-SRV-ATTR:hypervisor_hostname'])]
        self.assertEqual(
            allocations,
            list(self._get_allocations_by_server_uuid(server['id'])))

        outcome = real_call(api, ctxt, **kwargs)

        self.assertEqual(build_results.NOT_TAKEN, outcome['result'])
        self.assertNotIn(server['id'],
                         self.computes[first_host].driver.instances)
        server = self.api.get_server(server['id'])
        self.assertEqual('ACTIVE', server['status'])
        self.assertEqual(
            allocations,
            list(self._get_allocations_by_server_uuid(server['id'])))
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])

    def test_build_failure_ends_in_error(self):
        self.flags(max_attempts=1, group='scheduler')
        self.stub_out('nova.virt.fake.FakeDriver.spawn', mock.Mock(
            side_effect=exception.ComputeResourcesUnavailable(
                reason='test')))
        server = self._create_server(networks='none', expected_state='ERROR')
        self._assert_nothing_leaked(server['id'])
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])

    def test_request_handler_does_not_wait_for_the_build(self):
        # The conductor's RPC handler that runs the request returns once
        # the host has the build, as the inline code returned after its
        # cast: it does not hold one of the conductor's RPC threads for
        # the length of a build. (CastAsCall makes the API wait for it.)
        spawning = []
        real_spawn = fake.FakeDriver.spawn

        def spawn(driver, *args, **kwargs):
            spawning.append(True)
            # Polled with time.sleep, which yields under eventlet too.
            for _ in range(300):
                if not spawning:
                    break
                time.sleep(0.1)
            return real_spawn(driver, *args, **kwargs)

        self.stub_out('nova.virt.fake.FakeDriver.spawn', spawn)
        server = self._create_server(networks='none', expected_state='BUILD')
        self._wait_for_assert(lambda: self.assertEqual([True], spawning))
        flows = self._flows(server['id'])
        self.assertEqual(states.SUCCESS,
                         flows[build_flows.REQUEST_KIND].state)
        self.assertEqual(states.RUNNING,
                         flows[build_flows.INSTANCE_KIND].state)

        spawning.clear()
        self._wait_for_state_change(server, 'ACTIVE')
        self.assertEqual({states.SUCCESS}, {
            row.state for row in self._ended_flows(server['id']).values()})

    def test_delete_while_building(self):
        # The cast to the host is lost: the instance stays in BUILD.
        with mock.patch('nova.compute.rpcapi.ComputeAPI.'
                        'build_and_run_instance') as cast:
            server = self._create_server(networks='none',
                                         expected_state='BUILD')
            self._wait_for_assert(cast.assert_called_once)
        self.assertEqual(1, len(
            self._get_allocations_by_server_uuid(server['id'])))
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])

    def test_lost_cast_is_built_by_a_sweep(self):
        with mock.patch('nova.conductor.api.ComputeTaskAPI.'
                        'schedule_and_build_instances') as cast:
            server = self._create_server(networks='none',
                                         expected_state='BUILD')
        cast.assert_called_once()
        flow = self._flows(server['id'])[build_flows.REQUEST_KIND]
        self.assertEqual(states.PENDING, flow.state)
        # Held for the conductor the lost cast was meant for...
        self.assertEqual([], persistence.claimable(self.ctxt, 10))
        self.assertEqual([], self.engine.sweep(self.ctxt))

        # ...until the hold expires.
        helpers.expire_lease(self.ctxt, flow.uuid)
        for future in self.engine.sweep(self.ctxt):
            future.result()

        server = self._wait_for_state_change(server, 'ACTIVE')
        self.assertEqual(states.SUCCESS,
                         self._flows(server['id'])[
                             build_flows.REQUEST_KIND].state)
        self.assertEqual(1, len(
            self._get_allocations_by_server_uuid(server['id'])))
        self._delete_server(server)
        self.assertEqual(
            {}, self._get_allocations_by_server_uuid(server['id']))

    def test_server_deleted_before_a_lost_cast_is_swept(self):
        with mock.patch('nova.conductor.api.ComputeTaskAPI.'
                        'schedule_and_build_instances'):
            server = self._create_server(networks='none',
                                         expected_state='BUILD')
        self._delete_server(server)
        flow = self._flows(server['id'])[build_flows.REQUEST_KIND]

        helpers.expire_lease(self.ctxt, flow.uuid)
        with mock.patch('nova.scheduler.rpcapi.SchedulerAPI.'
                        'select_destinations') as select:
            for future in self.engine.sweep(self.ctxt):
                future.result()
        select.assert_not_called()

        flow, _ = persistence.load(self.ctxt, flow.uuid)
        self.assertEqual(states.REVERTED, flow.state)
        self.assertIn('no build request is left', flow.failure)
        self.assertRaises(exception.InstanceMappingNotFound,
                          objects.InstanceMapping.get_by_instance_uuid,
                          self.ctxt, server['id'])
        self.assertEqual(
            {}, self._get_allocations_by_server_uuid(server['id']))

    def test_api_stores_no_flow_while_an_old_conductor_is_left(self):
        # Mid-upgrade: this (new) conductor and one left at the release
        # before build flows, which the API's cast reaches.
        with nova_context.target_cell(
                self.ctxt, self.cell_mappings['cell1']) as cctxt:
            old = objects.Service(cctxt, host='old-conductor',
                                  binary='nova-conductor', topic='conductor')
            old.create()
            main_db_api.service_update(
                cctxt, old.id,
                {'version': build_flows.FLOW_CONDUCTOR_SERVICE_VERSION - 1})
        with mock.patch('nova.conductor.api.ComputeTaskAPI.'
                        'schedule_and_build_instances') as old_conductor:
            server = self._create_server(networks='none',
                                         expected_state='BUILD')
        old_conductor.assert_called_once()

        # Nothing for the new conductor's sweep to take for a lost cast
        # and build again beside the old conductor's build.
        self.assertEqual({}, self._flows(server['id']))
        with mock.patch('nova.scheduler.rpcapi.SchedulerAPI.'
                        'select_destinations') as select:
            self.assertEqual([], self.engine.sweep(self.ctxt))
        select.assert_not_called()

        # Once the old conductor is upgraded, the API stores flows again.
        with nova_context.target_cell(
                self.ctxt, self.cell_mappings['cell1']) as cctxt:
            main_db_api.service_update(
                cctxt, old.id,
                {'version': build_flows.FLOW_CONDUCTOR_SERVICE_VERSION})
        server = self._create_server(networks='none')
        self.assertEqual(
            {build_flows.REQUEST_KIND: states.SUCCESS,
             build_flows.INSTANCE_KIND: states.SUCCESS},
            {kind: row.state for kind, row in
             self._ended_flows(server['id']).items()})
