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

"""The stages of a build-instance flow before its host.

Create the instance in its cell, record it, delete its BuildRequest (the
commit point) and create its accelerator requests.
"""

import functools

from oslo_db import exception as db_exc
from oslo_log import log as logging

from nova.accelerator import cyborg
from nova import availability_zones
from nova.compute import instance_actions
from nova.compute import vm_states
from nova import context as nova_context
from nova import exception
from nova import notifications
from nova import objects
from nova.orchestration.flows.boot import common
from nova.orchestration.flows.boot import events
from nova.orchestration import persistence
from nova.orchestration import task
from nova.scheduler import utils as scheduler_utils

LOG = logging.getLogger(__name__)


class InstanceTask(task.Task):
    """A stage of a build-instance flow."""

    on_crash = task.RERUN

    #: The instance fields the stage loads (in one query).
    instance_attrs = ['flavor', 'tags']

    @classmethod
    def _instance(cls, context, instance_uuid, cell_uuid):
        cell = objects.CellMapping.get_by_uuid(context, cell_uuid)
        with nova_context.target_cell(context, cell) as cctxt:
            instance = objects.Instance.get_by_uuid(
                cctxt, instance_uuid, expected_attrs=cls.instance_attrs)
        return instance, cell

    @classmethod
    def _get(cls, context, instance_uuid, cell_uuid, loaded=None):
        """The instance and its cell, kept or loaded.

        The run that created the instance keeps it in memory (the
        ``loaded`` transient value) until the host builds it, as the
        inline code did; any other run loads it.
        """
        if loaded:
            return loaded['instance'], loaded['cell']
        return cls._instance(context, instance_uuid, cell_uuid)

    @staticmethod
    def _spec(context, instance_uuid, spec_fields, requested_networks,
              loaded=None):
        """The instance's RequestSpec, kept or loaded (see _get)."""
        if loaded:
            return loaded['spec']
        return common.request_spec(context, instance_uuid, spec_fields,
                                   requested_networks)

    @classmethod
    def _load(cls, context, requester, instance_uuid, cell_uuid, spec_fields,
              requested_networks, loaded=None):
        """The requester's context, the instance, its cell and RequestSpec."""
        context = common.user_context(context, requester)
        instance, cell = cls._get(context, instance_uuid, cell_uuid, loaded)
        spec = cls._spec(context, instance_uuid, spec_fields,
                         requested_networks, loaded)
        return context, instance, cell, spec


