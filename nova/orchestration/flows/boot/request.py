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

"""The build-request flow: schedule the request, start its instances'
flows.
"""

import threading

from oslo_db import exception as db_exc
from oslo_log import log as logging
from oslo_utils import excutils
import sqlalchemy as sa

import nova.conf
from nova.db.api import api as api_db_api
from nova.db.api import models as api_models
from nova import exception
from nova import objects
from nova.orchestration.flows.boot import common
from nova.orchestration import persistence
from nova.orchestration import task

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

REQUEST_INPUTS = ('requester', 'instance_uuids', 'image', 'spec_fields',
                   'requested_networks', 'block_device_mapping', 'tags',
                   'has_injected_files')
# What a request's build-instance flows store of the request's inputs.
_SHARED_INPUTS = tuple(
    name for name in REQUEST_INPUTS if name != 'instance_uuids')
INSTANCE_INPUTS = _SHARED_INPUTS + (
    'instance_uuid', 'num_instances', 'selections')
# RequestSpec fields its database record does not keep
# (RequestSpec._get_update_primitives); the flow stores them.
SPEC_FIELDS = ('requested_resources', 'requested_destination',
               'request_level_params', 'network_metadata')
# The service version of the release whose conductors run build flows.
FLOW_CONDUCTOR_SERVICE_VERSION = 75


