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

"""Booting servers: the conductor's part as stored, resumable stages.

A ``build-request`` flow schedules every instance of an API request at once
and creates one ``build-instance`` flow per instance, which creates the
instance in its cell, deletes the BuildRequest and hands the instance to
its compute host. Version 1 ends with the ``build_and_run_instance`` cast
that compute hosts accept today. See ``doc/source/devref/build-flow.rst``.

The stages call the same ComputeTaskManager helpers that
``schedule_and_build_instances`` used, through the ``conductor`` transient
value, and clean up after a failure exactly as it did; a stage that ends a
build (the user deleted the server, scheduling failed, quota was exceeded)
raises once that is done, so the flow ends REVERTED with the reason stored.
"""

import contextlib
import copy
import threading
import time
import uuid

from oslo_db import exception as db_exc
from oslo_limit import exception as limit_exceptions
from oslo_log import log as logging
import oslo_messaging as messaging
from oslo_serialization import jsonutils
from oslo_utils import excutils
from oslo_utils import timeutils
import sqlalchemy as sa

from nova.accelerator import cyborg
from nova import availability_zones
from nova.compute import build_results
from nova.compute import instance_actions
from nova.compute import vm_states
import nova.conf
from nova import context as nova_context
from nova.db.api import api as api_db_api
from nova.db.api import models as api_models
from nova.db.main import api as main_db_api
from nova import exception
from nova import notifications
from nova import objects
from nova.objects import base as obj_base
from nova.objects import instance as instance_obj
from nova.orchestration import credentials
from nova.orchestration import persistence
from nova.orchestration import task
from nova.scheduler import utils as scheduler_utils

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

REQUEST_KIND = 'build-request'
INSTANCE_KIND = 'build-instance'
VERSION = 1
# Version 2 of build-instance waits for the host's build and reschedules
# to the stored alternates itself (compute service version 75).
INSTANCE_VERSION = 2
WAITING_BUILD_SERVICE_VERSION = 75
# Seconds between two calls to a host that gave no outcome of a build.
HOST_RETRY_INTERVAL = 5
# What a host reports as reschedulable: try the next alternate.
_RESCHEDULE = (build_results.RESCHEDULED,
               build_results.RESCHEDULED_BY_POLICY)
# Never stored: the manager whose clients the stages use, what the request
# carries that must not be written to the database, the RequestSpecs the
# request carries (by instance uuid), the event a build-instance flow sets
# once it hands its build to a host, and the dict in which its run keeps
# the instance it created, with its cell, RequestSpec and block device
# mappings, for the next stages (see _InstanceTask._load).
TRANSIENT = ('conductor', 'admin_password', 'injected_files',
             'request_specs', 'handed_to_host', 'loaded')
# RequestSpec fields its database record does not keep
# (RequestSpec._get_update_primitives); the flow stores them.
SPEC_FIELDS = ('requested_resources', 'requested_destination',
               'request_level_params', 'network_metadata')
# The instance fields a host's build reads: sent loaded, the host need not
# load them one at a time, as it need not for the instance the conductor
# created in its build before build flows.
HOST_BUILD_ATTRS = instance_obj.INSTANCE_DEFAULT_FIELDS + [
    'flavor', 'tags', 'keypairs', 'numa_topology', 'pci_requests',
    'trusted_certs']
# The build flows have uuids derived from their instances': a schedule
# stage executed again finds the flows an earlier execution made, and a
# conductor finds the flow nova-api stored for the request it casts.
_NAMESPACE = uuid.UUID('5b7a4e02-8d3f-4c61-9a7e-1f2b3c4d5e6f')


def instance_flow_uuid(instance_uuid):
    """The uuid of the build-instance flow of an instance."""
    return str(uuid.uuid5(_NAMESPACE, instance_uuid))


def request_flow_uuid(instance_uuid):
    """The uuid of the build-request flow of a request's first instance."""
    return str(uuid.uuid5(_NAMESPACE, REQUEST_KIND + ':' + instance_uuid))


# -- stored values ---------------------------------------------------------

def _primitive(value):
    if value is None:
        return None
    if isinstance(value, list):
        return [_primitive(item) for item in value]
    return value.obj_to_primitive()


def _object(primitive, context=None):
    if primitive is None:
        return None
    if isinstance(primitive, list):
        return [_object(item, context) for item in primitive]
    return obj_base.NovaObject.obj_from_primitive(primitive, context)


def _context_record(context, secrets=None):
    """The request context; its token, service catalog and the request's
    secrets only sealed (see nova.orchestration.credentials).
    """
    values = context.to_dict()
    for key in ('auth_token', 'service_catalog'):
        values.pop(key, None)
    sealed = credentials.seal(context, secrets)
    if sealed is not None:
        values[credentials.SEALED] = sealed
    return values


def _unsealed(record):
    """What the context record holds sealed, or {}."""
    return credentials.unseal(record.get(credentials.SEALED)) or {}


def _request_secret(inputs, name):
    """A transient secret of the request, else the one sealed in its flow.

    The run the request's handler starts has the request's admin password
    and personality files as transient values; a run resumed by another
    conductor has them only if the flow stored them sealed.
    """
    value = inputs[name]
    if value is None:
        value = _unsealed(inputs['requester']).get('secrets', {}).get(name)
    return value


def _without_sealed(inputs):
    """The inputs of an ended build flow without its sealed values.

    The requester's token and the request's secrets are kept only while
    the flow may need them; None if nothing was sealed.
    """
    requester = inputs.get('requester')
    if not isinstance(requester, dict) or credentials.SEALED not in requester:
        return None
    requester = dict(requester)
    del requester[credentials.SEALED]
    return dict(inputs, requester=requester)


