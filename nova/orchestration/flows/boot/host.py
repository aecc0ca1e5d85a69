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

"""The stages of build-instance version 2: the host's build in a retry
block.

choose-host picks the selected host, then the alternates; build-on-host
builds there and waits for the outcome.
"""

import copy
import time

from oslo_log import log as logging
import oslo_messaging as messaging
from oslo_serialization import jsonutils
from oslo_utils import excutils

from nova.compute import build_results
from nova.compute import task_states
from nova.compute import vm_states
import nova.conf
from nova import context as nova_context
from nova import exception
from nova import objects
from nova.objects import instance as instance_obj
from nova.orchestration import credentials
from nova.orchestration.flows.boot import common
from nova.orchestration.flows.boot import events
from nova.orchestration.flows.boot import instance as instance_stages
from nova.orchestration import persistence
from nova.orchestration import task
from nova.scheduler import utils as scheduler_utils

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

# Hosts of this compute service version or newer build while the conductor
# waits; older ones get the legacy cast.
WAITING_BUILD_SERVICE_VERSION = 75
# Seconds between two calls to a host that gave no outcome of a build.
HOST_RETRY_INTERVAL = 5
# What a host reports as reschedulable: try the next alternate.
_RESCHEDULE = (build_results.RESCHEDULED,
               build_results.RESCHEDULED_BY_POLICY)
# The failures of build-on-host after which choose-host tries the next
# alternate.
_NEXT_HOST_AFTER = ('RescheduledException', 'BuildHostDown',
                    'HostGaveNoOutcome')
# Those after which no host released the allocation it was asked to use.
_NOT_RELEASED_AFTER = ('BuildHostDown', 'HostGaveNoOutcome')
# The instance fields a host's build reads: sent loaded, the host need not
# load them one at a time, as it need not for the instance the conductor
# created in its build before build flows.
HOST_BUILD_ATTRS = instance_obj.INSTANCE_DEFAULT_FIELDS + [
    'flavor', 'tags', 'keypairs', 'numa_topology', 'pci_requests',
    'trusted_certs']


class ChooseHost(task.Retry):
    """The host of each attempt: the selected one, then the alternates.

    The scheduler claimed the selected host's resources. After a failure
    the host reported as reschedulable (its claim released by the host),
    a host found down before it was asked, or a host that gave no outcome
    (their allocation released here), the next stored alternate whose
    resources can still be claimed in placement is tried, as
    build_instances did; none left ends the build with MaxRetriesExceeded,
    which create-instance's revert makes the instance's fault.

    The instance's launched_on names the host asked to build it, the only
    one whose build may start (compute _do_build_and_run_instance). Before
    anything else, the failed host loses it, in one update that requires
    the instance still to be scheduling: a host that started the build
    and then gave no outcome keeps it, and the build ends with that
    failure, as before reschedules after no outcome.
    """

    name = 'choose-host'
    requires = ('conductor', 'requester', 'instance_uuid', 'cell_uuid',
                'selections', 'host_index', 'num_attempts', 'spec_fields',
                'requested_networks')
    provides = ('host', 'host_index', 'num_attempts')

    def first(self, context, selections, **unused):
        """The selected host: the first attempt needs nothing else."""
        return {'host': selections[0], 'host_index': 0, 'num_attempts': 1}

    def next(self, context, attempt, failure, conductor, requester,
             instance_uuid, cell_uuid, selections, host_index, num_attempts,
             spec_fields, requested_networks):
        if failure.type not in _NEXT_HOST_AFTER:
            return None
        context, instance, cell, spec = instance_stages.InstanceTask._load(
            context, requester, instance_uuid, cell_uuid, spec_fields,
            requested_networks)
        hosts = [common.from_primitive(selection)
                 for selection in selections]
        # An execution of this cut short may have moved it to one of the
        # alternates already, none of which was asked yet.
        unasked = [host.service_host for host in hosts[host_index:]]
        try:
            self._assign(context, instance, cell, None, unasked + [None])
        except (exception.UnexpectedTaskStateError,
                exception.InstanceUpdateConflict) as exc:
            LOG.warning('Not building on another host: host %s has started '
                        'the build (%s)', unasked[0], exc.format_message(),
                        instance=instance)
            return None
        if failure.type in _NOT_RELEASED_AFTER:
            conductor.report_client.delete_allocation_for_instance(
                context, instance.uuid, force=True)
        for index in range(host_index + 1, len(selections)):
            if self._claim(context, conductor, instance, spec, hosts[index]):
                try:
                    self._assign(context, instance, cell,
                                 hosts[index].service_host, [None])
                except Exception:
                    # Deleted meanwhile: the delete did not see this claim.
                    with excutils.save_and_reraise_exception():
                        conductor.report_client.\
                            delete_allocation_for_instance(
                                context, instance.uuid, force=True)
                return {'host': selections[index], 'host_index': index,
                        'num_attempts': num_attempts + 1}
        raise exception.MaxRetriesExceeded(
            reason='Exhausted all hosts available for retrying build '
                   'failures for instance %s.' % instance.uuid)

    @staticmethod
    def _assign(context, instance, cell, host, expected):
        """Name the host whose build may start, if none started yet."""
        with nova_context.target_cell(context, cell) as cctxt:
            with instance.obj_alternate_context(cctxt):
                instance.launched_on = host
                instance.save(expected_task_state=[task_states.SCHEDULING],
                              expected_vm_state=[vm_states.BUILDING],
                              expected_launched_on=expected)

    @staticmethod
    def _claim(context, conductor, instance, spec, host):
        """Claim the alternate's resources in placement."""
        if not host.allocation_request:
            # A scheduler that does not claim in placement.
            return True
        return scheduler_utils.claim_resources(
            context.elevated(), conductor.report_client, spec,
            instance.uuid, jsonutils.loads(host.allocation_request),
            host.allocation_request_version)

    def revert(self, context, result, failure, **unused):
        """Nothing to undo here: create-instance's revert releases the
        allocation of an aborted build, a failed one keeps it.
        """


