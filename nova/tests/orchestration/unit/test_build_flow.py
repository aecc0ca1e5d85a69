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

"""The build flows, run by the engine against nova's cell databases.

The scheduler, placement and the compute RPC API are mocked; everything
else (BuildRequests, instance mappings, instances in cells, cell0 burial)
is nova's own code on its test databases. BuildFlowTestCase hands the
instances to hosts that cannot wait for builds (the legacy cast);
WaitingBuildFlowTestCase to hosts that can.
"""

import inspect
from unittest import mock

from cryptography import fernet
import fixtures
import oslo_messaging as messaging
from oslo_utils.fixture import uuidsentinel as uuids
from oslo_utils import timeutils

from nova.compute import build_results
from nova.compute import task_states
from nova.compute import vm_states
from nova.conductor import manager as conductor_manager
from nova import context as nova_context
from nova.db.main import api as main_db_api
from nova import exception
from nova import objects
from nova.orchestration import credentials
from nova.orchestration import engine as engine_mod
from nova.orchestration.flows import boot as build
from nova.orchestration.flows.boot import host as build_host
from nova.orchestration import persistence
from nova.orchestration import states
from nova.orchestration import task
from nova import test
from nova.tests import fixtures as nova_fixtures
from nova.tests.orchestration.unit import helpers
from nova.tests.unit import fake_build_request
from nova.tests.unit import fake_request_spec


class Crash(BaseException):
    """Stands for the death of the conductor running a stage."""


def _selection(host):
    return objects.Selection(
        service_host=host, nodename='node-' + host, cell_uuid=uuids.cell,
        limits=None, allocation_request='{}',
        allocation_request_version='1.36')


class StageSignatureTestCase(test.NoDBTestCase):
    """A stage receives what its requires names, as named parameters."""

    @staticmethod
    def _named(method):
        return [name for name, param in
                inspect.signature(method).parameters.items()
                if param.kind != param.VAR_KEYWORD and
                name not in ('context', 'attempt', 'failure')]

    def test_execute_names_exactly_what_the_stage_requires(self):
        for flow in (build.BUILD_REQUEST, build.BUILD_INSTANCE_V1,
                     build.BUILD_INSTANCE):
            for stage in flow.stages:
                item = stage.item
                if isinstance(item, task.Retry):
                    # next() chooses from every value; first() needs only
                    # the selections.
                    self.assertEqual(sorted(item.requires),
                                     sorted(self._named(item.next)))
                    self.assertEqual(['selections'],
                                     self._named(item.first))
                    continue
                self.assertEqual(sorted(item.requires),
                                 sorted(self._named(item.execute)),
                                 item.name)
                if type(item).execute_again is not task.Task.execute_again:
                    self.assertEqual(sorted(item.requires),
                                     sorted(self._named(item.execute_again)),
                                     item.name)

    def test_every_stage_has_its_own_revert(self):
        for flow in (build.BUILD_REQUEST, build.BUILD_INSTANCE_V1,
                     build.BUILD_INSTANCE):
            for stage in flow.stages:
                item = stage.item
                base = (task.Retry if isinstance(item, task.Retry)
                        else task.Task)
                self.assertIsNot(base.revert, type(item).revert, item.name)
                self.assertIsNotNone(inspect.getdoc(type(item).revert),
                                     item.name)
                # It names all it requires, or what it uses (**unused).
                named = self._named(type(item).revert)
                self.assertEqual('result', named[1], item.name)
                if len(named) > 2:
                    self.assertEqual(sorted(item.requires),
                                     sorted(named[2:]), item.name)


class _BuildFlowBase(test.TestCase):

    #: Whether the compute hosts can build while the conductor waits.
    waits = False

    def setUp(self):
        super().setUp()
        self.useFixture(nova_fixtures.SpawnIsSynchronousFixture())
        self.useFixture(fixtures.MockPatch(
            'nova.compute.rpcapi.ComputeAPI.supports_waiting_build',
            return_value=self.waits))
        self.ctxt = nova_context.RequestContext(
            'fake-user', 'fake-project').elevated()
        self.conductor = conductor_manager.ComputeTaskManager()
        self.report = self.useFixture(fixtures.MockPatch(
            'nova.scheduler.client.report.report_client_singleton')).mock()
        self.report.get_allocs_for_consumer.return_value = {
            'allocations': {}}
        self.select = self.useFixture(fixtures.MockPatch(
            'nova.scheduler.rpcapi.SchedulerAPI.select_destinations')).mock
        self.cast = self.useFixture(fixtures.MockPatch(
            'nova.compute.rpcapi.ComputeAPI.build_and_run_instance')).mock
        self.useFixture(fixtures.MockPatch(
            'nova.availability_zones.get_host_availability_zone',
            return_value='az1'))
        self.start_service('compute', host='host1')
        self.start_service('compute', host='host2')
        self.instance_uuids = [self._build_request() for _ in range(2)]
        self.select.return_value = [
            [_selection('host1'), _selection('host2')],
            [_selection('host2')]]

    def _build_request(self):
        build_request = fake_build_request.fake_req_obj(self.ctxt)
        del build_request.instance.id
        # As the API creates it.
        build_request.instance.vm_state = vm_states.BUILDING
        build_request.instance.task_state = task_states.SCHEDULING
        build_request.create()
        instance_uuid = build_request.instance_uuid
        objects.InstanceMapping(
            self.ctxt, instance_uuid=instance_uuid, cell_mapping=None,
            project_id=self.ctxt.project_id).create()
        spec = fake_request_spec.fake_spec_obj(remove_id=True)
        spec._context = self.ctxt
        spec.instance_uuid = instance_uuid
        spec.instance_group = None
        spec.retry = None
        spec.limits = None
        spec.is_bfv = False
        # The fake's PCI requests lack a spec, which no real request does.
        spec.pci_requests = objects.InstancePCIRequests(requests=[])
        spec.create()
        return instance_uuid

    def _create_flow(self, injected_files=None, requested_networks=None,
                     admin_password=None, device_name='xvda'):
        spec = objects.RequestSpec.get_by_instance_uuid(
            self.ctxt, self.instance_uuids[0])
        bdm = objects.BlockDeviceMapping(
            self.ctxt, source_type='blank', destination_type='local',
            guest_format='foo', device_type='disk', disk_bus='',
            boot_index=1, device_name=device_name,
            delete_on_termination=False,
            snapshot_id=None, volume_id=None, volume_size=1,
            image_id='bar', no_device=False, connection_info=None, tag='')
        inputs = build.request_inputs(
            self.ctxt, spec, self.instance_uuids, {'name': 'image'},
            requested_networks,
            objects.BlockDeviceMappingList(objects=[bdm]),
            objects.TagList(objects=[objects.Tag(tag='t1')]),
            injected_files, admin_password)
        return persistence.create_flow(
            self.ctxt, build.REQUEST_KIND, build.VERSION, inputs)

    def _run(self, flow_uuid, **transient):
        return self.conductor.orchestration.run(
            self.ctxt, flow_uuid, transient=transient)

    def _resume_elsewhere(self, flow_uuid):
        """Another conductor's sweep resumes a flow whose lease expired.

        Its engine runs with its own admin context, as a sweep does.
        """
        helpers.expire_lease(self.ctxt, flow_uuid)
        other = engine_mod.Engine(owner='other',
                                  transient={'conductor': self.conductor})
        return other.run(nova_context.get_admin_context(), flow_uuid)

    def _flow(self, instance_uuid):
        row, stages = persistence.load(
            self.ctxt, build.instance_flow_uuid(instance_uuid))
        return row, [(s.name, s.state) for s in stages]

    def _instance(self, instance_uuid):
        mapping = objects.InstanceMapping.get_by_instance_uuid(
            self.ctxt, instance_uuid)
        with nova_context.target_cell(self.ctxt,
                                      mapping.cell_mapping) as cctxt:
            return mapping, objects.Instance.get_by_uuid(
                cctxt, instance_uuid, expected_attrs=['tags'])

    def _fault(self, instance_uuid):
        mapping, _ = self._instance(instance_uuid)
        with nova_context.target_cell(self.ctxt,
                                      mapping.cell_mapping) as cctxt:
            return objects.InstanceFault.get_latest_for_instance(
                cctxt, instance_uuid)