def request_inputs(context, request_spec, instance_uuids, image,
                   requested_networks, block_device_mapping, tags,
                   injected_files, admin_password=None):
    """The stored inputs of a build-request flow."""
    fields = {}
    for name in SPEC_FIELDS:
        if request_spec.obj_attr_is_set(name):
            value = getattr(request_spec, name)
            if name == 'requested_destination' and value is not None:
                # A build never targets a cell; a CellMapping holds
                # credentials, so none is stored.
                value = value.obj_clone()
                value.cell = None
            fields[name] = _primitive(value)
    return {
        'requester': _context_record(context, {
            'admin_password': admin_password,
            'injected_files': injected_files}),
        'instance_uuids': list(instance_uuids),
        'image': image,
        'spec_fields': fields,
        'requested_networks': _primitive(requested_networks),
        'block_device_mapping': _primitive(
            list(block_device_mapping or [])),
        'tags': [t.tag for t in tags or []],
        'has_injected_files': bool(injected_files),
    }


def create_request_flow(context, request_specs, image, requested_networks,
                        block_device_mapping, tags, injected_files,
                        admin_password=None):
    """Store the build-request flow of an API request; return its uuid.

    The flow is held for the conductor that starts it with the request's
    secrets; a sweep builds the request if that conductor never does
    (with the secrets only if they were sealed in the flow).
    """
    instance_uuids = [spec.instance_uuid for spec in request_specs]
    inputs = request_inputs(context, request_specs[0], instance_uuids, image,
                            requested_networks, block_device_mapping, tags,
                            injected_files, admin_password)
    return persistence.create_flow(
        context, REQUEST_KIND, VERSION, inputs,
        instance_uuid=instance_uuids[0], request_id=context.request_id,
        uuid=request_flow_uuid(instance_uuids[0]),
        hold_seconds=CONF.orchestration.lease_duration)


def _forget_deleted(context, conductor, instance_uuid):
    """Forget an instance whose server was deleted before it was created.

    An instance mapped to a cell was built without this flow (by a
    conductor that predates it): it is left alone.
    """
    try:
        mapping = objects.InstanceMapping.get_by_instance_uuid(
            context, instance_uuid)
    except exception.InstanceMappingNotFound:
        mapping = None
    if mapping is not None:
        if mapping.cell_mapping is not None:
            return
        mapping.destroy()
    conductor.report_client.delete_allocation_for_instance(
        context, instance_uuid, force=True)


def _resumed(context, record):
    """Whether a run's own context is not the request's.

    A run resumed by a sweep runs with the conductor's admin context.
    """
    return context.request_id != record.get('request_id')


def _user_context(context, record):
    """The requester's context: the running one if it is the same request.

    A resumed run acts for the requester as the first run did, with a
    context rebuilt from the record, with the token and service catalog
    it holds sealed, if any (see nova.orchestration.credentials).
    """
    if not _resumed(context, record):
        return context
    values = dict(record)
    values.pop(credentials.SEALED, None)
    unsealed = _unsealed(record)
    values.update(auth_token=unsealed.get('auth_token'),
                  service_catalog=unsealed.get('service_catalog'))
    return nova_context.RequestContext.from_dict(values)


def _request_spec(context, instance_uuid, spec_fields, requested_networks,
                  sent=None):
    """The instance's RequestSpec: the one the request carried, else read.

    :param sent: the request's RequestSpecs by instance uuid, which the run
        of the conductor that received the request has; a resumed run
        rebuilds the spec from its record and the flow's inputs.
    """
    if sent and instance_uuid in sent:
        return sent[instance_uuid]
    spec = objects.RequestSpec.get_by_instance_uuid(context, instance_uuid)
    for name, value in spec_fields.items():
        setattr(spec, name, _object(value))
    spec.requested_networks = (_object(requested_networks) or
                               objects.NetworkRequestList(objects=[]))
    return spec


@api_db_api.context_manager.reader
def _any_build_request(context, instance_uuids):
    """Whether a BuildRequest of any of the instances is left.

    Read without loading one: a BuildRequest holds a whole serialized
    instance.
    """
    query = sa.select(api_models.BuildRequest.id).where(
        api_models.BuildRequest.instance_uuid.in_(instance_uuids)).limit(1)
    return context.session.execute(query).first() is not None


def _tags(tags):
    return [objects.Tag(tag=tag) for tag in tags]


@contextlib.contextmanager
def _stage_event(context, cell, instance_uuid, stage, attempt=1):
    """Report a stage as an event of the instance's create action.

    Users and operators see the stages where they see the host's build
    (``compute__do_build_and_run_instance``): in the instance action's
    events, as ``conductor_<stage>``, with ``_<attempt>`` appended from the
    second attempt of a retried stage on (an event is finished by its
    name). As for the host's build event, a build the stage
    ends as designed (BuildEnded, a reschedule) is reported by the
    instance's state and fault, not by an event error; an unexpected error
    fails the event. Reporting never fails the stage.

    The event is written when the stage ends, with the stage's start and
    finish times: one write to the cell database where starting and then
    finishing it took two. While the stage runs, the host's own event
    shows the build.
    """
    name = 'conductor_' + stage.replace('-', '_')
    if attempt > 1:
        name += '_%d' % attempt
    start_time = timeutils.utcnow()
    report = True
    exc_info = (None, None)
    try:
        yield
    except (exception.BuildEnded, exception.RescheduledException):
        raise
    except exception.OrchestrationEngineStopped:
        # As after a crash: the conductor resuming the stage reports it.
        report = False
        raise
    except Exception as exc:
        exc_info = (exc, exc.__traceback__)
        raise
    finally:
        if report:
            _write_event(context, cell, instance_uuid, name, start_time,
                         *exc_info)