class CreateInstance(InstanceTask):
    """Create the instance in the cell of its selected host.

    Ends the build when the user deleted the server first, when the host is
    not mapped to a cell or when the quota recheck fails. Its revert ends
    a build that failed at any stage as nova did: the instance ERROR with
    the failure as its fault (buried in cell0 if it was not created).
    """

    name = 'create-instance'
    requires = ('conductor', 'requester', 'instance_uuid', 'num_instances',
                'selections', 'spec_fields', 'requested_networks',
                'block_device_mapping', 'tags', 'request_specs', 'loaded')
    provides = 'cell_uuid'

    def execute(self, context, conductor, requester, instance_uuid,
                num_instances, selections, spec_fields, requested_networks,
                block_device_mapping, tags, request_specs, loaded):
        context = common.user_context(context, requester)
        host = common.from_primitive(selections[0])
        try:
            build_request = objects.BuildRequest.get_by_instance_uuid(
                context, instance_uuid)
        except exception.BuildRequestNotFound:
            LOG.debug('While scheduling instance, the build request was '
                      'already deleted.', instance_uuid=instance_uuid)
            raise exception.BuildEnded(uuid=instance_uuid,
                                       reason='the server was deleted')
        instance = build_request.get_new_instance(context)
        spec = common.request_spec(context, instance_uuid, spec_fields,
                                   requested_networks, request_specs)
        cell = self._cell(context, host)
        instance.availability_zone = (
            availability_zones.get_host_availability_zone(
                context, host.service_host))
        # The host asked to build it: only that host may start the build
        # (see host.ChooseHost).
        instance.launched_on = host.service_host
        with nova_context.target_cell(context, cell) as cctxt:
            with instance.obj_alternate_context(cctxt):
                try:
                    instance.create()
                    created = True
                except db_exc.DBDuplicateEntry:
                    # Created by an execution of this stage cut short: the
                    # failed insert rolled back with all it wrote.
                    created = False
        conductor._recheck_quota(
            context, instance.flavor, spec, num_instances,
            project_id=instance.project_id, user_id=instance.user_id)
        if created and loaded is not None:
            loaded.update(instance=instance, cell=cell, spec=spec)
        return cell.uuid

    @staticmethod
    def _cell(context, host):
        """The cell of the selected host."""
        try:
            return objects.HostMapping.get_by_host(
                context, host.service_host).cell_mapping
        except exception.HostMappingNotFound:
            LOG.error('No host-to-cell mapping found for selected host '
                      '%(host)s. Setup is incomplete.',
                      {'host': host.service_host})
            raise

    def revert(self, context, result, failure, conductor, requester,
               instance_uuid, num_instances, selections, spec_fields,
               requested_networks, block_device_mapping, tags,
               request_specs, loaded):
        """Set the instance ERROR with the failure as its fault.

        Before the commit point, as schedule_and_build_instances did: with
        the BuildRequest gone, the server was deleted and is forgotten;
        an instance not created is buried in cell0. After it (no
        BuildRequest, the instance in its cell), as build_instances did
        when a reschedule failed. An instance the host set ERROR, or that
        was deleted meanwhile, is left as it is, unless the build was
        aborted: then the instance gets the abort as its fault, and loses
        its allocation, as a build that failed on its host does.
        """
        context = common.user_context(context, requester)
        aborted = failure.type == persistence.ABORTED['type']
        try:
            build_request = objects.BuildRequest.get_by_instance_uuid(
                context, instance_uuid)
        except exception.BuildRequestNotFound:
            build_request = None
        instance = cell = None
        try:
            if result is not None:
                instance, cell = self._instance(context, instance_uuid,
                                                result)
            elif build_request is not None:
                cell = self._cell(context,
                                  common.from_primitive(selections[0]))
                instance = self._instance(context, instance_uuid,
                                          cell.uuid)[0]
        except (exception.HostMappingNotFound, exception.InstanceNotFound):
            pass
        if build_request is None and result is None:
            common.forget_deleted(context, conductor, instance_uuid)
            return
        if instance is None and (build_request is None or
                                 result is not None):
            LOG.debug('The server was deleted during its build',
                      instance_uuid=instance_uuid)
            return
        if (instance is not None and not aborted and
                instance.vm_state == vm_states.ERROR):
            return
        spec = common.request_spec(context, instance_uuid, spec_fields,
                                   requested_networks, request_specs)
        bdms = common.from_primitive(block_device_mapping, context)
        if instance is None:
            cleanup = functools.partial(
                conductor._bury_in_cell0, context, spec,
                build_requests=[build_request], block_device_mapping=bdms,
                tags=common.tags(tags))
        elif build_request is not None:
            def cleanup(exc):
                conductor._cleanup_build_artifacts(
                    context, exc, [instance], [build_request], [spec], bdms,
                    common.tags(tags), {instance.uuid: cell})
        else:
            cleanup = functools.partial(
                fail_build, context, conductor, instance=instance, cell=cell,
                spec=spec, requested_networks=requested_networks)
        common.while_handling(failure, cleanup)
        if aborted:
            # The scheduler's claim, or that of an alternate.
            conductor.report_client.delete_allocation_for_instance(
                context, instance_uuid, force=True)


