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

"""Shared by the stages of the build flows.

The flows' kinds, versions and uuids, the values they store, and the
requester's context a run acts with.
"""

import uuid

from oslo_log import log as logging

from nova import context as nova_context
from nova import exception
from nova import objects
from nova.objects import base as obj_base
from nova.orchestration import credentials

LOG = logging.getLogger(__name__)

REQUEST_KIND = 'build-request'
INSTANCE_KIND = 'build-instance'
VERSION = 1
# Version 2 of build-instance waits for the host's build and reschedules
# to the stored alternates itself (compute service version 75).
INSTANCE_VERSION = 2
# Never stored: the manager whose clients the stages use, what the request
# carries that must not be written to the database, the RequestSpecs the
# request carries (by instance uuid), the event a build-instance flow sets
# once it hands its build to a host, and the dict in which its run keeps
# the instance it created, with its cell, RequestSpec and block device
# mappings, for the next stages (see instance.InstanceTask._load).
TRANSIENT = ('conductor', 'admin_password', 'injected_files',
             'request_specs', 'handed_to_host', 'loaded')
# The build flows have uuids derived from their instances': a schedule
# stage executed again finds the flows an earlier execution made, and a
# conductor finds the flow nova-api stored for the request it casts.
_NAMESPACE = uuid.UUID('5b7a4e02-8d3f-4c61-9a7e-1f2b3c4d5e6f')


def instance_flow_uuid(instance_uuid):
    """The uuid of the build-instance flow of an instance."""
    return str(uuid.uuid5(_NAMESPACE, instance_uuid))


def bdm_uuid(instance_uuid, index):
    """The uuid of an instance's block device mapping, by its place.

    A stage run again then updates the rows its first run created.
    """
    return str(uuid.uuid5(_NAMESPACE, '%s:bdm:%d' % (instance_uuid, index)))


def request_flow_uuid(instance_uuid):
    """The uuid of the build-request flow of a request's first instance."""
    return str(uuid.uuid5(_NAMESPACE, REQUEST_KIND + ':' + instance_uuid))


def primitive(value):
    if value is None:
        return None
    if isinstance(value, list):
        return [primitive(item) for item in value]
    return value.obj_to_primitive()


def from_primitive(primitive, context=None):
    if primitive is None:
        return None
    if isinstance(primitive, list):
        return [from_primitive(item, context) for item in primitive]
    return obj_base.NovaObject.obj_from_primitive(primitive, context)


#: The key of a context record telling that the request had a token.
HAD_TOKEN = 'had_auth_token'


def context_record(context, secrets=None):
    """The request context; its token, service catalog and the request's
    secrets only sealed (see nova.orchestration.credentials).

    Whether the request had a token is kept in clear (HAD_TOKEN): a
    resumed run tells a token it lost from one there never was.
    """
    values = context.to_dict()
    for key in ('auth_token', 'service_catalog'):
        values.pop(key, None)
    if context.auth_token:
        values[HAD_TOKEN] = True
    sealed = credentials.seal(context, secrets)
    if sealed is not None:
        values[credentials.SEALED] = sealed
    return values


def unsealed(record):
    """What the context record holds sealed, or {}."""
    return credentials.unseal(record.get(credentials.SEALED)) or {}


def request_secrets(requester, admin_password, injected_files):
    """The request's secrets: transient, else those sealed in its flow.

    The run the request's handler starts has the request's admin password
    and personality files as transient values; a run resumed by another
    conductor has only what the flow stored sealed, if anything. Returns
    them as the keyword arguments of build_and_run_instance.
    """
    sealed = unsealed(requester).get('secrets', {})
    if admin_password is None:
        admin_password = sealed.get('admin_password')
    if injected_files is None:
        injected_files = sealed.get('injected_files')
    return {'admin_password': admin_password,
            'injected_files': injected_files}


def without_sealed(inputs):
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


def while_handling(failure, cleanup):
    """Call cleanup(exc) while the failure's exception is being handled.

    The cleanup helpers a revert calls ran in except clauses before build
    flows: the instance fault and the error notification they write read
    the exception being handled (sys.exc_info, inspect.trace).

    :param failure: the task.Failure a revert received
    """
    try:
        raise failure.exception()
    except Exception as exc:
        cleanup(exc)


def forget_deleted(context, conductor, instance_uuid):
    """Forget an instance whose server was deleted before it was created.

    Its mapping, request spec and allocations go. An instance mapped to a
    cell was built without this flow (by a conductor that predates it): it
    is left alone.
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
    try:
        objects.RequestSpec.get_by_instance_uuid(
            context, instance_uuid).destroy()
    except exception.RequestSpecNotFound:
        pass
    conductor.report_client.delete_allocation_for_instance(
        context, instance_uuid, force=True)


def resumed(context, record):
    """Whether a run's own context is not the request's.

    A run resumed by a sweep runs with the conductor's admin context.
    """
    return context.request_id != record.get('request_id')


def user_context(context, record):
    """The requester's context: the running one if it is the same request.

    A resumed run acts for the requester as the first run did, with a
    context rebuilt from the record, with the token and service catalog
    it holds sealed, if any (see nova.orchestration.credentials).
    """
    if not resumed(context, record):
        return context
    values = dict(record)
    values.pop(credentials.SEALED, None)
    values.pop(HAD_TOKEN, None)
    opened = unsealed(record)
    values.update(auth_token=opened.get('auth_token'),
                  service_catalog=opened.get('service_catalog'))
    return nova_context.RequestContext.from_dict(values)


def request_spec(context, instance_uuid, spec_fields, requested_networks,
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
        setattr(spec, name, from_primitive(value))
    spec.requested_networks = (from_primitive(requested_networks) or
                               objects.NetworkRequestList(objects=[]))
    return spec


def tags(tags):
    return [objects.Tag(tag=tag) for tag in tags]


def lost_token(context, requester, instance_uuid, requests):
    """Why a resumed run lacks the requester's token; None if it does not.

    ``context`` is the run's own (see resumed). A resumed run acts for
    the requester with a context rebuilt from the flow's inputs
    (user_context), which hold the token only sealed, if at all:
    without it, services that authenticate the requester refuse its
    requests. nova's neutron and cinder clients use their own
    credentials for an admin requester only; nothing does for the image
    download or Cyborg. A request that had no token (e.g. with
    [api]auth_strategy = noauth2) lost nothing: None, after the warning.

    :param requests: the requests made as the requester, for the log
    """
    if not resumed(context, requester):
        return None
    if unsealed(requester).get('auth_token'):
        LOG.info('This build was resumed by another conductor: %s are made '
                 'with the requester\'s token, stored sealed in its flow.',
                 requests, instance_uuid=instance_uuid)
        return None
    why = credentials.why_not_unsealed(
        requester.get(credentials.SEALED), 'the request had none')
    LOG.warning('This build was resumed by a conductor that does not have '
                'the requester\'s token (%s): %s made as the requester can '
                'be refused.', why, requests, instance_uuid=instance_uuid)
    if not requester.get(HAD_TOKEN):
        return None
    # The instance fault keeps 255 characters: the reason comes first.
    return ('it was resumed without the requester\'s token (%s), which %s '
            'need' % (why, requests))


def require_token(context, requester, instance_uuid, requests):
    """End a resumed build that lost the requester's token.

    Its requests would be refused on every host the build is tried on,
    ending it ERROR with only the last host's error for a fault: the
    build ends before them, with the reason (see lost_token).
    """
    reason = lost_token(context, requester, instance_uuid, requests)
    if reason is not None:
        raise exception.BuildEnded(uuid=instance_uuid, reason=reason)