def _write_event(context, cell, instance_uuid, name, start_time, exc_val,
                 exc_tb):
    """Write a stage's event, started and finished; never raise."""
    event = objects.InstanceActionEvent
    try:
        with nova_context.target_cell(context, cell) as cctxt:
            values = event.pack_action_event_start(
                cctxt, instance_uuid, name, host=CONF.host)
            values['start_time'] = start_time
            if exc_tb is None:
                values.update(event.pack_action_event_finish(
                    cctxt, instance_uuid, name))
            main_db_api.action_event_start(cctxt, values)
            if exc_tb is not None:
                # nova's finish also marks the action as failed.
                event.event_finish_with_failure(
                    cctxt, instance_uuid, name, exc_val=exc_val,
                    exc_tb=exc_tb, want_result=False)
    except Exception:
        LOG.warning('Could not report event %s of the build', name,
                    instance_uuid=instance_uuid, exc_info=True)


# -- build-request ---------------------------------------------------------

class Schedule(task.Task):
    """Select a host and alternates for every instance of the request.

    Then create one build-instance flow per instance, carrying its
    selections. Executed again after a crash, it finds those flows, or
    releases the claims of the interrupted execution and schedules again.
    A scheduling failure buries the request's instances in cell0.
    """

    name = 'schedule'
    requires = ('conductor', 'requester', 'instance_uuids', 'image',
                'spec_fields', 'requested_networks', 'block_device_mapping',
                'tags', 'has_injected_files', 'request_specs')
    provides = 'instance_flows'
    on_crash = task.RERUN

    def execute(self, context, conductor, **inputs):
        # Only a resumed run can find the request built by a conductor
        # that predates this flow. The run of the conductor the request
        # was cast to leaves servers deleted meanwhile to create-instance,
        # as the inline code did.
        resumed = _resumed(context, inputs['requester'])
        context = _user_context(context, inputs['requester'])
        uuids = inputs['instance_uuids']
        flow_uuids = [instance_flow_uuid(u) for u in uuids]
        if resumed and not _any_build_request(context, uuids):
            # Deleted by the user, or built without this flow.
            for instance_uuid in uuids:
                _forget_deleted(context, conductor, instance_uuid)
            raise exception.BuildEnded(uuid=', '.join(uuids),
                                       reason='no build request is left')
        spec = _request_spec(context, uuids[0], inputs['spec_fields'],
                             inputs['requested_networks'],
                             inputs['request_specs'])
        try:
            try:
                host_lists = conductor._schedule_instances(
                    context, spec, uuids, return_alternates=True)
            except exception.NoValidHost:
                # The scheduler only claims for new consumers: an
                # interrupted execution's claims make it fail. Release
                # them and try once more.
                if not self._release_claims(context, conductor, uuids):
                    raise
                host_lists = conductor._schedule_instances(
                    context, spec, uuids, return_alternates=True)
        except Exception as exc:
            LOG.exception('Failed to schedule instances')
            self._bury(context, conductor, spec, exc, inputs)
            raise exception.BuildEnded(uuid=', '.join(uuids),
                                       reason='scheduling failed: %s' % exc)
        try:
            self._create_flows(context, flow_uuids, uuids, host_lists,
                               inputs)
        except db_exc.DBDuplicateEntry:
            # A stale owner of this flow created them meanwhile.
            LOG.warning('Build flows of %s exist already', uuids)
        return flow_uuids

    def execute_again(self, context, **inputs):
        """Find the flows the interrupted execution made, else execute."""
        flow_uuids = [instance_flow_uuid(u) for u in inputs['instance_uuids']]
        if persistence.existing_flows(context, flow_uuids):
            return flow_uuids
        return self.execute(context, **inputs)

    @staticmethod
    def _release_claims(context, conductor, uuids):
        """Release the instances' claims; False if there were none."""
        released = False
        try:
            for instance_uuid in uuids:
                allocations = conductor.report_client.get_allocs_for_consumer(
                    context, instance_uuid)['allocations']
                if allocations:
                    conductor.report_client.delete_allocation_for_instance(
                        context, instance_uuid, force=True)
                    released = True
        except Exception:
            # The scheduler's NoValidHost is the failure to report.
            LOG.exception('Could not look up or release the claims of %s',
                          uuids)
            return False
        return released

    @staticmethod
    def _bury(context, conductor, spec, exc, inputs):
        build_requests = []
        for instance_uuid in inputs['instance_uuids']:
            try:
                build_requests.append(
                    objects.BuildRequest.get_by_instance_uuid(
                        context, instance_uuid))
            except exception.BuildRequestNotFound:
                pass
        conductor._bury_in_cell0(
            context, spec, exc, build_requests=build_requests,
            block_device_mapping=_object(inputs['block_device_mapping'],
                                         context),
            tags=_tags(inputs['tags']))

    @staticmethod
    @api_db_api.context_manager.writer.connection
    def _create_flows(context, flow_uuids, uuids, host_lists, inputs):
        for flow_uuid, instance_uuid, host_list in zip(flow_uuids, uuids,
                                                        host_lists):
            child = {name: inputs[name] for name in _SHARED_INPUTS}
            child.update(instance_uuid=instance_uuid,
                         num_instances=len(uuids),
                         selections=_primitive(list(host_list)))
            # Held for start-instance-flows, which has the request's
            # secrets; swept only if this conductor stops first.
            persistence.create_flow(
                context, INSTANCE_KIND, INSTANCE_VERSION, child,
                instance_uuid=instance_uuid, request_id=context.request_id,
                uuid=flow_uuid,
                hold_seconds=CONF.orchestration.lease_duration)