class RecordInstance(InstanceTask):
    """Notify, start the create action, store BDMs and tags, map the cell."""

    name = 'record-instance'
    requires = ('conductor', 'requester', 'instance_uuid', 'cell_uuid',
                'block_device_mapping', 'tags', 'loaded')

    def execute(self, context, conductor, requester, instance_uuid,
                cell_uuid, block_device_mapping, tags, loaded):
        self._record(context, conductor, requester, instance_uuid, cell_uuid,
                     block_device_mapping, tags, loaded, started_before=False)

    def execute_again(self, context, conductor, requester, instance_uuid,
                      cell_uuid, block_device_mapping, tags, loaded):
        """Start the create action unless the interrupted execution did."""
        self._record(context, conductor, requester, instance_uuid, cell_uuid,
                     block_device_mapping, tags, loaded, started_before=True)

    def _record(self, context, conductor, requester, instance_uuid, cell_uuid,
                block_device_mapping, tags, loaded, started_before):
        context = common.user_context(context, requester)
        instance, cell = self._get(context, instance_uuid, cell_uuid, loaded)
        with nova_context.target_cell(context, cell) as cctxt, \
                instance.obj_alternate_context(cctxt):
            # This can lazy-load attributes on the instance.
            notifications.send_update_with_states(
                cctxt, instance, None, vm_states.BUILDING, None, None,
                service='conductor')
            if not started_before or objects.InstanceAction.get_by_request_id(
                    cctxt, instance.uuid, context.request_id) is None:
                objects.InstanceAction.action_start(
                    cctxt, instance.uuid, instance_actions.CREATE,
                    want_result=False)
            bdms = common.from_primitive(block_device_mapping, context)
            if bdms:
                for index, bdm in enumerate(bdms):
                    if not bdm.obj_attr_is_set('uuid'):
                        bdm.uuid = common.bdm_uuid(instance_uuid, index)
                bdms = conductor._create_block_device_mapping(
                    cell, instance.flavor, instance.uuid, bdms)
            tags = conductor._create_tags(cctxt, instance.uuid,
                                          common.tags(tags))
        if loaded:
            # The records the host gets, as the inline code gave them.
            loaded['bdms'] = bdms
        # As the inline code did: the host's instance.create notification
        # then need not load them.
        instance.tags = tags or objects.TagList()
        conductor._map_instance_to_cell(context, instance, cell)

    def revert(self, context, result, failure, **unused):
        """Nothing to undo: the ERROR instance keeps what it recorded."""


class DeleteBuildRequest(InstanceTask):
    """The commit point: delete the BuildRequest with the stage's record.

    If the user deleted the server meanwhile, the build ends and the
    stage's revert removes the instance, its BDMs and tags from the cell.
    """

    name = 'delete-build-request'
    requires = ('conductor', 'requester', 'instance_uuid', 'cell_uuid',
                'tags')
    transactional = True

    def execute(self, context, conductor, requester, instance_uuid,
                cell_uuid, tags):
        # The engine's context carries the stage's API DB transaction.
        build_request = objects.BuildRequest(
            context, instance_uuid=instance_uuid)
        try:
            build_request.destroy()
        except exception.BuildRequestNotFound:
            raise exception.BuildEnded(uuid=instance_uuid,
                                       reason='the server was deleted')

    def revert(self, context, result, failure, conductor, requester,
               instance_uuid, cell_uuid, tags):
        """Remove the instance of a server deleted before the commit point.

        The BuildRequest cannot come back once deleted: after the commit
        point, there is nothing to undo.
        """
        if failure.record.get('stage') != self.name:
            return
        # _delete_build_request finds the BuildRequest gone and removes
        # what the build created in the cell.
        user_context = nova_context.RequestContext.from_dict(requester)
        build_request = objects.BuildRequest(
            user_context, instance_uuid=instance_uuid)
        try:
            instance, cell = self._instance(user_context, instance_uuid,
                                            cell_uuid)
        except exception.InstanceNotFound:
            return
        instance, cell = self._instance(user_context, instance_uuid,
                                        cell_uuid)
        with nova_context.target_cell(user_context, cell) as cctxt:
            bdms = objects.BlockDeviceMappingList.get_by_instance_uuid(
                cctxt, instance.uuid)
        conductor._delete_build_request(
            user_context, build_request, instance, cell, bdms,
            common.tags(tags))