class HostAccelerators(instance_stages.Accelerators):
    """Accelerator requests for the host of the attempt."""

    requires = tuple(
        name for name in instance_stages.Accelerators.requires
        if name != 'selections') + ('host', 'num_attempts')

    def execute(self, context, conductor, requester, instance_uuid,
                cell_uuid, host, num_attempts, spec_fields,
                requested_networks, loaded):
        return self._create(
            context, conductor, requester, instance_uuid, cell_uuid, host,
            num_attempts, spec_fields, requested_networks, loaded)

    def execute_again(self, context, conductor, requester, instance_uuid,
                      cell_uuid, host, num_attempts, spec_fields,
                      requested_networks, loaded):
        return self._create_again(
            context, conductor, requester, instance_uuid, cell_uuid, host,
            num_attempts, spec_fields, requested_networks, loaded)


class BuildOnHost(instance_stages.InstanceTask):
    """Build the instance on the attempt's host and wait for the outcome.

    A reschedulable failure raises RescheduledException, which makes
    choose-host try the next alternate. A host older than compute service
    version 75 gets the legacy build_and_run_instance cast instead, with
    the remaining alternates, and reschedules through build_instances.
    Executed again after a crash, the host reports the outcome of the
    build it already started rather than building twice. A host that
    gives no outcome is asked again until it is back (a restarted host
    builds the instance again) or [orchestration]host_restart_timeout has
    passed: then choose-host tries the next alternate, unless the host
    started the build. A resumed run that lost the requester's token ends
    the build before asking a host (common.require_token), unless an
    interrupted execution may have asked one already: that host reports
    its build.
    An alternate (or the scheduler's host, in a resumed flow) found down
    before it is asked raises BuildHostDown: choose-host tries the next.
    """

    name = 'build-on-host'
    requires = ('conductor', 'requester', 'instance_uuid', 'cell_uuid',
                'selections', 'host', 'host_index', 'num_attempts', 'image',
                'spec_fields', 'requested_networks', 'accelerators',
                'has_injected_files', 'admin_password', 'injected_files',
                'handed_to_host', 'loaded')
    provides = 'build_result'
    instance_attrs = HOST_BUILD_ATTRS

    def execute(self, context, conductor, requester, instance_uuid,
                cell_uuid, selections, host, host_index, num_attempts, image,
                spec_fields, requested_networks, accelerators,
                has_injected_files, admin_password,
                injected_files, handed_to_host, loaded):
        common.require_token(context, requester, instance_uuid,
                             self._requests(host))
        return self._run(
            context, conductor, requester, instance_uuid, cell_uuid,
            selections, host, host_index, num_attempts, image, spec_fields,
            requested_networks, accelerators, has_injected_files,
            admin_password, injected_files, handed_to_host, loaded,
            resumed=False)

    def execute_again(self, context, conductor, requester, instance_uuid,
                      cell_uuid, selections, host, host_index, num_attempts,
                      image, spec_fields, requested_networks, accelerators,
                      has_injected_files, admin_password, injected_files,
                      handed_to_host, loaded):
        """Execute, even without the token: the host may have the build."""
        common.lost_token(context, requester, instance_uuid,
                          self._requests(host))
        return self._run(
            context, conductor, requester, instance_uuid, cell_uuid,
            selections, host, host_index, num_attempts, image, spec_fields,
            requested_networks, accelerators, has_injected_files,
            admin_password, injected_files, handed_to_host, loaded,
            resumed=True)

    @staticmethod
    def _requests(host):
        return ('the requests of host %s to the networking, volume and '
                'image services (ports, volume attachments, the image '
                'download)' % common.from_primitive(host).service_host)

    def _run(self, context, conductor, requester, instance_uuid, cell_uuid,
             selections, host, host_index, num_attempts, image, spec_fields,
             requested_networks, accelerators, has_injected_files,
             admin_password, injected_files, handed_to_host, loaded,
             resumed):
        host = common.from_primitive(host)
        context, instance, cell, spec = self._load(
            context, requester, instance_uuid, cell_uuid, spec_fields,
            requested_networks, loaded)
        # Only the run that created the instance keeps it, with its block
        # device mappings, and no host was asked to build it before that
        # run's first attempt.
        kept = dict(loaded or {})
        if kept:
            # The host's build changes them: a later attempt loads them.
            loaded.clear()
        secrets = common.request_secrets(requester, admin_password,
                                         injected_files)
        with events.stage_event(context, cell, instance.uuid, self.name,
                                num_attempts):
            if not kept and not resumed:
                # An alternate, or a host the scheduler chose before this
                # run: it may have gone down since.
                self._require_up(context, conductor, cell, host)
            require_injected_files(requester, has_injected_files, secrets,
                                   instance)
            if not self._waits(context, conductor, cell, host):
                alternates = common.from_primitive(selections)[
                    host_index + 1:]
                return self._cast(
                    context, conductor, instance, cell, spec, host,
                    alternates, num_attempts, image, accelerators, secrets)
            return self._build(
                context, conductor, instance, cell, spec, host, host_index,
                num_attempts, image, accelerators, secrets, handed_to_host,
                kept)

    @staticmethod
    def _cast(context, conductor, instance, cell, spec, host, alternates,
              num_attempts, image, accelerators, secrets):
        """Cast to a host older than the waiting build, with alternates."""
        if instance.host:
            LOG.info('The host has the instance already', instance=instance)
            return build_results.ACTIVE
        cast_to_host(context, conductor, instance, cell, spec, host,
                     alternates, num_attempts, image, accelerators, secrets)
        return 'cast'

    def _build(self, context, conductor, instance, cell, spec, host,
               host_index, num_attempts, image, accelerators, secrets,
               handed_to_host, kept):
        """Build on the attempt's host and wait for the outcome.

        :param kept: what the run that created the instance kept of it,
            empty unless this is that run's first attempt.
        """
        if host_index > 0:
            self._prepare_reschedule(context, conductor, instance, cell,
                                     spec, host)
        scheduler_utils.fill_provider_mapping(spec, host)
        arguments = _host_call_arguments(
            context, instance, cell, spec, host, num_attempts, image,
            accelerators, secrets, kept.get('bdms'))
        LOG.debug('Building on host %s, node %s', host.service_host,
                  host.nodename, instance=instance)
        if handed_to_host is not None:
            # The run that started this flow (not one resumed) lets the
            # request's RPC handler return now.
            handed_to_host.set()
        try:
            outcome = self._ask_host(context, conductor, instance, cell,
                                     arguments, asked_before=not kept)
        except exception.OrchestrationEngineStopped:
            raise
        except Exception:
            # No outcome: the host did not come back in time, or failed
            # otherwise. Unless choose-host moves the build to another host,
            # the instance is set ERROR; deleting the server cleans up after
            # the host.
            with excutils.save_and_reraise_exception():
                LOG.exception('Build on host %s gave no outcome',
                              host.service_host, instance=instance)
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

    def revert(self, context, result, failure, **inputs):
        """Have the attempt's host undo the build of an aborted flow.

        The host sets the instance ERROR, which stops a build of it that
        starts later, then destroys the guest and releases the ports,
        volumes, claim and allocation (compute abort_build); a host that
        does not answer is asked again until
        [orchestration]host_restart_timeout has passed. After any other
        failure there is nothing to undo: the host undid the build
        that failed. A host too old to undo a build makes the revert fail:
        the flow ends ERROR, and deleting the server removes the build.
        """
        if failure.type != persistence.ABORTED['type']:
            return
        conductor = inputs['conductor']
        host = common.from_primitive(inputs['host'])
        context = common.user_context(context, inputs['requester'])
        try:
            instance, cell = self._instance(context, inputs['instance_uuid'],
                                            inputs['cell_uuid'])
        except exception.InstanceNotFound:
            return
        if not self._waits(context, conductor, cell, host):
            raise exception.BuildNotUndone(
                uuid=instance.uuid, host=host.service_host,
                reason='its compute service is older than version %d' %
                       WAITING_BUILD_SERVICE_VERSION)
        LOG.info('Undoing the aborted build on host %s', host.service_host,
                 instance=instance)
        # As in _ask_host: the call waits for any build of the instance.
        cctxt = copy.copy(context)
        nova_context.set_target_cell(cctxt, cell)
        timeout = CONF.orchestration.host_restart_timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                with instance.obj_alternate_context(cctxt):
                    conductor.compute_rpcapi.abort_build(
                        cctxt, instance, host.service_host,
                        requested_networks=common.from_primitive(
                            inputs['requested_networks']),
                        reason=failure.record.get('message'))
                return
            except messaging.MessagingTimeout as exc:
                # The host stopped or restarted: it undoes what is left
                # once it is back.
                LOG.warning('Host %s did not undo the build: %s',
                            host.service_host, exc, instance=instance)
                if time.monotonic() >= deadline:
                    raise exception.HostGaveNoOutcome(
                        host=host.service_host, seconds=timeout, error=exc)
            if conductor.orchestration.stopping.wait(HOST_RETRY_INTERVAL):
                raise exception.OrchestrationEngineStopped()

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
    def _require_up(context, conductor, cell, host):
        """Raise BuildHostDown for a host whose service is down or gone.

        Nothing was asked of such a host, so that choose-host can try the
        next alternate. The selected host of the run that created the
        instance is not looked up: the scheduler has just found it up.
        """
        with nova_context.target_cell(context, cell) as cctxt:
            try:
                service = objects.Service.get_by_compute_host(
                    cctxt, host.service_host)
            except exception.ComputeHostNotFound:
                service = None
        if (service is None or
                not conductor.servicegroup_api.service_is_up(service)):
            LOG.warning('Not building on host %s: its compute service is '
                        'down or gone', host.service_host)
            raise exception.BuildHostDown(host=host.service_host)

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