class StartInstanceFlows(task.Task):
    """Run the build-instance flows, handing them the request's secrets.

    They run on the conductor's orchestration pool, so that the instances
    of a request build in parallel, each waiting for its host's build. The
    stage waits until each has handed its build to a host (or ended), not
    for the builds: the RPC handler that runs the request then returns
    when the inline code returned, after the casts to the hosts (what
    callers of the schedule_and_build_instances cast, CastAsCall in nova's
    functional tests, have always observed), and never holds one of the
    conductor's RPC threads, which computes need for their object calls,
    for the length of a build.
    """

    name = 'start-instance-flows'
    requires = ('conductor', 'instance_flows', 'admin_password',
                'injected_files', 'request_specs')
    on_crash = task.RERUN

    def execute(self, context, conductor, instance_flows, admin_password,
                injected_files, request_specs):
        handed = []
        for flow_uuid in instance_flows:
            event = threading.Event()
            future = conductor.orchestration.start(
                context, flow_uuid, transient={
                    'admin_password': admin_password,
                    'injected_files': injected_files,
                    'request_specs': request_specs,
                    'handed_to_host': event, 'loaded': {}})
            # None: a sweep took the flow meanwhile and runs it.
            if future is not None:
                future.add_done_callback(lambda _, event=event: event.set())
                handed.append(event)
        for event in handed:
            event.wait()


# -- build-instance --------------------------------------------------------

class _InstanceTask(task.Task):
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
    def _get(cls, context, inputs):
        """The instance and its cell, kept or loaded.

        The run that created the instance keeps it in memory (the
        ``loaded`` transient value) until the host builds it, as the
        inline code did; any other run loads it.
        """
        loaded = inputs.get('loaded')
        if loaded:
            return loaded['instance'], loaded['cell']
        return cls._instance(context, inputs['instance_uuid'],
                             inputs['cell_uuid'])

    @staticmethod
    def _spec(context, inputs):
        """The instance's RequestSpec, kept or loaded (see _get)."""
        loaded = inputs.get('loaded')
        if loaded:
            return loaded['spec']
        return _request_spec(context, inputs['instance_uuid'],
                             inputs['spec_fields'],
                             inputs['requested_networks'])

    @classmethod
    def _load(cls, context, inputs):
        """The requester's context, the instance, its cell and RequestSpec."""
        context = _user_context(context, inputs['requester'])
        instance, cell = cls._get(context, inputs)
        return context, instance, cell, cls._spec(context, inputs)

    @staticmethod
    def _cleanup(context, conductor, exc, instance, cell, inputs,
                 request_spec):
        """Set the instance ERROR, as schedule_and_build_instances did."""
        build_request = objects.BuildRequest(
            context, instance_uuid=instance.uuid)
        conductor._cleanup_build_artifacts(
            context, exc, [instance], [build_request], [request_spec],
            _object(inputs['block_device_mapping'], context),
            _tags(inputs['tags']),
            {instance.uuid: cell})


class CreateInstance(_InstanceTask):
    """Create the instance in the cell of its selected host.

    Ends the build when the user deleted the server first, when the host is
    not mapped to a cell (the instance is buried in cell0) or when the quota
    recheck fails (the instance is set ERROR).
    """

    name = 'create-instance'
    requires = ('conductor', 'requester', 'instance_uuid', 'num_instances',
                'selections', 'spec_fields', 'requested_networks',
                'block_device_mapping', 'tags', 'request_specs', 'loaded')
    provides = 'cell_uuid'

    def execute(self, context, conductor, **inputs):
        context = _user_context(context, inputs['requester'])
        instance_uuid = inputs['instance_uuid']
        host = _object(inputs['selections'][0])
        try:
            build_request = objects.BuildRequest.get_by_instance_uuid(
                context, instance_uuid)
        except exception.BuildRequestNotFound:
            LOG.debug('While scheduling instance, the build request was '
                      'already deleted.', instance_uuid=instance_uuid)
            _forget_deleted(context, conductor, instance_uuid)
            raise exception.BuildEnded(uuid=instance_uuid,
                                       reason='the server was deleted')
        instance = build_request.get_new_instance(context)
        spec = _request_spec(context, instance_uuid, inputs['spec_fields'],
                             inputs['requested_networks'],
                             inputs['request_specs'])
        try:
            host_mapping = objects.HostMapping.get_by_host(
                context, host.service_host)
        except exception.HostMappingNotFound as exc:
            LOG.error('No host-to-cell mapping found for selected host '
                      '%(host)s. Setup is incomplete.',
                      {'host': host.service_host})
            conductor._bury_in_cell0(
                context, spec, exc, build_requests=[build_request],
                instances=[instance],
                block_device_mapping=_object(
                    inputs['block_device_mapping'], context),
                tags=_tags(inputs['tags']))
            raise exception.BuildEnded(uuid=instance_uuid, reason=str(exc))
        cell = host_mapping.cell_mapping
        instance.availability_zone = (
            availability_zones.get_host_availability_zone(
                context, host.service_host))
        with nova_context.target_cell(context, cell) as cctxt:
            with instance.obj_alternate_context(cctxt):
                try:
                    instance.create()
                    created = True
                except db_exc.DBDuplicateEntry:
                    # Created by an execution of this stage cut short: the
                    # failed insert rolled back with all it wrote.
                    created = False
        try:
            conductor._recheck_quota(
                context, instance.flavor, spec, inputs['num_instances'],
                project_id=instance.project_id, user_id=instance.user_id)
        except (exception.TooManyInstances,
                limit_exceptions.ProjectOverLimit) as exc:
            self._cleanup(context, conductor, exc, instance, cell, inputs,
                          spec)
            raise exception.BuildEnded(uuid=instance_uuid, reason=str(exc))
        if created and inputs['loaded'] is not None:
            inputs['loaded'].update(instance=instance, cell=cell, spec=spec)
        return cell.uuid