class Schedule(task.Task):
    """Select a host and alternates for every instance of the request.

    Then create one build-instance flow per instance, carrying its
    selections. Executed again after a crash, it finds those flows, or
    releases the claims of the interrupted execution and schedules again.
    Its revert buries the request's instances in cell0 after a scheduling
    failure.
    """

    name = 'schedule'
    requires = ('conductor', 'requester', 'instance_uuids', 'image',
                'spec_fields', 'requested_networks', 'block_device_mapping',
                'tags', 'has_injected_files', 'request_specs')
    provides = 'instance_flows'
    on_crash = task.RERUN

    def execute(self, context, conductor, requester, instance_uuids, image,
                spec_fields, requested_networks, block_device_mapping, tags,
                has_injected_files, request_specs):
        # Only a resumed run can find the request built by a conductor
        # that predates this flow. The run of the conductor the request
        # was cast to leaves servers deleted meanwhile to create-instance,
        # as the inline code did.
        resumed = common.resumed(context, requester)
        context = common.user_context(context, requester)
        uuids = instance_uuids
        flow_uuids = [common.instance_flow_uuid(u) for u in uuids]
        if resumed and not _any_build_request(context, uuids):
            # Deleted by the user, or built without this flow.
            raise exception.BuildEnded(uuid=', '.join(uuids),
                                       reason='no build request is left')
        spec = common.request_spec(context, uuids[0], spec_fields,
                                   requested_networks, request_specs)
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
        except Exception:
            with excutils.save_and_reraise_exception():
                LOG.exception('Failed to schedule instances')
        # What each build-instance flow stores of the request.
        shared = dict(
            requester=requester, image=image, spec_fields=spec_fields,
            requested_networks=requested_networks,
            block_device_mapping=block_device_mapping, tags=tags,
            has_injected_files=has_injected_files)
        try:
            self._create_flows(context, flow_uuids, uuids, host_lists,
                               shared)
        except db_exc.DBDuplicateEntry:
            # A stale owner of this flow created them meanwhile.
            LOG.warning('Build flows of %s exist already', uuids)
        return flow_uuids

    def execute_again(self, context, conductor, requester, instance_uuids,
                      image, spec_fields, requested_networks,
                      block_device_mapping, tags, has_injected_files,
                      request_specs):
        """Find the flows the interrupted execution made, else execute."""
        flow_uuids = [common.instance_flow_uuid(u) for u in instance_uuids]
        if persistence.existing_flows(context, flow_uuids):
            return flow_uuids
        # With keyword arguments, as the engine calls it.
        return self.execute(
            context, conductor=conductor, requester=requester,
            instance_uuids=instance_uuids, image=image,
            spec_fields=spec_fields, requested_networks=requested_networks,
            block_device_mapping=block_device_mapping, tags=tags,
            has_injected_files=has_injected_files,
            request_specs=request_specs)

    def revert(self, context, result, failure, conductor, requester,
               instance_uuids, image, spec_fields, requested_networks,
               block_device_mapping, tags, has_injected_files,
               request_specs):
        """Bury the instances in cell0 if no build-instance flow was made.

        As schedule_and_build_instances did after a scheduling failure;
        the instances whose server was deleted meanwhile are forgotten.
        Once the flows exist, they build the instances.
        """
        if result is not None:
            return
        context = common.user_context(context, requester)
        build_requests = []
        for instance_uuid in instance_uuids:
            try:
                build_requests.append(
                    objects.BuildRequest.get_by_instance_uuid(
                        context, instance_uuid))
            except exception.BuildRequestNotFound:
                common.forget_deleted(context, conductor, instance_uuid)
        if not build_requests:
            return
        spec = common.request_spec(context, instance_uuids[0], spec_fields,
                                   requested_networks, request_specs)
        common.while_handling(failure, lambda exc: conductor._bury_in_cell0(
            context, spec, exc, build_requests=build_requests,
            block_device_mapping=common.from_primitive(
                block_device_mapping, context),
            tags=common.tags(tags)))

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
    @api_db_api.context_manager.writer.connection
    def _create_flows(context, flow_uuids, uuids, host_lists, shared):
        """:param shared: the inputs every instance's flow stores."""
        for flow_uuid, instance_uuid, host_list in zip(flow_uuids, uuids,
                                                        host_lists):
            child = dict(shared, instance_uuid=instance_uuid,
                         num_instances=len(uuids),
                         selections=common.primitive(list(host_list)))
            # Held for start-instance-flows, which has the request's
            # secrets; swept only if this conductor stops first.
            persistence.create_flow(
                context, common.INSTANCE_KIND, common.INSTANCE_VERSION, child,
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

    def revert(self, context, result, failure, **unused):
        """Nothing to undo: each instance's flow ends its own build."""


@api_db_api.context_manager.reader
def _any_build_request(context, instance_uuids):
    """Whether a BuildRequest of any of the instances is left.

    Read without loading one: a BuildRequest holds a whole serialized
    instance.
    """
    query = sa.select(api_models.BuildRequest.id).where(
        api_models.BuildRequest.instance_uuid.in_(instance_uuids)).limit(1)
    return context.session.execute(query).first() is not None


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
            fields[name] = common.primitive(value)
    return {
        'requester': common.context_record(context, {
            'admin_password': admin_password,
            'injected_files': injected_files}),
        'instance_uuids': list(instance_uuids),
        'image': image,
        'spec_fields': fields,
        'requested_networks': common.primitive(requested_networks),
        'block_device_mapping': common.primitive(
            list(block_device_mapping or [])),
        'tags': [t.tag for t in tags or []],
        'has_injected_files': bool(injected_files),
    }


def conductors_run_build_flows(context):
    """Whether every conductor, in every cell, runs build flows.

    While an older conductor may still be running, the API stores no flow:
    a flow whose cast an older conductor got would be taken for a lost
    cast and built a second time by a newer conductor's sweep. A conductor
    that gets a cast without a flow stores it itself.
    """
    version = objects.service.get_minimum_version_all_cells(
        context, ['nova-conductor'])
    return version >= FLOW_CONDUCTOR_SERVICE_VERSION


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
        context, common.REQUEST_KIND, common.VERSION, inputs,
        instance_uuid=instance_uuids[0], request_id=context.request_id,
        uuid=common.request_flow_uuid(instance_uuids[0]),
        hold_seconds=CONF.orchestration.lease_duration)