class Accelerators(InstanceTask):
    """Create and bind the instance's accelerator requests in Cyborg.

    Provides the ARQ uuids and the requested networks with the ARQ of each
    port that asked for a device profile, as the host needs both. For an
    instance whose flavor and ports ask for no device profile, it does
    nothing and is not reported as an event. Executed again after a
    crash, it first deletes the ARQs the interrupted execution bound, so
    that the host is given one set.
    """

    name = 'accelerators'
    requires = ('conductor', 'requester', 'instance_uuid', 'cell_uuid',
                'selections', 'spec_fields', 'requested_networks', 'loaded')
    provides = 'accelerators'

    def execute(self, context, conductor, requester, instance_uuid,
                cell_uuid, selections, spec_fields, requested_networks,
                loaded):
        return self._create(
            context, conductor, requester, instance_uuid, cell_uuid,
            selections[0], 1, spec_fields, requested_networks, loaded)

    def execute_again(self, context, conductor, requester, instance_uuid,
                      cell_uuid, selections, spec_fields, requested_networks,
                      loaded):
        """Delete the ARQs the interrupted execution bound, then execute.

        Unbound ones name no instance and cannot be found.
        """
        return self._create_again(
            context, conductor, requester, instance_uuid, cell_uuid,
            selections[0], 1, spec_fields, requested_networks, loaded)

    def _create(self, context, conductor, requester, instance_uuid,
                cell_uuid, host, attempt, spec_fields, requested_networks,
                loaded):
        """Create and bind the ARQs for the host's node.

        :param host: the primitive of the Selection the ARQs are bound for
        :param attempt: the number of the attempt to build on that host
        """
        run_context = context
        context = common.user_context(context, requester)
        instance, cell = self._get(context, instance_uuid, cell_uuid, loaded)
        networks = common.from_primitive(requested_networks)
        if not self._asks_for_devices(instance, networks):
            return {'uuids': [], 'requested_networks': requested_networks}
        common.require_token(run_context, requester, instance_uuid,
                             'the requests to Cyborg')
        spec = self._spec(context, instance_uuid, spec_fields,
                          requested_networks, loaded)
        host = common.from_primitive(host)
        with events.stage_event(context, cell, instance.uuid, self.name,
                                attempt):
            scheduler_utils.fill_provider_mapping(spec, host)
            # This sets the arq_uuid of the requested ports.
            accel_uuids = conductor._create_and_bind_arq_for_instance(
                context, instance, host.nodename, spec, networks)
            return {'uuids': accel_uuids,
                    'requested_networks': common.primitive(networks)}

    def revert(self, context, result, failure, **unused):
        """Nothing to undo here: create-instance's revert deletes them.

        With the instance's other build resources, as build_instances did;
        a host that reports the build reschedulable deleted them already.
        """

    @staticmethod
    def _asks_for_devices(instance, requested_networks):
        return bool(instance.flavor.extra_specs.get('accel:device_profile') or
                    any(net.port_id and net.device_profile
                        for net in requested_networks or []))

    def _create_again(self, context, conductor, requester, instance_uuid,
                      cell_uuid, host, attempt, spec_fields,
                      requested_networks, loaded):
        self._delete_bound_requests(context, requester, instance_uuid,
                                    cell_uuid, requested_networks, loaded)
        return self._create(
            context, conductor, requester, instance_uuid, cell_uuid, host,
            attempt, spec_fields, requested_networks, loaded)

    def _delete_bound_requests(self, context, requester, instance_uuid,
                               cell_uuid, requested_networks, loaded):
        context = common.user_context(context, requester)
        instance, _ = self._get(context, instance_uuid, cell_uuid, loaded)
        if not self._asks_for_devices(
                instance, common.from_primitive(requested_networks)):
            return
        cyclient = cyborg.get_client(context)
        bound = [arq['uuid'] for arq in
                 cyclient.get_arqs_for_instance(instance.uuid)]
        if bound:
            LOG.info('Deleting accelerator requests %s bound by an '
                     'interrupted execution of this stage', bound,
                     instance=instance)
            cyclient.delete_arqs_by_uuid(bound)


def fail_build(context, conductor, exc, instance, cell, spec,
                requested_networks):
    """Set the instance ERROR after the commit point, as build_instances
    did when a reschedule failed: fault, notification, networks, ARQs.
    """
    with nova_context.target_cell(context, cell) as cctxt:
        with instance.obj_alternate_context(cctxt):
            conductor._cleanup_when_reschedule_fails(
                cctxt, instance, exc, spec.to_legacy_request_spec_dict(),
                common.from_primitive(requested_networks))