class RecordInstance(_InstanceTask):
    """Notify, start the create action, store BDMs and tags, map the cell."""

    name = 'record-instance'
    requires = ('conductor', 'requester', 'instance_uuid', 'cell_uuid',
                'block_device_mapping', 'tags', 'loaded')

    def execute(self, context, conductor, **inputs):
        self._record(context, conductor, inputs, started_before=False)

    def execute_again(self, context, conductor, **inputs):
        """Start the create action unless the interrupted execution did."""
        self._record(context, conductor, inputs, started_before=True)

    def _record(self, context, conductor, inputs, started_before):
        context = _user_context(context, inputs['requester'])
        instance, cell = self._get(context, inputs)
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
            bdms = _object(inputs['block_device_mapping'], context)
            if bdms:
                bdms = conductor._create_block_device_mapping(
                    cell, instance.flavor, instance.uuid, bdms)
            tags = conductor._create_tags(cctxt, instance.uuid,
                                          _tags(inputs['tags']))
        if inputs['loaded']:
            # The records the host gets, as the inline code gave them.
            inputs['loaded']['bdms'] = bdms
        # As the inline code did: the host's instance.create notification
        # then need not load them.
        instance.tags = tags or objects.TagList()
        conductor._map_instance_to_cell(context, instance, cell)


class DeleteBuildRequest(_InstanceTask):
    """The commit point: delete the BuildRequest with the stage's record.

    If the user deleted the server meanwhile, the instance, its BDMs and
    tags are removed from the cell and the build ends.
    """

    name = 'delete-build-request'
    requires = ('conductor', 'requester', 'instance_uuid', 'cell_uuid',
                'tags')
    transactional = True

    def execute(self, context, conductor, **inputs):
        # The engine's context carries the stage's API DB transaction.
        build_request = objects.BuildRequest(
            context, instance_uuid=inputs['instance_uuid'])
        try:
            build_request.destroy()
            return
        except exception.BuildRequestNotFound:
            pass
        # The user deleted the server: _delete_build_request finds the
        # BuildRequest gone and removes what the build created in the cell,
        # with a context of its own.
        user_context = nova_context.RequestContext.from_dict(
            inputs['requester'])
        instance, cell = self._instance(
            user_context, inputs['instance_uuid'], inputs['cell_uuid'])
        with nova_context.target_cell(user_context, cell) as cctxt:
            bdms = objects.BlockDeviceMappingList.get_by_instance_uuid(
                cctxt, instance.uuid)
        conductor._delete_build_request(
            user_context, build_request, instance, cell, bdms,
            _tags(inputs['tags']))
        raise exception.BuildEnded(uuid=instance.uuid,
                                   reason='the server was deleted')


class Accelerators(_InstanceTask):
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
                'selections', 'spec_fields', 'requested_networks',
                'block_device_mapping', 'tags', 'loaded')
    provides = 'accelerators'

    @staticmethod
    def _selected(inputs):
        return _object(inputs['selections'][0])

    def execute(self, context, conductor, **inputs):
        run_context = context
        context = _user_context(context, inputs['requester'])
        instance, cell = self._get(context, inputs)
        requested_networks = _object(inputs['requested_networks'])
        if not self._asks_for_devices(instance, requested_networks):
            return {'uuids': [],
                    'requested_networks': inputs['requested_networks']}
        _log_if_resumed(run_context, inputs, 'the requests to Cyborg')
        spec = self._spec(context, inputs)
        host = self._selected(inputs)
        with _stage_event(context, cell, instance.uuid, self.name,
                          inputs.get('num_attempts', 1)):
            try:
                scheduler_utils.fill_provider_mapping(spec, host)
                # This sets the arq_uuid of the requested ports.
                accel_uuids = conductor._create_and_bind_arq_for_instance(
                    context, instance, host.nodename, spec,
                    requested_networks)
                return {'uuids': accel_uuids,
                        'requested_networks': _primitive(requested_networks)}
            except Exception as exc:
                with excutils.save_and_reraise_exception():
                    self._cleanup(context, conductor, exc, instance, cell,
                                  inputs, spec)

    @staticmethod
    def _asks_for_devices(instance, requested_networks):
        return bool(instance.flavor.extra_specs.get('accel:device_profile') or
                    any(net.port_id and net.device_profile
                        for net in requested_networks or []))

    def execute_again(self, context, conductor, **inputs):
        """Delete the ARQs the interrupted execution bound, then execute.

        Unbound ones name no instance and cannot be found.
        """
        self._delete_bound_requests(context, conductor, inputs)
        # With keyword arguments, as the engine calls it.
        return self.execute(context, conductor=conductor, **inputs)

    def _delete_bound_requests(self, context, conductor, inputs):
        context, instance, cell, spec = self._load(context, inputs)
        if not self._asks_for_devices(
                instance, _object(inputs['requested_networks'])):
            return
        cyclient = cyborg.get_client(context)
        try:
            bound = [arq['uuid'] for arq in
                     cyclient.get_arqs_for_instance(instance.uuid)]
        except Exception as exc:
            with excutils.save_and_reraise_exception():
                self._cleanup(context, conductor, exc, instance, cell,
                              inputs, spec)
        if bound:
            LOG.info('Deleting accelerator requests %s bound by an '
                     'interrupted execution of this stage', bound,
                     instance=instance)
            cyclient.delete_arqs_by_uuid(bound)