def require_injected_files(requester, has_injected_files, secrets, instance):
    """End the build if its personality files were lost with a conductor.

    :param secrets: what common.request_secrets found
    """
    if has_injected_files and not secrets['injected_files']:
        raise exception.BuildEnded(
            uuid=instance.uuid, reason='the personality files of the '
            'request were held by a conductor that stopped, and this one '
            'does not have them (%s)' % credentials.why_not_unsealed(
                requester.get(credentials.SEALED), 'they were not'))


def _host_call_arguments(context, instance, cell, spec, host, num_attempts,
                         image, accelerators, secrets, bdms=None):
    """What build_and_run_instance needs besides host and alternates.

    :param secrets: what common.request_secrets found
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
        image=image, request_spec=spec, filter_properties=filter_props,
        requested_networks=common.from_primitive(
            accelerators['requested_networks']),
        security_groups=[s.identifier for s in spec.security_groups],
        block_device_mapping=bdms, host=host.service_host,
        node=host.nodename, limits=host.limits,
        accel_uuids=accelerators['uuids'], **secrets)


def cast_to_host(context, conductor, instance, cell, spec, host, alternates,
                 num_attempts, image, accelerators, secrets):
    """The legacy hand-over: the host reschedules through build_instances.

    :param secrets: what common.request_secrets found
    """
    scheduler_utils.fill_provider_mapping(spec, host)
    arguments = _host_call_arguments(context, instance, cell, spec, host,
                                     num_attempts, image, accelerators,
                                     secrets)
    if instance.launched_on:
        # launched_on names a host a build flow waits for (ChooseHost);
        # a restarted host leaves such a build, not started, to its flow.
        with nova_context.target_cell(context, cell) as cctxt:
            with instance.obj_alternate_context(cctxt):
                instance.launched_on = None
                instance.save()
    LOG.debug('Selected host: %s; Selected node: %s; Alternates: %s',
              host.service_host, host.nodename,
              [(alt.service_host, alt.nodename) for alt in alternates],
              instance=instance)
    with nova_context.target_cell(context, cell) as cctxt:
        with instance.obj_alternate_context(cctxt):
            conductor.compute_rpcapi.build_and_run_instance(
                cctxt, instance=instance, host_list=alternates, **arguments)