class BuildFlowTestCase(_BuildFlowBase):

    def test_builds_every_instance_and_casts_to_its_host(self):
        flow_uuid = self._create_flow()

        state = self._run(flow_uuid, admin_password='pw')

        self.assertEqual(states.SUCCESS, state)
        self.select.assert_called_once()
        self.assertEqual(self.instance_uuids, self.select.call_args[0][2])
        self.assertEqual(2, self.cast.call_count)
        for call, uuid, host, alternates in zip(
                self.cast.call_args_list, self.instance_uuids,
                ('host1', 'host2'), (['host2'], [])):
            kwargs = call[1]
            self.assertEqual(uuid, kwargs['instance'].uuid)
            self.assertEqual(host, kwargs['host'])
            self.assertEqual('node-' + host, kwargs['node'])
            self.assertEqual(alternates, [s.service_host
                                          for s in kwargs['host_list']])
            self.assertEqual('pw', kwargs['admin_password'])
            self.assertEqual(1, kwargs['filter_properties']['retry'][
                'num_attempts'])
            row, stages = self._flow(uuid)
            self.assertEqual(states.SUCCESS, row.state)
            self.assertEqual(
                ['create-instance', 'record-instance',
                 'delete-build-request', 'choose-host', 'accelerators',
                 'build-on-host'],
                [name for name, _ in stages])
            mapping, instance = self._instance(uuid)
            self.assertEqual('cell1', mapping.cell_mapping.name)
            self.assertEqual('az1', instance.availability_zone)
            self.assertEqual(['t1'], [t.tag for t in instance.tags])
            # No build flow waits for the host: launched_on names none, so
            # a host restarted before its build sets the instance ERROR.
            self.assertIsNone(instance.launched_on)
            self.assertEqual(['xvda'], [b.device_name for b in
                                        kwargs['block_device_mapping']])
            self.assertEqual(uuid, kwargs['block_device_mapping'][0].
                             instance_uuid)
            self.assertRaises(exception.BuildRequestNotFound,
                              objects.BuildRequest.get_by_instance_uuid,
                              self.ctxt, uuid)
            with nova_context.target_cell(self.ctxt,
                                          mapping.cell_mapping) as cctxt:
                actions = objects.InstanceActionList.get_by_instance_uuid(
                    cctxt, uuid)
            self.assertEqual(['create'], [a.action for a in actions])
        # The admin password reached the compute but no stored record.
        for uuid in [flow_uuid] + [build.instance_flow_uuid(u)
                                   for u in self.instance_uuids]:
            row, stages = persistence.load(self.ctxt, uuid)
            self.assertNotIn('"pw"', row.inputs)

    def test_port_accelerator_requests_reach_the_host(self):
        def bind(context, instance, hostname, spec, requested_networks):
            arq = getattr(uuids, 'arq-' + instance.uuid)
            requested_networks[0].arq_uuid = arq
            return [arq]

        self.useFixture(fixtures.MockPatchObject(
            self.conductor, '_create_and_bind_arq_for_instance',
            side_effect=bind))
        requested = objects.NetworkRequestList(objects=[
            objects.NetworkRequest(port_id=uuids.port, device_profile='dp')])

        self.assertEqual(states.SUCCESS, self._run(
            self._create_flow(requested_networks=requested)))

        self.assertEqual(2, self.cast.call_count)
        for call in self.cast.call_args_list:
            arq = getattr(uuids, 'arq-' + call[1]['instance'].uuid)
            self.assertEqual([arq], call[1]['accel_uuids'])
            self.assertEqual(
                [arq], [r.arq_uuid for r in call[1]['requested_networks']])

    def test_instance_flows_wait_for_the_request_flow(self):
        # Until start-instance-flows hands them the request's secrets, no
        # sweep takes the instance flows.
        self.useFixture(fixtures.MockPatchObject(
            build.StartInstanceFlows, 'execute'))

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        flow_uuids = {build.instance_flow_uuid(u)
                      for u in self.instance_uuids}
        self.assertEqual(flow_uuids,
                         persistence.existing_flows(self.ctxt, flow_uuids))
        self.assertEqual([], persistence.claimable(self.ctxt, 10))

    def test_request_with_no_build_request_left_is_not_scheduled(self):
        # The first server was built by a conductor that did not run this
        # flow (its instance is mapped to a cell), the second was deleted.
        flow_uuid = self._create_flow()
        built, deleted = self.instance_uuids
        for uuid in self.instance_uuids:
            objects.BuildRequest.get_by_instance_uuid(
                self.ctxt, uuid).destroy()
        mapping = objects.InstanceMapping.get_by_instance_uuid(
            self.ctxt, built)
        mapping.cell_mapping = self.cell_mappings['cell1']
        mapping.save()

        # A sweep resumes the flow whose cast was lost.
        self.assertEqual(states.REVERTED, self._resume_elsewhere(flow_uuid))

        self.select.assert_not_called()
        row, _ = persistence.load(self.ctxt, flow_uuid)
        self.assertIn('no build request is left', row.failure)
        self.assertEqual('cell1', objects.InstanceMapping.get_by_instance_uuid(
            self.ctxt, built).cell_mapping.name)
        self.assertRaises(exception.InstanceMappingNotFound,
                          objects.InstanceMapping.get_by_instance_uuid,
                          self.ctxt, deleted)
        self.report.delete_allocation_for_instance.assert_called_once_with(
            mock.ANY, deleted, force=True)

    def test_servers_deleted_before_the_cast_arrives_are_forgotten(self):
        # The conductor the request was cast to schedules it without
        # looking for the build requests; each build-instance flow finds
        # its own gone, as the inline code did.
        flow_uuid = self._create_flow()
        for uuid in self.instance_uuids:
            objects.BuildRequest.get_by_instance_uuid(
                self.ctxt, uuid).destroy()

        self.assertEqual(states.SUCCESS, self._run(flow_uuid))

        self.select.assert_called_once()
        for uuid in self.instance_uuids:
            self.assertEqual(states.REVERTED, self._flow(uuid)[0].state)
            self.assertRaises(exception.InstanceMappingNotFound,
                              objects.InstanceMapping.get_by_instance_uuid,
                              self.ctxt, uuid)
        self.assertEqual(
            sorted(self.instance_uuids),
            sorted(c[0][1] for c in
                   self.report.delete_allocation_for_instance.call_args_list))
        self.cast.assert_not_called()

    def test_create_request_flow_is_found_by_instance_and_held(self):
        spec = objects.RequestSpec.get_by_instance_uuid(
            self.ctxt, self.instance_uuids[0])
        other = objects.RequestSpec.get_by_instance_uuid(
            self.ctxt, self.instance_uuids[1])
        flow_uuid = build.create_request_flow(
            self.ctxt, [spec, other], {}, None, None, None, None)

        self.assertEqual(flow_uuid, build.request_flow_uuid(
            self.instance_uuids[0]))
        self.assertNotIn(flow_uuid, (
            build.request_flow_uuid(self.instance_uuids[1]),
            build.instance_flow_uuid(self.instance_uuids[0])))
        self.assertEqual([], persistence.claimable(self.ctxt, 10))

    def _specs(self):
        return [objects.RequestSpec.get_by_instance_uuid(self.ctxt, uuid)
                for uuid in self.instance_uuids]

    def _cast(self, specs=None):
        """What nova-api casts to the conductor for the request."""
        specs = specs or self._specs()
        self.conductor.schedule_and_build_instances(
            self.ctxt, build_requests=[
                objects.BuildRequest.get_by_instance_uuid(self.ctxt, uuid)
                for uuid in self.instance_uuids],
            request_specs=specs, image={}, admin_password=None,
            injected_files=None, requested_networks=None,
            block_device_mapping=objects.BlockDeviceMappingList(),
            tags=objects.TagList())
        return build.request_flow_uuid(self.instance_uuids[0])

    def test_cast_from_an_api_that_stores_no_flow_stores_it(self):
        flow_uuid = self._cast()

        self.assertEqual(states.SUCCESS,
                         persistence.load(self.ctxt, flow_uuid)[0].state)
        self.select.assert_called_once()
        self.assertEqual(2, self.cast.call_count)

    def test_cast_builds_with_the_request_specs_it_carries(self):
        specs = self._specs()
        get = self.useFixture(fixtures.MockPatchObject(
            objects.RequestSpec, 'get_by_instance_uuid',
            wraps=objects.RequestSpec.get_by_instance_uuid)).mock

        self._cast(specs)

        # The run that got the cast schedules and builds with the specs it
        # carries, as the inline code did, reading none.
        get.assert_not_called()
        self.assertIs(specs[0], self.select.call_args[0][1])
        self.assertEqual(specs, [call[1]['request_spec']
                                 for call in self.cast.call_args_list])
        # The build-instance flows store their own inputs only.
        for uuid in self.instance_uuids:
            row, _ = persistence.load(self.ctxt,
                                      build.instance_flow_uuid(uuid))
            self.assertEqual(set(build.BUILD_INSTANCE.inputs),
                             set(persistence.decode(row.inputs)))

    def test_cast_for_a_flow_run_elsewhere_leaves_it(self):
        spec = objects.RequestSpec.get_by_instance_uuid(
            self.ctxt, self.instance_uuids[0])
        flow_uuid = build.create_request_flow(
            self.ctxt, [spec], {}, None, None, None, None)
        persistence.claim(self.ctxt, flow_uuid, 'other', 60)

        self.assertEqual(flow_uuid, self._cast())

        row, stages = persistence.load(self.ctxt, flow_uuid)
        self.assertEqual(('other', states.PENDING, []),
                         (row.owner, row.state, stages))
        self.select.assert_not_called()

    def test_scheduling_failure_buries_the_request_in_cell0(self):
        self.select.side_effect = exception.NoValidHost(reason='full')
        flow_uuid = self._create_flow()

        self.assertEqual(states.REVERTED, self._run(flow_uuid))

        row, _ = persistence.load(self.ctxt, flow_uuid)
        failure = persistence.decode(row.failure)
        self.assertEqual(('NoValidHost', 'schedule'),
                         (failure['type'], failure['stage']))
        self.assertIn('No valid host', failure['message'])
        for uuid in self.instance_uuids:
            mapping, instance = self._instance(uuid)
            self.assertEqual(objects.CellMapping.CELL0_UUID,
                             mapping.cell_mapping.uuid)
            self.assertEqual(vm_states.ERROR, instance.vm_state)
        self.cast.assert_not_called()
        self.assertEqual(set(), persistence.existing_flows(
            self.ctxt, [build.instance_flow_uuid(u)
                        for u in self.instance_uuids]))

    def test_server_deleted_before_create_releases_its_claim(self):
        objects.BuildRequest.get_by_instance_uuid(
            self.ctxt, self.instance_uuids[0]).destroy()

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        row, stages = self._flow(self.instance_uuids[0])
        self.assertEqual(states.REVERTED, row.state)
        self.assertIn('the server was deleted',
                      persistence.decode(row.failure)['message'])
        self.assertRaises(exception.InstanceMappingNotFound,
                          objects.InstanceMapping.get_by_instance_uuid,
                          self.ctxt, self.instance_uuids[0])
        self.assertRaises(exception.RequestSpecNotFound,
                          objects.RequestSpec.get_by_instance_uuid,
                          self.ctxt, self.instance_uuids[0])
        self.report.delete_allocation_for_instance.assert_called_once_with(
            mock.ANY, self.instance_uuids[0], force=True)
        # The other instance of the request is built.
        self.assertEqual(1, self.cast.call_count)
        self.assertEqual(states.SUCCESS,
                         self._flow(self.instance_uuids[1])[0].state)

    def test_server_deleted_before_commit_point_removes_the_instance(self):
        orig = build.RecordInstance.execute

        def delete_server(task_self, context, conductor, **inputs):
            orig(task_self, context, conductor, **inputs)
            objects.BuildRequest.get_by_instance_uuid(
                self.ctxt, inputs['instance_uuid']).destroy()

        self.stub_out('nova.orchestration.flows.boot.instance.RecordInstance.'
                      'execute', delete_server)

        self._run(self._create_flow())

        for uuid in self.instance_uuids:
            row, stages = self._flow(uuid)
            self.assertEqual(states.REVERTED, row.state)
            self.assertEqual(('delete-build-request', states.REVERTED),
                             stages[-1])
            mapping = objects.InstanceMapping.get_by_instance_uuid(
                self.ctxt, uuid)
            with nova_context.target_cell(
                    self.ctxt, mapping.cell_mapping) as cctxt:
                self.assertRaises(exception.InstanceNotFound,
                                  objects.Instance.get_by_uuid, cctxt, uuid)
                self.assertEqual([], objects.BlockDeviceMappingList.
                                 get_by_instance_uuid(cctxt, uuid).objects)
        self.cast.assert_not_called()

    def test_any_failure_before_the_commit_point_sets_the_instance_error(self):
        # The inline code cleaned up after the failures it expected only:
        # this one left the server in BUILD, its BuildRequest kept.
        with mock.patch.object(conductor_manager.ComputeTaskManager,
                               '_map_instance_to_cell',
                               side_effect=ValueError('mapping broke')):
            self._run(self._create_flow())

        for uuid in self.instance_uuids:
            row, stages = self._flow(uuid)
            self.assertEqual(states.REVERTED, row.state)
            self.assertEqual(('record-instance', states.STAGE_REVERTED),
                             stages[-1])
            _, instance = self._instance(uuid)
            self.assertEqual(vm_states.ERROR, instance.vm_state)
            self.assertEqual('ValueError', self._fault(uuid).message)
            self.assertRaises(exception.BuildRequestNotFound,
                              objects.BuildRequest.get_by_instance_uuid,
                              self.ctxt, uuid)
        self.cast.assert_not_called()

    def test_crash_during_the_cleanup_resumes_it(self):
        real = conductor_manager.ComputeTaskManager._cleanup_build_artifacts
        calls = []

        def crash_once(manager, *args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                raise Crash()
            return real(manager, *args, **kwargs)

        self.stub_out('nova.conductor.manager.ComputeTaskManager.'
                      '_cleanup_build_artifacts', crash_once)
        with mock.patch.object(conductor_manager.ComputeTaskManager,
                               '_map_instance_to_cell',
                               side_effect=ValueError('mapping broke')):
            # The instance flows run on the pool: their crash stops them
            # only.
            self._run(self._create_flow())
            uuid = self.instance_uuids[0]
            row, stages = self._flow(uuid)
            # The revert in flight is recorded: a crash leaves it to be
            # done again, not half done for good.
            self.assertEqual(states.REVERTING, row.state)
            self.assertEqual(('create-instance', states.STAGE_REVERTING),
                             stages[0])
            self.assertEqual(states.REVERTED, self._resume_elsewhere(
                build.instance_flow_uuid(uuid)))

        # The first instance's twice, the second instance's once.
        self.assertEqual(3, len(calls))
        self.assertEqual(vm_states.ERROR, self._instance(uuid)[1].vm_state)
        # The resumed revert has the stored failure, not the exception.
        self.assertEqual('mapping broke', self._fault(uuid).message)

    def test_crash_after_scheduling_resumes_without_scheduling_again(self):
        flow_uuid = self._create_flow()
        with mock.patch.object(build.StartInstanceFlows, 'execute',
                               side_effect=Crash()):
            self.assertRaises(Crash, self._run, flow_uuid)

        # A sweep of another conductor resumes the request with its own
        # admin context, which starts the instance flows.
        self.assertEqual(states.SUCCESS, self._resume_elsewhere(flow_uuid))
        for uuid in self.instance_uuids:
            self.assertEqual(states.SUCCESS, self._flow(uuid)[0].state)

        self.select.assert_called_once()
        self.assertEqual(2, self.cast.call_count)
        # The casts act for the requester, as the first run did.
        for call in self.cast.call_args_list:
            self.assertEqual('fake-project', call[0][0].project_id)
            self.assertIsNone(call[1]['admin_password'])

    def test_create_instance_executed_again_keeps_the_instance(self):
        real_create = objects.Instance.create

        def create_and_crash(instance):
            real_create(instance)
            raise Crash()

        flow_uuid = self._create_flow()
        with mock.patch.object(build.StartInstanceFlows, 'execute'):
            self.assertEqual(states.SUCCESS, self._run(flow_uuid))
        uuid = self.instance_uuids[0]
        instance_flow = build.instance_flow_uuid(uuid)
        with mock.patch.object(objects.Instance, 'create', create_and_crash):
            self.assertRaises(Crash, self._run, instance_flow)

        # Executed again, the stage finds the instance created and goes on.
        self.assertEqual(states.SUCCESS, self._resume_elsewhere(instance_flow))
        self.assertEqual(uuid, self._instance(uuid)[1].uuid)
        self.assertEqual([uuid], [call[1]['instance'].uuid
                                  for call in self.cast.call_args_list])

    def test_schedule_executed_again_finds_the_flows_it_made(self):
        existing = self.useFixture(fixtures.MockPatch(
            'nova.orchestration.persistence.existing_flows',
            wraps=persistence.existing_flows)).mock
        real_create_flows = build.Schedule._create_flows

        def create_flows_and_crash(*args):
            real_create_flows(*args)
            raise Crash()

        flow_uuid = self._create_flow()
        with mock.patch.object(build.Schedule, '_create_flows',
                               staticmethod(create_flows_and_crash)):
            self.assertRaises(Crash, self._run, flow_uuid)
        # A first execution has no earlier one's flows to look for.
        existing.assert_not_called()

        self.assertEqual(states.SUCCESS, self._resume_elsewhere(flow_uuid))

        existing.assert_called_once()
        self.select.assert_called_once()
        self.assertEqual(2, self.cast.call_count)

    def _crash_in_record_instance(self, **flow_kwargs):
        """Crash the first instance's flow at the end of record-instance.

        :returns: the instance's uuid and the uuid of its flow
        """
        flow_uuid = self._create_flow(**flow_kwargs)
        with mock.patch.object(build.StartInstanceFlows, 'execute'):
            self.assertEqual(states.SUCCESS, self._run(flow_uuid))
        uuid = self.instance_uuids[0]
        instance_flow = build.instance_flow_uuid(uuid)
        with mock.patch.object(self.conductor, '_map_instance_to_cell',
                               side_effect=Crash()):
            self.assertRaises(Crash, self._run, instance_flow)
        return uuid, instance_flow

    def test_record_instance_starts_one_create_action(self):
        get = self.useFixture(fixtures.MockPatchObject(
            objects.InstanceAction, 'get_by_request_id',
            wraps=objects.InstanceAction.get_by_request_id)).mock
        uuid, instance_flow = self._crash_in_record_instance()
        # A first execution has no earlier one's action to look for.
        get.assert_not_called()

        # Executed again, the stage finds the action started and goes on.
        self.assertEqual(states.SUCCESS, self._resume_elsewhere(instance_flow))
        get.assert_called_once()
        mapping, instance = self._instance(uuid)
        with nova_context.target_cell(self.ctxt,
                                      mapping.cell_mapping) as cctxt:
            actions = objects.InstanceActionList.get_by_instance_uuid(
                cctxt, uuid)
        self.assertEqual(['create'], [a.action for a in actions])

    def test_record_instance_again_creates_each_bdm_once(self):
        # An API request names no device: the rows are found by uuid.
        uuid, instance_flow = self._crash_in_record_instance(
            device_name=None)

        self.assertEqual(states.SUCCESS, self._resume_elsewhere(instance_flow))

        mapping, instance = self._instance(uuid)
        with nova_context.target_cell(self.ctxt,
                                      mapping.cell_mapping) as cctxt:
            bdms = objects.BlockDeviceMappingList.get_by_instance_uuid(
                cctxt, uuid)
        self.assertEqual(1, len(bdms))

    def test_rescheduling_after_a_crash_releases_the_first_claims(self):
        host_lists = self.select.return_value
        self.select.side_effect = [
            exception.NoValidHost(reason='consumers exist'), host_lists]
        self.report.get_allocs_for_consumer.return_value = {
            'allocations': {uuids.rp: {'resources': {'VCPU': 1}}}}

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        self.assertEqual(2, self.select.call_count)
        self.assertEqual(
            sorted(self.instance_uuids),
            sorted(c[0][1] for c in
                   self.report.delete_allocation_for_instance.call_args_list))
        self.assertEqual(2, self.cast.call_count)

    def test_cast_not_repeated_once_the_host_has_the_instance(self):
        self._run(self._create_flow())
        uuid = self.instance_uuids[0]
        mapping, instance = self._instance(uuid)
        instance.host = 'host1'
        instance.task_state = None
        instance.save()
        self.cast.reset_mock()

        # Resuming the instance flow's last stage finds the host has it.
        flow_uuid = build.instance_flow_uuid(uuid)
        row, stages = persistence.load(self.ctxt, flow_uuid)
        helpers.set_column(self.ctxt, persistence.StageRecord, stages[-1].id,
                           state=states.RUNNING)
        helpers.set_column(self.ctxt, persistence.FlowRecord, row.id,
                           state=states.RUNNING)
        helpers.expire_lease(self.ctxt, flow_uuid)
        self.assertEqual(states.SUCCESS, self._run(flow_uuid))

        self.cast.assert_not_called()

    def test_lost_personality_files_end_the_build_with_a_reason(self):
        flow_uuid = self._create_flow(injected_files=[('/f', 'YQ==')])
        with mock.patch.object(build.StartInstanceFlows, 'execute'):
            self._run(flow_uuid, injected_files=[('/f', 'YQ==')])

        # The conductor holding the files died; another one resumes.
        uuid = self.instance_uuids[0]
        self.assertEqual(states.REVERTED, self._run(
            build.instance_flow_uuid(uuid)))

        row, _ = self._flow(uuid)
        self.assertIn('the personality files of the request were held by a '
                      'conductor that stopped, and this one does not have '
                      'them (nothing was stored sealed',
                      persistence.decode(row.failure)['message'])
        _, instance = self._instance(uuid)
        self.assertEqual(vm_states.ERROR, instance.vm_state)
        self.cast.assert_not_called()


class WaitingBuildFlowTestCase(_BuildFlowBase):
    """Hosts build while the conductor waits; reschedules stay in the flow.
    """

    waits = True

    def setUp(self):
        super().setUp()
        self.build = self.cast
        self.build.return_value = {'result': 'active', 'reason': None}
        self.claim = self.useFixture(fixtures.MockPatch(
            'nova.scheduler.utils.claim_resources', return_value=True)).mock
        self.select.return_value = [
            [_selection('host1'), _selection('host2')],
            [_selection('host2'), _selection('host1')]]

    def _hosts(self):
        return [(c[1]['instance'].uuid, c[1]['host'])
                for c in self.build.call_args_list]

    def _events(self, instance_uuid):
        mapping, _ = self._instance(instance_uuid)
        with nova_context.target_cell(self.ctxt,
                                      mapping.cell_mapping) as cctxt:
            action = objects.InstanceActionList.get_by_instance_uuid(
                cctxt, instance_uuid)[0]
            events = objects.InstanceActionEventList.get_by_action(
                cctxt, action.id)
            return action.message, {e.event: e.result for e in events}

    def test_builds_every_instance_and_waits_for_its_host(self):
        flow_uuid = self._create_flow()

        self.assertEqual(states.SUCCESS, self._run(flow_uuid,
                                                   admin_password='pw'))

        self.assertEqual(list(zip(self.instance_uuids, ('host1', 'host2'))),
                         self._hosts())
        for call in self.build.call_args_list:
            self.assertTrue(call[1]['wait'])
            # The run created the instance: no host was asked before.
            self.assertFalse(call[1]['asked_before'])
            self.assertEqual('pw', call[1]['admin_password'])
            # The conductor chooses alternates itself.
            self.assertNotIn('host_list', call[1])
        for uuid in self.instance_uuids:
            row, stages = self._flow(uuid)
            self.assertEqual(states.SUCCESS, row.state)
            self.assertEqual(('build-on-host', 'SUCCESS'), stages[-1])
        self.claim.assert_not_called()
        for uuid, host in zip(self.instance_uuids, ('host1', 'host2')):
            # Only the host asked may start the build.
            self.assertEqual(host, self._instance(uuid)[1].launched_on)

    def test_run_keeps_the_instance_it_created_until_the_host_builds(self):
        get = self.useFixture(fixtures.MockPatchObject(
            objects.Instance, 'get_by_uuid',
            wraps=objects.Instance.get_by_uuid)).mock
        get_bdms = self.useFixture(fixtures.MockPatchObject(
            objects.BlockDeviceMappingList, 'get_by_instance_uuid',
            wraps=objects.BlockDeviceMappingList.get_by_instance_uuid)).mock

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        # No stage read an instance or its block device mappings:
        # create-instance and record-instance created them and the stages
        # after them kept them.
        get.assert_not_called()
        get_bdms.assert_not_called()
        for call in self.build.call_args_list:
            # The host got the instance with the tags record-instance
            # stored, as from the inline code.
            self.assertTrue(call[1]['instance'].obj_attr_is_set('tags'))
            # And the block device mappings as stored.
            bdm = call[1]['block_device_mapping'][0]
            self.assertEqual((call[1]['instance'].uuid, 'xvda'),
                             (bdm.instance_uuid, bdm.device_name))
            self.assertIn('id', bdm)

    def test_reschedule_claims_and_builds_on_the_next_alternate(self):
        self.build.side_effect = [
            {'result': 'rescheduled', 'reason': 'no room'},
            {'result': 'active', 'reason': None},
            {'result': 'active', 'reason': None}]

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        first = self.instance_uuids[0]
        self.assertEqual([(first, 'host1'), (first, 'host2')],
                         self._hosts()[:2])
        self.claim.assert_called_once()
        self.assertEqual(first, self.claim.call_args[0][3])
        row, stages = self._flow(first)
        self.assertEqual(states.SUCCESS, row.state)
        self.assertIn(('build-on-host', 'REVERTED'), stages)
        self.assertEqual(('build-on-host', 'SUCCESS'), stages[-1])
        # The second attempt was told it is one, and got the block device
        # mappings as the first attempt left them.
        second = self.build.call_args_list[1][1]
        self.assertEqual(2, second['filter_properties']['retry'][
            'num_attempts'])
        stored = objects.BlockDeviceMappingList.get_by_instance_uuid(
            self.ctxt, first)
        self.assertEqual(1, len(stored))
        self.assertEqual([b.id for b in stored],
                         [b.id for b in second['block_device_mapping']])

    def test_alternate_whose_claim_fails_is_skipped(self):
        self.select.return_value = [
            [_selection('host1'), _selection('host2'), _selection('host1')],
            [_selection('host2')]]
        self.claim.side_effect = [False, True]
        self.build.side_effect = [
            {'result': 'rescheduled', 'reason': 'no room'},
            {'result': 'active', 'reason': None},
            {'result': 'active', 'reason': None}]

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        first = self.instance_uuids[0]
        self.assertEqual(2, self.claim.call_count)
        self.assertEqual([(first, 'host1'), (first, 'host1')],
                         self._hosts()[:2])

    def test_exhausted_alternates_set_the_instance_error(self):
        self.build.return_value = {'result': 'rescheduled',
                                   'reason': 'no room'}

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        for uuid in self.instance_uuids:
            row, _ = self._flow(uuid)
            self.assertEqual(states.REVERTED, row.state)
            _, instance = self._instance(uuid)
            self.assertEqual(vm_states.ERROR, instance.vm_state)
            with nova_context.target_cell(
                    self.ctxt, self._instance(uuid)[0].cell_mapping) as cctxt:
                fault = objects.InstanceFault.get_latest_for_instance(
                    cctxt, uuid)
            self.assertIn('Exceeded maximum number of retries',
                          fault.message)
        # Both hosts for each instance.
        self.assertEqual(4, self.build.call_count)

    def _down(self, *hosts):
        """The service group reports the compute services of hosts down."""
        is_up = self.conductor.servicegroup_api.service_is_up
        self.useFixture(fixtures.MockPatchObject(
            self.conductor.servicegroup_api, 'service_is_up',
            side_effect=lambda service: (service.host not in hosts and
                                         is_up(service))))

    def _hosts_of(self, uuid):
        return [host for instance, host in self._hosts() if instance == uuid]

    def test_alternate_found_down_is_skipped_without_a_call(self):
        self.select.return_value = [
            [_selection('host1'), _selection('host2'), _selection('host1')],
            [_selection('host2')]]
        self._down('host2')
        self.build.side_effect = [
            {'result': 'rescheduled', 'reason': 'no room'},
            {'result': 'active', 'reason': None},
            {'result': 'active', 'reason': None}]

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        first, second = self.instance_uuids
        # host2 was not asked: its allocation, claimed for the attempt,
        # was released here, and the next alternate claimed.
        self.assertEqual(['host1', 'host1'], self._hosts_of(first))
        self.report.delete_allocation_for_instance.assert_called_once_with(
            mock.ANY, first, force=True)
        self.assertEqual(2, self.claim.call_count)
        row, stages = self._flow(first)
        self.assertEqual(states.SUCCESS, row.state)
        self.assertEqual(2, stages.count(('build-on-host', 'REVERTED')))
        # The scheduler's host of the run that created the instance is not
        # looked up: the scheduler has just found it up.
        self.assertEqual(['host2'], self._hosts_of(second))

    def test_alternate_whose_service_is_gone_is_skipped(self):
        self.select.return_value = [
            [_selection('host1'), _selection('host2'), _selection('host1')],
            [_selection('host1')]]
        get_service = objects.Service.get_by_compute_host

        def get_by_compute_host(context, host):
            if host == 'host2':
                raise exception.ComputeHostNotFound(host=host)
            return get_service(context, host)

        self.useFixture(fixtures.MockPatchObject(
            objects.Service, 'get_by_compute_host',
            side_effect=get_by_compute_host))
        self.build.side_effect = [
            {'result': 'rescheduled', 'reason': 'no room'},
            {'result': 'active', 'reason': None},
            {'result': 'active', 'reason': None}]

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        # Not the legacy cast to a host nobody serves.
        self.assertEqual(['host1', 'host1'],
                         self._hosts_of(self.instance_uuids[0]))
        self.assertTrue(all(c[1]['wait'] for c in self.build.call_args_list))

    def test_alternates_all_down_set_the_instance_error(self):
        self._down('host2')
        self.build.return_value = {'result': 'rescheduled',
                                   'reason': 'no room'}

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        first = self.instance_uuids[0]
        self.assertEqual(['host1'], self._hosts_of(first))
        self.assertEqual(states.REVERTED, self._flow(first)[0].state)
        self.assertEqual(vm_states.ERROR, self._instance(first)[1].vm_state)
        self.assertIn('Exceeded maximum number of retries',
                      self._fault(first).message)
        # Released once host2 was found down: no allocation is left.
        self.report.delete_allocation_for_instance.assert_called_once_with(
            mock.ANY, first, force=True)

    def test_resumed_flow_whose_host_went_down_builds_on_an_alternate(self):
        crashed = self.instance_uuids[0]
        real = build_host.HostAccelerators.execute

        def execute(task, context, conductor, **inputs):
            if inputs['instance_uuid'] == crashed:
                raise Crash()
            return real(task, context, conductor, **inputs)

        with mock.patch.object(build_host.HostAccelerators, 'execute',
                               execute):
            self.assertEqual(states.SUCCESS, self._run(self._create_flow()))
        self.assertEqual([], self._hosts_of(crashed))
        self._down('host1')

        self.assertEqual(states.SUCCESS, self._resume_elsewhere(
            build.instance_flow_uuid(crashed)))

        self.assertEqual(['host2'], self._hosts_of(crashed))
        self.report.delete_allocation_for_instance.assert_called_once_with(
            mock.ANY, crashed, force=True)

    def test_host_of_an_interrupted_build_is_asked_even_if_down(self):
        # The interrupted execution may have handed it the build.
        with mock.patch.object(build.BuildOnHost, 'execute',
                               side_effect=Crash()):
            self.assertEqual(states.SUCCESS, self._run(self._create_flow()))
        self._down('host1', 'host2')
        first = self.instance_uuids[0]

        self.assertEqual(states.SUCCESS, self._resume_elsewhere(
            build.instance_flow_uuid(first)))

        self.assertEqual(['host1'], self._hosts_of(first))
        self.report.delete_allocation_for_instance.assert_not_called()

    def test_any_failure_after_the_commit_point_sets_the_instance_error(self):
        # The inline code left the server in BUILD after this one.
        with mock.patch.object(build_host, '_host_call_arguments',
                               side_effect=ValueError('arguments broke')):
            self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        for uuid in self.instance_uuids:
            row, stages = self._flow(uuid)
            self.assertEqual(states.REVERTED, row.state)
            self.assertEqual(('build-on-host', states.STAGE_REVERTED),
                             stages[-1])
            self.assertEqual(vm_states.ERROR,
                             self._instance(uuid)[1].vm_state)
        self.build.assert_not_called()

    def _abort_during_the_build(self, uuid, answer):
        """The operator aborts uuid's flow while its host builds it."""
        def answer_build(context, instance, **kwargs):
            if instance.uuid == uuid:
                persistence.abort(nova_context.get_admin_context(),
                                  build.instance_flow_uuid(uuid))
            return answer
        self.build.side_effect = answer_build
        return self.useFixture(fixtures.MockPatch(
            'nova.compute.rpcapi.ComputeAPI.abort_build')).mock

    def _assert_aborted(self, uuid):
        row, stages = self._flow(uuid)
        self.assertEqual(states.REVERTED, row.state)
        self.assertEqual('aborted by operator',
                         persistence.decode(row.failure)['message'])
        self.assertEqual({states.STAGE_REVERTED},
                         {state for _, state in stages})
        self.assertEqual(vm_states.ERROR, self._instance(uuid)[1].vm_state)
        self.assertEqual('aborted by operator', self._fault(uuid).message)
        self.report.delete_allocation_for_instance.assert_any_call(
            mock.ANY, uuid, force=True)

    def test_abort_during_the_build_has_the_host_undo_it(self):
        # The host finished the build before the flow saw the abort: its
        # reverts have the host undo the build, then end it ERROR.
        aborted, other = self.instance_uuids
        undo = self._abort_during_the_build(
            aborted, {'result': 'active', 'reason': None})

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        self._assert_aborted(aborted)
        undo.assert_called_once_with(
            mock.ANY, mock.ANY, 'host1', requested_networks=mock.ANY,
            reason='aborted by operator')
        self.assertEqual(aborted, undo.call_args[0][1].uuid)
        self.assertEqual(states.SUCCESS, self._flow(other)[0].state)
        self.assertNotIn(mock.call(mock.ANY, other, force=True),
                         self.report.delete_allocation_for_instance.mock_calls)

    def test_abort_after_a_reschedule_undoes_the_last_host_only(self):
        # The first host reported the build rescheduled (it undid it); the
        # abort came while the alternate built it.
        aborted = self.instance_uuids[0]
        answers = iter([{'result': 'rescheduled', 'reason': 'no room'},
                        {'result': 'active', 'reason': None}])

        def answer_build(context, instance, **kwargs):
            if instance.uuid != aborted:
                return {'result': 'active', 'reason': None}
            if kwargs['host'] == 'host2':
                persistence.abort(nova_context.get_admin_context(),
                                  build.instance_flow_uuid(aborted))
            return next(answers)
        self.build.side_effect = answer_build
        undo = self.useFixture(fixtures.MockPatch(
            'nova.compute.rpcapi.ComputeAPI.abort_build')).mock

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        self._assert_aborted(aborted)
        self.assertEqual(['host2'], [c[0][2] for c in undo.call_args_list])

    def test_abort_revert_interrupted_is_resumed(self):
        aborted = self.instance_uuids[0]
        undo = self._abort_during_the_build(
            aborted, {'result': 'active', 'reason': None})
        undo.side_effect = [Crash(), None]

        # The conductor dies during the host's undo.
        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))
        row, stages = self._flow(aborted)
        self.assertEqual(states.REVERTING, row.state)
        self.assertIn(('build-on-host', states.STAGE_REVERTING), stages)

        self.assertEqual(states.REVERTED, self._resume_elsewhere(
            build.instance_flow_uuid(aborted)))
        self._assert_aborted(aborted)
        self.assertEqual(2, undo.call_count)

    def test_abort_asks_a_host_that_does_not_answer_again(self):
        self.useFixture(fixtures.MockPatch(
            'nova.orchestration.flows.boot.host.HOST_RETRY_INTERVAL', 0))
        aborted = self.instance_uuids[0]
        undo = self._abort_during_the_build(
            aborted, {'result': 'active', 'reason': None})
        undo.side_effect = [messaging.MessagingTimeout(), None]

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        self._assert_aborted(aborted)
        self.assertEqual(2, undo.call_count)

    def test_abort_with_a_host_gone_ends_error(self):
        # The host does not come back in time: the flow ends ERROR, its
        # revert left to retry (nova-manage orchestration resume).
        self.flags(host_restart_timeout=0, group='orchestration')
        aborted = self.instance_uuids[0]
        undo = self._abort_during_the_build(
            aborted, {'result': 'active', 'reason': None})
        undo.side_effect = messaging.MessagingTimeout('gone')

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        row, stages = self._flow(aborted)
        self.assertEqual(states.ERROR, row.state)
        failure = persistence.decode(row.failure)
        self.assertEqual(('HostGaveNoOutcome', 'build-on-host'),
                         (failure['type'], failure['stage']))
        self.assertEqual(('build-on-host', states.STAGE_REVERTING),
                         stages[-1])

    def test_abort_revert_of_a_stopping_conductor_is_handed_over(self):
        aborted = self.instance_uuids[0]
        undo = self._abort_during_the_build(
            aborted, {'result': 'active', 'reason': None})
        undo.side_effect = [messaging.MessagingTimeout(), None]
        # The conductor stops while the host does not answer.
        self.conductor.orchestration.stopping.set()

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))
        row, stages = self._flow(aborted)
        # Not ERROR: its lease expired at once for another conductor.
        self.assertEqual(states.REVERTING, row.state)
        self.assertLessEqual(row.lease_expires_at, timeutils.utcnow())

        self.conductor.orchestration.stopping.clear()
        self.assertEqual(states.REVERTED, self._resume_elsewhere(
            build.instance_flow_uuid(aborted)))
        self._assert_aborted(aborted)

    def test_abort_of_a_build_cast_to_an_old_host_ends_error(self):
        # A host older than abort_build cannot undo the build it was cast:
        # the flow says so and keeps its records for the operator.
        aborted = self.instance_uuids[0]
        undo = self._abort_during_the_build(aborted, None)
        with mock.patch.object(build_host.BuildOnHost, '_waits',
                               return_value=False):
            self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        row, stages = self._flow(aborted)
        self.assertEqual(states.ERROR, row.state)
        failure = persistence.decode(row.failure)
        self.assertEqual('BuildNotUndone', failure['type'])
        self.assertIn('on host host1 cannot be undone: its compute service '
                      'is older than version 75', failure['message'])
        self.assertEqual(('build-on-host', states.STAGE_REVERTING),
                         stages[-1])
        undo.assert_not_called()

    def test_failed_build_is_not_rescheduled(self):
        self.build.return_value = {'result': 'failed', 'reason': None}

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        self.assertEqual(2, self.build.call_count)
        self.claim.assert_not_called()
        row, _ = self._flow(self.instance_uuids[0])
        self.assertEqual(states.REVERTED, row.state)
        self.assertIn('failed', persistence.decode(row.failure)['message'])
        # The host reported the failure with the instance's fault; the
        # stage's event did not fail, as the host's own event does not.
        self.assertEqual((None, {'conductor_build_on_host': 'Success'}),
                         self._events(self.instance_uuids[0]))

    def test_accelerators_stage_works_only_for_device_profiles(self):
        bind = self.useFixture(fixtures.MockPatchObject(
            self.conductor, '_create_and_bind_arq_for_instance',
            return_value=['arq'])).mock
        # The requested port asks for a device profile.
        requested = objects.NetworkRequestList(objects=[
            objects.NetworkRequest(port_id=uuids.port, device_profile='dp')])

        self.assertEqual(states.SUCCESS, self._run(
            self._create_flow(requested_networks=requested)))

        self.assertEqual(2, bind.call_count)
        self.assertEqual(
            (None, {'conductor_accelerators': 'Success',
                    'conductor_build_on_host': 'Success'}),
            self._events(self.instance_uuids[0]))

    def test_accelerators_rerun_deletes_the_requests_bound_before(self):
        # The conductor dies once the instances' ARQs are bound, before
        # the stage's result is recorded.
        cyclient = self.useFixture(fixtures.MockPatch(
            'nova.accelerator.cyborg.get_client')).mock.return_value
        cyclient.get_arqs_for_instance.side_effect = lambda uuid: [
            {'uuid': getattr(uuids, 'old-' + uuid)}]
        bind = self.useFixture(fixtures.MockPatchObject(
            self.conductor, '_create_and_bind_arq_for_instance',
            side_effect=Crash())).mock
        requested = objects.NetworkRequestList(objects=[
            objects.NetworkRequest(port_id=uuids.port, device_profile='dp')])
        self.assertEqual(states.SUCCESS, self._run(
            self._create_flow(requested_networks=requested)))
        # A first execution reads nothing back from Cyborg.
        cyclient.get_arqs_for_instance.assert_not_called()

        bind.side_effect = None
        bind.return_value = [uuids.new]
        uuid = self.instance_uuids[0]
        flow_uuid = build.instance_flow_uuid(uuid)
        self.assertEqual(states.SUCCESS, self._resume_elsewhere(flow_uuid))

        cyclient.delete_arqs_by_uuid.assert_called_once_with(
            [getattr(uuids, 'old-' + uuid)])
        self.assertEqual([uuids.new], self.build.call_args[1]['accel_uuids'])

    def test_accelerators_stage_skips_requests_without_device_profile(self):
        bind = self.useFixture(fixtures.MockPatchObject(
            self.conductor, '_create_and_bind_arq_for_instance')).mock
        requested = objects.NetworkRequestList(objects=[
            objects.NetworkRequest(port_id=uuids.port)])

        self.assertEqual(states.SUCCESS, self._run(
            self._create_flow(requested_networks=requested)))

        bind.assert_not_called()
        for call in self.build.call_args_list:
            self.assertEqual([], call[1]['accel_uuids'])
            self.assertEqual([uuids.port], [
                r.port_id for r in call[1]['requested_networks']])

    def test_host_without_outcome_sets_the_instance_error(self):
        self.build.side_effect = exception.NovaException('timed out')

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        for uuid in self.instance_uuids:
            self.assertEqual(states.REVERTED, self._flow(uuid)[0].state)
            self.assertEqual(vm_states.ERROR,
                             self._instance(uuid)[1].vm_state)
            message, events = self._events(uuid)
            self.assertEqual(('Error', 'Error'),
                             (message, events['conductor_build_on_host']))
        self.claim.assert_not_called()

    def _test_host_is_asked_again(self, first_answer):
        self.useFixture(fixtures.MockPatch(
            'nova.orchestration.flows.boot.host.HOST_RETRY_INTERVAL', 0))
        self.build.side_effect = [
            first_answer, {'result': 'active', 'reason': None},
            {'result': 'active', 'reason': None}]

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        first = self.instance_uuids[0]
        self.assertEqual([(first, 'host1'), (first, 'host1')],
                         self._hosts()[:2])
        # Asked again, the host reports the build the first call started.
        self.assertEqual([False, True], [
            c[1]['asked_before'] for c in self.build.call_args_list
            if c[1]['instance'].uuid == first])
        self.assertEqual(states.SUCCESS, self._flow(first)[0].state)
        self.claim.assert_not_called()

    def test_host_without_outcome_is_asked_again(self):
        # The host restarted: it answers the call that followed.
        self._test_host_is_asked_again(messaging.MessagingTimeout())

    def test_host_stopping_during_the_build_is_asked_again(self):
        self._test_host_is_asked_again(
            {'result': build_results.UNFINISHED,
             'reason': 'The service on host host1 stopped.'})

    def test_stopping_conductor_stops_asking_the_host(self):
        engine = self.conductor.orchestration

        def stop_conductor(*args, **kwargs):
            engine.stop()
            raise messaging.MessagingTimeout()

        self.build.side_effect = stop_conductor

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        # Each instance's host was asked once. Its flow is left, as after
        # a crash, to the conductor that resumes it and asks again.
        self.assertEqual(2, self.build.call_count)
        for uuid in self.instance_uuids:
            row, stages = self._flow(uuid)
            self.assertEqual(states.RUNNING, row.state)
            self.assertEqual(('build-on-host', states.STAGE_RUNNING),
                             stages[-1])
            self.assertNotEqual(vm_states.ERROR,
                                self._instance(uuid)[1].vm_state)
            # The conductor resuming the stage reports it.
            _, events = self._events(uuid)
            self.assertNotIn('conductor_build_on_host', events)

        self.build.side_effect = None
        self.build.return_value = {'result': 'active', 'reason': None}
        other = engine_mod.Engine(owner='other',
                                  transient={'conductor': self.conductor})
        for uuid in self.instance_uuids:
            self.assertEqual(states.SUCCESS, other.run(
                self.ctxt, build.instance_flow_uuid(uuid)))
        self.assertEqual(4, self.build.call_count)

    def _start_build(self, **call):
        """What a host's build does first: it takes the build."""
        instance = self._instance(call['instance'].uuid)[1]
        instance.task_state = None
        instance.save(expected_launched_on=[call['host']])

    def test_host_stopped_during_its_build_sets_the_instance_error(self):
        # The host started the build, then stopped until the timeout: only
        # that host can undo what it did, no other host is asked.
        self.flags(host_restart_timeout=0, group='orchestration')

        def host_build(context, **call):
            self._start_build(**call)
            return {'result': build_results.UNFINISHED,
                    'reason': 'The service on host %s stopped.' %
                              call['host']}

        self.build.side_effect = host_build

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        first = self.instance_uuids[0]
        self.assertEqual(['host1'], self._hosts_of(first))
        row = self._flow(first)[0]
        self.assertEqual(states.REVERTED, row.state)
        self.assertIn(
            'Host host1 gave no outcome of the build within '
            '[orchestration]host_restart_timeout (0 s): The service on '
            'host host1 stopped.',
            persistence.decode(row.failure)['message'])
        instance = self._instance(first)[1]
        self.assertEqual(vm_states.ERROR, instance.vm_state)
        self.assertEqual('host1', instance.launched_on)
        self.report.delete_allocation_for_instance.assert_not_called()

    def test_host_giving_no_outcome_is_replaced_by_an_alternate(self):
        # host1 never started the build: the build moves to host2, and a
        # call to host1 arriving late cannot start it.
        self.flags(host_restart_timeout=0, group='orchestration')
        first, second = self.instance_uuids
        self.build.side_effect = [messaging.MessagingTimeout('gone'),
                                  {'result': 'active', 'reason': None},
                                  {'result': 'active', 'reason': None}]

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        self.assertEqual(['host1', 'host2'], self._hosts_of(first))
        row, stages = self._flow(first)
        self.assertEqual(states.SUCCESS, row.state)
        self.assertEqual(['REVERTED', 'SUCCESS'],
                         [state for name, state in stages
                          if name == 'build-on-host'])
        # No host released the allocation claimed for host1.
        self.report.delete_allocation_for_instance.assert_called_once_with(
            mock.ANY, first, force=True)
        self.assertEqual(1, self.claim.call_count)
        instance = self._instance(first)[1]
        self.assertEqual('host2', instance.launched_on)
        instance.task_state = None
        self.assertRaises(exception.InstanceUpdateConflict, instance.save,
                          expected_launched_on=['host1'])
        # Designed as a reschedule: no failed event.
        self.assertNotIn('Error', self._events(first)[1].values())
        self.assertEqual(['host2'], self._hosts_of(second))

    def test_hosts_not_back_in_time_set_the_instance_error(self):
        # No host started the build: each was given up on in turn and its
        # allocation released; the flow says why.
        self.flags(host_restart_timeout=0, group='orchestration')
        self.build.side_effect = messaging.MessagingTimeout()

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        # Each instance asked both its hosts.
        self.assertEqual(4, self.build.call_count)
        for uuid in self.instance_uuids:
            self.assertEqual(states.REVERTED, self._flow(uuid)[0].state)
            self.assertEqual(vm_states.ERROR,
                             self._instance(uuid)[1].vm_state)
            self.assertIn('Exceeded maximum number of retries',
                          self._fault(uuid).message)
        self.assertEqual(
            [mock.call(mock.ANY, uuid, force=True)
             for uuid in self.instance_uuids for _ in range(2)],
            self.report.delete_allocation_for_instance.call_args_list)

    def test_resumed_reschedule_after_no_outcome_keeps_the_alternate(self):
        # choose-host moved the build to host2 and its conductor stopped
        # before that was stored: the stage is run again and still finds
        # the build moved by none but itself.
        self.flags(host_restart_timeout=0, group='orchestration')
        first = self.instance_uuids[0]

        def host_build(context, **call):
            if call['host'] == 'host1':
                raise messaging.MessagingTimeout('gone')
            return {'result': 'active', 'reason': None}

        self.build.side_effect = host_build
        real = build_host.ChooseHost.next

        def next_then_crash(retry, *args, **kwargs):
            real(retry, *args, **kwargs)
            raise Crash()

        with mock.patch.object(build_host.ChooseHost, 'next',
                               next_then_crash):
            self.assertEqual(states.SUCCESS, self._run(self._create_flow()))
        self.assertEqual('host2', self._instance(first)[1].launched_on)

        self.assertEqual(states.SUCCESS, self._resume_elsewhere(
            build.instance_flow_uuid(first)))

        self.assertEqual(['host1', 'host2'], self._hosts_of(first))
        self.assertEqual(states.SUCCESS, self._flow(first)[0].state)
        self.assertEqual('host2', self._instance(first)[1].launched_on)

    def test_stage_event_is_written_once_with_the_stage_times(self):
        called_at = []

        def build(*args, **kwargs):
            called_at.append(timeutils.utcnow())
            return {'result': 'active', 'reason': None}

        self.build.side_effect = build
        starts = self.useFixture(fixtures.MockPatch(
            'nova.db.main.api.action_event_start',
            side_effect=main_db_api.action_event_start)).mock
        finishes = self.useFixture(fixtures.MockPatch(
            'nova.db.main.api.action_event_finish')).mock

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        # One write per instance: the event started and finished.
        self.assertEqual(2, starts.call_count)
        finishes.assert_not_called()
        uuid = self.instance_uuids[0]
        mapping, _ = self._instance(uuid)
        with nova_context.target_cell(self.ctxt,
                                      mapping.cell_mapping) as cctxt:
            action = objects.InstanceActionList.get_by_instance_uuid(
                cctxt, uuid)[0]
            event, = [e for e in objects.InstanceActionEventList.get_by_action(
                cctxt, action.id) if e.event == 'conductor_build_on_host']
        self.assertEqual('Success', event.result)
        self.assertLessEqual(event.start_time.replace(tzinfo=None),
                             called_at[0])
        self.assertGreaterEqual(event.finish_time.replace(tzinfo=None),
                                called_at[0])

    def test_stage_events_never_fail_a_stage(self):
        self.useFixture(fixtures.MockPatch(
            'nova.db.main.api.action_event_start',
            side_effect=exception.InstanceActionNotFound(
                request_id='r', instance_uuid='i')))

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        for uuid in self.instance_uuids:
            self.assertEqual(states.SUCCESS, self._flow(uuid)[0].state)

    def test_old_host_gets_the_legacy_cast(self):
        get_service = objects.Service.get_by_compute_host

        def get_by_compute_host(context, host):
            service = get_service(context, host)
            if host == 'host2':
                service.version = build_host.WAITING_BUILD_SERVICE_VERSION - 1
            return service

        self.useFixture(fixtures.MockPatchObject(
            objects.Service, 'get_by_compute_host',
            side_effect=get_by_compute_host))

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        calls = self.build.call_args_list
        self.assertTrue(calls[0][1]['wait'])
        self.assertNotIn('wait', calls[1][1])
        self.assertEqual('host2', calls[1][1]['host'])
        self.assertEqual(['host1'],
                         [s.service_host for s in calls[1][1]['host_list']])

    def _count_service_lookups(self):
        return self.useFixture(fixtures.MockPatchObject(
            objects.Service, 'get_by_compute_host',
            side_effect=objects.Service.get_by_compute_host)).mock

    def test_new_enough_host_is_looked_up_once(self):
        self.select.return_value = [[_selection('host1')],
                                    [_selection('host1')]]
        lookups = self._count_service_lookups()

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        self.assertEqual([True, True],
                         [c[1]['wait'] for c in self.build.call_args_list])
        self.assertEqual(1, lookups.call_count)
        # Until the compute RPC API is reset.
        self.conductor.reset()
        self.assertEqual(set(), self.conductor.waiting_build_hosts)

    def test_old_host_is_looked_up_at_each_build(self):
        self.select.return_value = [[_selection('host2')],
                                    [_selection('host2')]]
        self.useFixture(fixtures.MockPatch(
            'nova.orchestration.flows.boot.host.'
            'WAITING_BUILD_SERVICE_VERSION',
            objects.service.SERVICE_VERSION + 1))
        lookups = self._count_service_lookups()

        self.assertEqual(states.SUCCESS, self._run(self._create_flow()))

        self.assertEqual(2, self.build.call_count)
        self.assertNotIn('wait', self.build.call_args[1])
        self.assertEqual(2, lookups.call_count)

    def test_build_requested_again_after_a_crash(self):
        # The conductor died while the host built: the flow resumed by
        # another engine asks the host again, which reports the outcome.
        with mock.patch.object(build.BuildOnHost, 'execute',
                               side_effect=Crash()):
            # The request's handler does not wait for the builds.
            self.assertEqual(states.SUCCESS, self._run(self._create_flow()))
        flow_uuid = build.instance_flow_uuid(self.instance_uuids[0])
        self.assertEqual(states.RUNNING, self._flow(
            self.instance_uuids[0])[0].state)

        self.assertEqual(states.SUCCESS, self._resume_elsewhere(flow_uuid))
        self.assertEqual([(self.instance_uuids[0], 'host1')], self._hosts())
        # The resumed run cannot know whether the host was asked.
        self.assertTrue(self._host_call(self.instance_uuids[0])[1][
            'asked_before'])

    def _crash_before_the_first_host_builds(self, injected_files=None):
        """Run the request; its first instance's run dies at build-on-host.

        The request has the admin password 'pw'. Returns that instance's
        uuid.
        """
        real = build.BuildOnHost.execute
        crashed = self.instance_uuids[0]

        def execute(task, context, conductor, **inputs):
            if inputs['instance_uuid'] == crashed:
                raise Crash()
            return real(task, context, conductor, **inputs)

        with mock.patch.object(build.BuildOnHost, 'execute', execute):
            self.assertEqual(states.SUCCESS, self._run(
                self._create_flow(injected_files=injected_files,
                                  admin_password='pw'),
                admin_password='pw', injected_files=injected_files or []))
        # The first run built the other instance with the request's
        # context.
        self.assertEqual([(self.instance_uuids[1], 'host2')], self._hosts())
        return crashed

    def _host_call(self, instance_uuid):
        """The call that handed the instance's build to its host."""
        return next(c for c in self.build.call_args_list
                    if c[1]['instance'].uuid == instance_uuid)

    def _host_context(self, instance_uuid):
        """The context the instance's build was handed to its host with."""
        return self._host_call(instance_uuid)[0][0]

    def test_resumed_build_says_it_has_no_requester_token(self):
        # Without [orchestration]credential_keys the requester's token is
        # not stored: only a run resumed by another conductor lacks it,
        # and says so before the host builds.
        self.ctxt.auth_token = 'secret-token'
        crashed = self._crash_before_the_first_host_builds()
        warning = ("does not have the requester's token (nothing was "
                   "stored sealed: [orchestration]credential_keys was not "
                   "set where the build was requested): the requests of "
                   "host host1 to the networking")
        self.assertNotIn(warning, self.stdlog.logger.output)

        self.assertEqual(states.SUCCESS, self._resume_elsewhere(
            build.instance_flow_uuid(crashed)))
        self.assertIn(warning, self.stdlog.logger.output)
        self.assertIsNone(self._host_context(crashed).auth_token)
        # Nor has it the admin password.
        self.assertIsNone(self._host_call(crashed)[1]['admin_password'])

    def test_resumed_build_acts_with_the_sealed_token(self):
        # With keys, the flows store the request's token and catalog
        # sealed: a run resumed by another conductor hands the host the
        # requester's context as the first run would have.
        self.flags(credential_keys=[fernet.Fernet.generate_key().decode()],
                   group='orchestration')
        catalog = [{'type': 'network', 'name': 'neutron', 'endpoints': []}]
        self.ctxt.auth_token = 'secret-token'
        self.ctxt.service_catalog = catalog
        crashed = self._crash_before_the_first_host_builds()
        # The crashed flow holds the token sealed, never in clear.
        row, _ = self._flow(crashed)
        self.assertEqual(states.RUNNING, row.state)
        self.assertIn(credentials.SEALED, row.inputs)
        self.assertNotIn('secret-token', row.inputs)

        self.assertEqual(states.SUCCESS, self._resume_elsewhere(
            build.instance_flow_uuid(crashed)))
        context = self._host_context(crashed)
        self.assertEqual('secret-token', context.auth_token)
        self.assertEqual(catalog, context.service_catalog)
        self.assertEqual('fake-user', context.user_id)
        self.assertNotIn("does not have the requester's token",
                         self.stdlog.logger.output)
        self.assertIn("the requests of host host1 to the networking, volume "
                      "and image services (ports, volume attachments, the "
                      "image download) are made with the requester's token, "
                      "stored sealed in its flow", self.stdlog.logger.output)
        # The flows dropped what they sealed when they ended.
        flows = persistence.list_flows(self.ctxt)
        self.assertEqual({states.SUCCESS}, {row.state for row in flows})
        self.assertEqual(3, len(flows))
        for row in flows:
            self.assertNotIn(credentials.SEALED, row.inputs)
            self.assertEqual(
                'fake-user',
                persistence.decode(row.inputs)['requester']['user_id'])

    def test_resumed_build_has_the_sealed_secrets(self):
        # With keys, the request's admin password and personality files
        # are stored sealed: a run resumed by another conductor hands them
        # to the host as the first run would have.
        self.flags(credential_keys=[fernet.Fernet.generate_key().decode()],
                   group='orchestration')
        files = [('/etc/motd', 'secret-file')]
        crashed = self._crash_before_the_first_host_builds(files)

        self.assertEqual(states.SUCCESS, self._resume_elsewhere(
            build.instance_flow_uuid(crashed)))
        arguments = self._host_call(crashed)[1]
        self.assertEqual('pw', arguments['admin_password'])
        self.assertEqual([list(f) for f in files],
                         [list(f) for f in arguments['injected_files']])
        for row in persistence.list_flows(self.ctxt):
            self.assertNotIn('secret-file', row.inputs)
            self.assertNotIn('"pw"', row.inputs)

    def test_resumed_build_without_the_sealing_key_says_so(self):
        self.flags(credential_keys=[fernet.Fernet.generate_key().decode()],
                   group='orchestration')
        self.ctxt.auth_token = 'secret-token'
        crashed = self._crash_before_the_first_host_builds()
        # The conductor taking over has another key.
        self.flags(credential_keys=[fernet.Fernet.generate_key().decode()],
                   group='orchestration')

        self.assertEqual(states.SUCCESS, self._resume_elsewhere(
            build.instance_flow_uuid(crashed)))
        self.assertIsNone(self._host_context(crashed).auth_token)
        self.assertIn("does not have the requester's token (it was stored "
                      "sealed with a key that is not in this conductor's "
                      "[orchestration]credential_keys",
                      self.stdlog.logger.output)

    def test_flows_a_sweep_starts_say_they_have_no_requester_token(self):
        # A sweep builds a request whose conductor never did (its cast was
        # lost): the instance flows it starts act without the token too.
        self.assertEqual(states.SUCCESS, self.conductor.orchestration.run(
            nova_context.get_admin_context(), self._create_flow()))
        self.assertEqual(list(zip(self.instance_uuids, ('host1', 'host2'))),
                         self._hosts())
        for host in ('host1', 'host2'):
            self.assertIn("(nothing was stored sealed: [orchestration]"
                          "credential_keys was not set where the build was "
                          "requested): the requests of host %s to the "
                          "networking" % host, self.stdlog.logger.output)

    def test_build_that_lost_the_token_ends_before_its_host(self):
        # The request had a token, and no key sealed it: a sweep builds
        # the request whose conductor never did. No host is asked to
        # build (its requests as the requester would be refused on every
        # alternate); each build ends ERROR with the reason as its fault.
        self.ctxt.auth_token = 'secret-token'
        flow_uuid = self._create_flow()
        self.assertNotIn('secret-token', persistence.load(
            self.ctxt, flow_uuid)[0].inputs)

        self.assertEqual(states.SUCCESS, self.conductor.orchestration.run(
            nova_context.get_admin_context(), flow_uuid))

        self.build.assert_not_called()
        for uuid in self.instance_uuids:
            row, _ = self._flow(uuid)
            self.assertEqual(states.REVERTED, row.state)
            self.assertIn(
                "it was resumed without the requester's token (nothing was "
                "stored sealed: [orchestration]credential_keys was not set "
                "where the build was requested), which the requests of host",
                persistence.decode(row.failure)['message'])
            _, instance = self._instance(uuid)
            self.assertEqual(vm_states.ERROR, instance.vm_state)

    def test_interrupted_build_without_the_token_asks_its_host(self):
        # The interrupted run may have asked the host, which then reports
        # its build: the resumed run asks it, without the token.
        self.ctxt.auth_token = 'secret-token'
        crashed = self._crash_before_the_first_host_builds()

        self.assertEqual(states.SUCCESS, self._resume_elsewhere(
            build.instance_flow_uuid(crashed)))
        self.assertTrue(self._host_call(crashed)[1]['asked_before'])
        self.assertIsNone(self._host_context(crashed).auth_token)