class CastToHost(_InstanceTask):
    """Hand the instance to its selected host (build_and_run_instance).

    Skipped when the instance shows the host has it already (an earlier
    execution's cast arrived); the host reschedules through
    build_instances as it always did.
    """

    name = 'cast-to-host'
    requires = ('conductor', 'requester', 'instance_uuid', 'cell_uuid',
                'selections', 'image', 'spec_fields', 'requested_networks',
                'block_device_mapping', 'tags', 'accelerators',
                'has_injected_files', 'admin_password', 'injected_files')
    instance_attrs = HOST_BUILD_ATTRS

    def execute(self, context, conductor, **inputs):
        context = _user_context(context, inputs['requester'])
        instance, cell = self._instance(context, inputs['instance_uuid'],
                                        inputs['cell_uuid'])
        if instance.host:
            # Set by the host's resource claim.
            LOG.info('The host has the instance already', instance=instance)
            return
        spec = _request_spec(context, instance.uuid, inputs['spec_fields'],
                             inputs['requested_networks'])
        _require_injected_files(
            inputs, instance, lambda exc: self._cleanup(
                context, conductor, exc, instance, cell, inputs, spec))
        selections = _object(inputs['selections'])
        _cast_to_host(context, conductor, instance, cell, spec, inputs,
                      selections[0], selections[1:])


def _require_injected_files(inputs, instance, cleanup):
    """End the build if its personality files were lost with a conductor.

    cleanup(exc) sets the instance ERROR before BuildEnded is raised.
    """
    try:
        if (inputs['has_injected_files'] and
                not _request_secret(inputs, 'injected_files')):
            raise exception.BuildEnded(
                uuid=instance.uuid, reason='the personality files of the '
                'request were held by a conductor that stopped, and this one '
                'does not have them (%s)' % credentials.why_not_unsealed(
                    inputs['requester'].get(credentials.SEALED),
                    'they were not'))
    except exception.BuildEnded as exc:
        with excutils.save_and_reraise_exception():
            cleanup(exc)


def _log_if_resumed(context, inputs, requests):
    """Say whether a resumed run acts for the requester with a token.

    ``context`` is the run's own (see _resumed). A resumed run acts for
    the requester with a context rebuilt from the flow's inputs
    (_user_context), which hold the token only sealed, if at all:
    without it, services that authenticate the requester refuse its
    requests. nova's neutron and cinder clients use their own
    credentials for an admin requester only; nothing does for the image
    download or Cyborg.
    """
    record = inputs['requester']
    if not _resumed(context, record):
        return
    if _unsealed(record).get('auth_token'):
        LOG.info('This build was resumed by another conductor: %s are made '
                 'with the requester\'s token, stored sealed in its flow.',
                 requests, instance_uuid=inputs['instance_uuid'])
        return
    LOG.warning('This build was resumed by a conductor that does not have '
                'the requester\'s token (%s): %s made as the requester can '
                'be refused.', credentials.why_not_unsealed(
                    record.get(credentials.SEALED), 'the request had none'),
                requests, instance_uuid=inputs['instance_uuid'])


def _host_call_arguments(context, instance, cell, spec, inputs, host,
                         num_attempts=1, bdms=None):
    """What build_and_run_instance needs besides host and alternates.

    :param bdms: the instance's block device mappings, if kept; else they
        are read.
    """
    filter_props = spec.to_legacy_filter_properties_dict()
    scheduler_utils.populate_retry(filter_props, instance.uuid)
    if 'retry' in filter_props:
        # Reschedules are counted as build_instances counted them.
        filter_props['retry']['num_attempts'] = num_attempts
    scheduler_utils.populate_filter_properties(filter_props, host)
    if bdms is None:
        with nova_context.target_cell(context, cell) as cctxt:
            bdms = objects.BlockDeviceMappingList.get_by_instance_uuid(
                cctxt, instance.uuid)
    return dict(
        image=inputs['image'], request_spec=spec,
        filter_properties=filter_props,
        admin_password=_request_secret(inputs, 'admin_password'),
        injected_files=_request_secret(inputs, 'injected_files'),
        requested_networks=_object(
            inputs['accelerators']['requested_networks']),
        security_groups=[s.identifier for s in spec.security_groups],
        block_device_mapping=bdms, host=host.service_host,
        node=host.nodename, limits=host.limits,
        accel_uuids=inputs['accelerators']['uuids'])


def _cast_to_host(context, conductor, instance, cell, spec, inputs, host,
                  alternates, num_attempts=1):
    """The legacy hand-over: the host reschedules through build_instances."""
    try:
        scheduler_utils.fill_provider_mapping(spec, host)
    except Exception as exc:
        with excutils.save_and_reraise_exception():
            _InstanceTask._cleanup(context, conductor, exc, instance, cell,
                                   inputs, spec)
    arguments = _host_call_arguments(context, instance, cell, spec, inputs,
                                     host, num_attempts)
    LOG.debug('Selected host: %s; Selected node: %s; Alternates: %s',
              host.service_host, host.nodename,
              [(alt.service_host, alt.nodename) for alt in alternates],
              instance=instance)
    with nova_context.target_cell(context, cell) as cctxt:
        with instance.obj_alternate_context(cctxt):
            conductor.compute_rpcapi.build_and_run_instance(
                cctxt, instance=instance, host_list=alternates, **arguments)


# -- build-instance, version 2: the host's build in a retry block ---------

def _fail_build(context, conductor, exc, instance, cell, spec, inputs):
    """Set the instance ERROR after the commit point, as build_instances
    did when a reschedule failed: fault, notification, networks, ARQs.
    """
    with nova_context.target_cell(context, cell) as cctxt:
        with instance.obj_alternate_context(cctxt):
            conductor._cleanup_when_reschedule_fails(
                cctxt, instance, exc, spec.to_legacy_request_spec_dict(),
                _object(inputs['requested_networks']))


class ChooseHost(task.Retry):
    """The host of each attempt: the selected one, then the alternates.

    The scheduler claimed the selected host's resources. After a failure
    the host reported as reschedulable (its claim released by the host),
    the next stored alternate whose resources can still be claimed in
    placement is tried, as build_instances did; none left ends the build
    with MaxRetriesExceeded, the instance in ERROR.
    """

    name = 'choose-host'
    requires = ('conductor', 'requester', 'instance_uuid', 'cell_uuid',
                'selections', 'host_index', 'num_attempts', 'spec_fields',
                'requested_networks')
    provides = ('host', 'host_index', 'num_attempts')

    def first(self, context, **inputs):
        return {'host': inputs['selections'][0], 'host_index': 0,
                'num_attempts': 1}

    def next(self, context, attempt, failure, conductor, **inputs):
        if not failure or failure['type'] != 'RescheduledException':
            return None
        context, instance, cell, spec = _InstanceTask._load(context, inputs)
        selections = inputs['selections']
        for index in range(inputs['host_index'] + 1, len(selections)):
            host = _object(selections[index])
            if self._claim(context, conductor, instance, cell, spec, inputs,
                           host):
                return {'host': selections[index], 'host_index': index,
                        'num_attempts': inputs['num_attempts'] + 1}
        exc = exception.MaxRetriesExceeded(
            reason='Exhausted all hosts available for retrying build '
                   'failures for instance %s.' % instance.uuid)
        _fail_build(context, conductor, exc, instance, cell, spec, inputs)
        return None

    @staticmethod
    def _claim(context, conductor, instance, cell, spec, inputs, host):
        if not host.allocation_request:
            # A scheduler that does not claim in placement.
            return True
        try:
            return scheduler_utils.claim_resources(
                context.elevated(), conductor.report_client, spec,
                instance.uuid, jsonutils.loads(host.allocation_request),
                host.allocation_request_version)
        except Exception as exc:
            with excutils.save_and_reraise_exception():
                _fail_build(context, conductor, exc, instance, cell, spec,
                            inputs)


class HostAccelerators(Accelerators):
    """Accelerator requests for the host of the attempt."""

    requires = Accelerators.requires + ('host', 'num_attempts')

    @staticmethod
    def _selected(inputs):
        return _object(inputs['host'])


class BuildOnHost(_InstanceTask):
    """Build the instance on the attempt's host and wait for the outcome.

    A reschedulable failure raises RescheduledException, which makes
    choose-host try the next alternate. A host older than compute service
    version 75 gets the legacy build_and_run_instance cast instead, with
    the remaining alternates, and reschedules through build_instances.
    Executed again after a crash, the host reports the outcome of the
    build it already started rather than building twice. A host that
    gives no outcome is asked again until it is back (a restarted host
    builds the instance again) or [orchestration]host_restart_timeout has
    passed.
    """

    name = 'build-on-host'
    requires = ('conductor', 'requester', 'instance_uuid', 'cell_uuid',
                'selections', 'host', 'host_index', 'num_attempts', 'image',
                'spec_fields',
                'requested_networks', 'block_device_mapping', 'tags',
                'accelerators', 'has_injected_files', 'admin_password',
                'injected_files', 'handed_to_host', 'loaded')
    provides = 'build_result'
    instance_attrs = HOST_BUILD_ATTRS

    def execute(self, context, conductor, **inputs):
        _log_if_resumed(
            context, inputs, 'the requests of host %s to the networking, '
            'volume and image services (ports, volume attachments, the '
            'image download)' % _object(inputs['host']).service_host)
        context, instance, cell, spec = self._load(context, inputs)
        # Only the run that created the instance keeps it, with its block
        # device mappings, and no host was asked to build it before that
        # run's first attempt.
        kept = dict(inputs['loaded'] or {})
        if kept:
            # The host's build changes them: a later attempt loads them.
            inputs['loaded'].clear()
        with _stage_event(context, cell, instance.uuid, self.name,
                          inputs['num_attempts']):
            return self._build(context, conductor, instance, cell, spec,
                               inputs, kept)

    def _build(self, context, conductor, instance, cell, spec, inputs, kept):
        """Build on the attempt's host, or cast to an older one.

        :param kept: what the run that created the instance kept of it,
            empty unless this is that run's first attempt.
        """
        _require_injected_files(
            inputs, instance, lambda exc: _fail_build(
                context, conductor, exc, instance, cell, spec, inputs))
        host = _object(inputs['host'])
        if not self._waits(context, conductor, cell, host):
            if instance.host:
                LOG.info('The host has the instance already',
                         instance=instance)
                return build_results.ACTIVE
            alternates = _object(inputs['selections'])[
                inputs['host_index'] + 1:]
            _cast_to_host(context, conductor, instance, cell, spec, inputs,
                          host, alternates, inputs['num_attempts'])
            return 'cast'
        if inputs['host_index'] > 0:
            self._prepare_reschedule(context, conductor, instance, cell,
                                     spec, host)
        try:
            scheduler_utils.fill_provider_mapping(spec, host)
        except Exception as exc:
            with excutils.save_and_reraise_exception():
                _fail_build(context, conductor, exc, instance, cell, spec,
                            inputs)
        arguments = _host_call_arguments(context, instance, cell, spec,
                                         inputs, host, inputs['num_attempts'],
                                         kept.get('bdms'))
        LOG.debug('Building on host %s, node %s', host.service_host,
                  host.nodename, instance=instance)
        if inputs['handed_to_host'] is not None:
            # The run that started this flow (not one resumed) lets the
            # request's RPC handler return now.
            inputs['handed_to_host'].set()
        try:
            outcome = self._ask_host(context, conductor, instance, cell,
                                     arguments, asked_before=not kept)
        except exception.OrchestrationEngineStopped:
            raise
        except Exception as exc:
            # No outcome: the host did not come back in time, or failed
            # otherwise. The instance is set ERROR; deleting the server
            # cleans up after the host.
            with excutils.save_and_reraise_exception():
                LOG.exception('Build on host %s gave no outcome',
                              host.service_host, instance=instance)
                _fail_build(context, conductor, exc, instance, cell, spec,
                            inputs)
        result = outcome['result']
        if result in _RESCHEDULE:
            raise exception.RescheduledException(
                instance_uuid=instance.uuid, reason=outcome['reason'])
        if result != build_results.ACTIVE:
            # The host set the instance ERROR with its fault.
            raise exception.BuildEnded(
                uuid=instance.uuid, reason='the build on %s failed: %s' % (
                    host.service_host, outcome['reason'] or result))
        return result

    @property
    def timeout(self):
        return (CONF.long_rpc_timeout +
                CONF.orchestration.host_restart_timeout)

    @staticmethod
    def _ask_host(context, conductor, instance, cell, arguments,
                  asked_before):
        """The host's outcome, asked again while the host gives none.

        A host that stops answering (its service stopped or restarted)
        makes the call time out after rpc_response_timeout; a host whose
        service stops during the build answers that the build is
        unfinished. It is asked again until
        [orchestration]host_restart_timeout has passed: a restarted host
        builds the instance again, a host that was only slow to answer
        reports the build it finished. A conductor that stops meanwhile
        stops asking: another one resumes the flow and asks the host again.
        Unless asked_before, the host is told that no call of an earlier
        run reached it, which spares it looking for an earlier build.
        """
        timeout = CONF.orchestration.host_restart_timeout
        # The call lasts as long as the build and uses no cell database:
        # its context is targeted with set_target_cell, not inside
        # target_cell, which nova's functional fixture serialises with
        # every switch to another cell (other requests would wait for the
        # build).
        cctxt = copy.copy(context)
        nova_context.set_target_cell(cctxt, cell)

        deadline = time.monotonic() + timeout
        while True:
            try:
                with instance.obj_alternate_context(cctxt):
                    outcome = conductor.compute_rpcapi.build_and_run_instance(
                        cctxt, instance=instance, wait=True,
                        asked_before=asked_before, **arguments)
                if outcome['result'] != build_results.UNFINISHED:
                    return outcome
                error = outcome['reason']
            except messaging.MessagingTimeout as exc:
                error = exc
            # The host may have started a build: it reports that one next.
            asked_before = True
            LOG.warning('Host %s gave no outcome of the build: %s',
                        arguments['host'], error, instance=instance)
            if time.monotonic() >= deadline:
                raise exception.HostGaveNoOutcome(
                    host=arguments['host'], seconds=timeout, error=error)
            if conductor.orchestration.stopping.wait(HOST_RETRY_INTERVAL):
                raise exception.OrchestrationEngineStopped()

    @staticmethod
    def _waits(context, conductor, cell, host):
        """Whether the host can build while the conductor waits.

        A host found new enough is remembered until the conductor's compute
        RPC API is reset (SIGHUP); an older one is looked up again at its
        next build, as it may have been upgraded meanwhile.
        """
        if not conductor.compute_rpcapi.supports_waiting_build(context):
            return False
        if host.service_host in conductor.waiting_build_hosts:
            return True
        with nova_context.target_cell(context, cell) as cctxt:
            try:
                service = objects.Service.get_by_compute_host(
                    cctxt, host.service_host)
            except exception.ComputeHostNotFound:
                return False
        if service.version < WAITING_BUILD_SERVICE_VERSION:
            return False
        conductor.waiting_build_hosts.add(host.service_host)
        return True

    @staticmethod
    def _prepare_reschedule(context, conductor, instance, cell, spec,
                            host):
        """What build_instances did before a rescheduled build."""
        with nova_context.target_cell(context, cell) as cctxt:
            with instance.obj_alternate_context(cctxt):
                if 'availability_zone' in host:
                    instance.availability_zone = host.availability_zone
                instance.save()
                bdms = objects.BlockDeviceMappingList.get_by_instance_uuid(
                    cctxt, instance.uuid)
                # The previous host deleted the attachments it used.
                conductor._validate_existing_attachment_ids(
                    cctxt, instance, bdms)


_REQUEST_INPUTS = ('requester', 'instance_uuids', 'image', 'spec_fields',
                   'requested_networks', 'block_device_mapping', 'tags',
                   'has_injected_files')
# What a request's build-instance flows store of the request's inputs.
_SHARED_INPUTS = tuple(
    name for name in _REQUEST_INPUTS if name != 'instance_uuids')
_INSTANCE_INPUTS = _SHARED_INPUTS + (
    'instance_uuid', 'num_instances', 'selections')

# Their stages clean up after a failed build themselves and their reverts
# undo nothing yet: an aborted build would leave its server in BUILD.
BUILD_REQUEST = task.register(task.Flow(
    REQUEST_KIND, VERSION, _REQUEST_INPUTS,
    [Schedule(), StartInstanceFlows()], transient=TRANSIENT,
    abortable=False, ended_inputs=_without_sealed))

BUILD_INSTANCE_V1 = task.register(task.Flow(
    INSTANCE_KIND, VERSION, _INSTANCE_INPUTS,
    [CreateInstance(), RecordInstance(), DeleteBuildRequest(),
     Accelerators(), CastToHost()], transient=TRANSIENT, abortable=False,
    ended_inputs=_without_sealed))

BUILD_INSTANCE = task.register(task.Flow(
    INSTANCE_KIND, INSTANCE_VERSION, _INSTANCE_INPUTS,
    [CreateInstance(), RecordInstance(), DeleteBuildRequest(),
     task.RetryBlock(ChooseHost(), [HostAccelerators(), BuildOnHost()])],
    transient=TRANSIENT, abortable=False, ended_inputs=_without_sealed))
