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

"""Flow and stage records in the API database.

Every write is fenced: it only commits while the writer still owns the
flow's lease at the generation it claimed, so that a conductor which lost a
flow (it hung, or its stage overran its timeout) can never overwrite the
state written by the conductor that took the flow over. A stage transition
is one transaction of at most three statements: the fenced update of the
flow row (which also renews the lease), the update of the stage that ends
and the insert or update of the stage that begins.
"""

import collections
import datetime
import traceback

from oslo_db import api as oslo_db_api
from oslo_serialization import jsonutils
from oslo_utils import strutils
from oslo_utils import timeutils
from oslo_utils import uuidutils
import sqlalchemy as sa

from nova.db.api import api as api_db_api
from nova.db.api import models as api_models
from nova import exception
from nova.orchestration import states

# Upper bound of one encoded result, failure or set of inputs: what their
# MEDIUMTEXT columns hold on MySQL. Flows keep identifiers in their records
# rather than payloads where they can.
MAX_RECORD_BYTES = 2 ** 24 - 1
_TRACEBACK_CHARS = 4000

Fence = collections.namedtuple('Fence', 'flow_id uuid owner generation')
# What claim() returns: the fence, the flow row, its stage rows and the id
# of the stage row the claim started, if any.
Claim = collections.namedtuple('Claim', 'fence flow stages started')
FlowRecord = api_models.OrchestrationFlow
StageRecord = api_models.OrchestrationStage
# Writes go through Core tables on the transaction's connection: an ORM
# session and ORM-enabled statements cost more CPU than the statements
# themselves on a fast database.
_FLOWS = FlowRecord.__table__
_STAGES = StageRecord.__table__
# Built once: the SET clause comes from the keys of the parameters passed
# at execution, so SQLAlchemy's statement cache serves every transition.
_FENCED_FLOW_UPDATE = sa.update(_FLOWS).where(
    _FLOWS.c.id == sa.bindparam('fence_id'),
    _FLOWS.c.owner == sa.bindparam('fence_owner'),
    _FLOWS.c.lease_generation == sa.bindparam('fence_generation'))
# Writes that move a flow forward also check that it was not aborted, so
# that the check costs no statement of its own.
_FENCED_FORWARD_UPDATE = _FENCED_FLOW_UPDATE.where(
    _FLOWS.c.state != states.REVERTING)
_STAGE_FINISH = sa.update(_STAGES).where(
    _STAGES.c.id == sa.bindparam('stage_id'),
    _STAGES.c.state == sa.bindparam('prior_state'))
_STAGE_UPDATE = sa.update(_STAGES).where(
    _STAGES.c.id == sa.bindparam('stage_id'))
# A RUNNING stage started again: its conductor stopped before its outcome.
_STAGE_RERUN = sa.update(_STAGES).where(
    _STAGES.c.id == sa.bindparam('stage_id'),
    _STAGES.c.state == states.STAGE_RUNNING).values(
    executions=_STAGES.c.executions + 1)
_STAGE_INSERT = sa.insert(_STAGES)

# Retries a whole transaction on a lost connection or a deadlock.
retry_on_disconnect = oslo_db_api.wrap_db_retry(
    max_retries=5, retry_interval=0.5, inc_retry_interval=True,
    retry_on_disconnect=True, retry_on_deadlock=True)

# The state a stage must be in for a transition to a given state.
_PRIOR_STATE = {
    states.STAGE_SUCCESS: states.STAGE_RUNNING,
    states.STAGE_FAILURE: states.STAGE_RUNNING,
    states.STAGE_REVERTED: states.STAGE_REVERTING,
}


class AlreadyRecorded(Exception):
    """A transition found its stage already moved on.

    This happens when a transaction is retried after a commit whose
    acknowledgement was lost: the caller must reload the flow's records.
    """


class AbortRequested(Exception):
    """A forward transition found that the flow was asked to revert."""


# The failure stored on a flow that an operator aborts.
ABORTED = {'type': 'FlowAborted', 'message': 'aborted by operator',
           'stage': None, 'traceback': None}


def encode(value, what, stage):
    """JSON-encode a stored value, refusing oversized records.

    Values are stored as given: masking password-like keys would corrupt
    data (a BDM's encryption_secret_uuid), so secrets must never reach the
    store; flows declare them transient.
    """
    text = jsonutils.dumps(value)
    size = len(text.encode('utf-8'))
    if size > MAX_RECORD_BYTES:
        raise exception.OrchestrationRecordTooLarge(
            what=what, stage=stage, size=size, limit=MAX_RECORD_BYTES)
    return text


def decode(text):
    """Decode a stored record; ValueError if it is not valid JSON."""
    return None if text is None else jsonutils.loads(text)


def failure_record(exc, stage=None):
    """The stored, masked description of why a stage or flow failed."""
    tb = ''.join(traceback.format_exception(type(exc), exc,
                                            exc.__traceback__))
    return {
        'type': type(exc).__name__,
        'message': strutils.mask_password(str(exc))[:_TRACEBACK_CHARS],
        'stage': stage,
        'traceback': strutils.mask_password(tb)[-_TRACEBACK_CHARS:],
    }


def _lease_end(lease_seconds):
    now = timeutils.utcnow()
    return now, now + datetime.timedelta(seconds=lease_seconds)


@api_db_api.context_manager.writer.connection
def create_flow(context, kind, version, inputs, instance_uuid=None,
                request_id=None, uuid=None, hold_seconds=0):
    """Store a new PENDING flow; return its uuid.

    Called inside a caller's API DB transaction, the flow is committed
    together with whatever else that transaction writes.

    :param hold_seconds: leave the flow to whoever starts it for this long:
        claim() takes a flow nobody claimed yet at once, but a sweep only
        lists it once the hold expired (its starter is gone, or the RPC
        meant to start it was lost).
    """
    uuid = uuid or uuidutils.generate_uuid()
    now, held_until = _lease_end(hold_seconds)
    context.connection.execute(sa.insert(_FLOWS).values(
        uuid=uuid, kind=kind, version=version,
        inputs=encode(inputs, 'inputs', kind), instance_uuid=instance_uuid,
        request_id=request_id, state=states.PENDING,
        lease_expires_at=held_until, lease_generation=0, created_at=now))
    return uuid


@retry_on_disconnect
@api_db_api.context_manager.writer.connection
def claim(context, flow_uuid, owner, lease_seconds, first_stage=None):
    """Take an active flow that is unowned or whose lease expired.

    Returns None, or a Claim: the Fence, and the flow row and its stage
    rows (as load() returns them) read in the same transaction. The
    compare-and-swap bumps the lease generation, which invalidates the
    fence of the previous owner.

    :param first_stage: a function given the kind and version of a PENDING
        flow, returning the name of its first stage or None. Given a name,
        the claim also starts that stage, as the transition that starts a
        flow does: the flow becomes RUNNING and a RUNNING row is inserted
        (position 0, attempt 1), whose id is the Claim's ``started``. The
        flow row returned is the one read before, still PENDING.
    """
    now, expires = _lease_end(lease_seconds)
    result = context.connection.execute(
        sa.update(_FLOWS).where(
            _FLOWS.c.uuid == flow_uuid, _FLOWS.c.state.in_(states.ACTIVE),
            sa.or_(_FLOWS.c.lease_expires_at <= now,
                   _FLOWS.c.owner.is_(None))).values(
            owner=owner, lease_generation=_FLOWS.c.lease_generation + 1,
            lease_expires_at=expires))
    if result.rowcount != 1:
        return None
    flow = context.connection.execute(
        sa.select(_FLOWS).where(_FLOWS.c.uuid == flow_uuid)).one()
    fence = Fence(flow.id, flow_uuid, owner, flow.lease_generation)
    # A flow leaves PENDING in the transaction that starts its first
    # stage: a PENDING flow has no stage rows to read.
    if flow.state != states.PENDING:
        stages = context.connection.execute(
            sa.select(_STAGES).where(_STAGES.c.flow_id == flow.id).order_by(
                _STAGES.c.position, _STAGES.c.attempt)).all()
        return Claim(fence, flow, stages, None)
    name = first_stage(flow.kind, flow.version) if first_stage else None
    if name is None:
        return Claim(fence, flow, [], None)
    started = write_transition(
        context, fence, lease_seconds, flow_values={'state': states.RUNNING},
        start={'position': 0, 'attempt': 1, 'name': name,
               'state': states.STAGE_RUNNING})
    return Claim(fence, flow, [], started)


@api_db_api.context_manager.reader.connection
def claimable(context, limit, definitions=None):
    """Uuids of active flows whose lease expired, oldest lease first.

    :param definitions: if given, only flows of these (kind, version)
        pairs: a conductor that does not know a flow leaves it to one that
        does (e.g. a newer one, during a rolling upgrade).
    """
    now = timeutils.utcnow()
    query = sa.select(_FLOWS.c.uuid).where(
        _FLOWS.c.state.in_(states.ACTIVE),
        _FLOWS.c.lease_expires_at <= now)
    if definitions is not None:
        query = query.where(sa.or_(sa.false(), *[
            sa.and_(_FLOWS.c.kind == kind, _FLOWS.c.version == version)
            for kind, version in definitions]))
    rows = context.connection.execute(
        query.order_by(_FLOWS.c.lease_expires_at).limit(limit))
    return [row.uuid for row in rows]


def _fenced_update(context, fence, values, forward=False):
    statement = _FENCED_FORWARD_UPDATE if forward else _FENCED_FLOW_UPDATE
    result = context.connection.execute(statement, dict(
        values, fence_id=fence.flow_id, fence_owner=fence.owner,
        fence_generation=fence.generation))
    if result.rowcount == 1:
        return
    if forward:
        row = context.connection.execute(
            sa.select(_FLOWS.c.owner, _FLOWS.c.lease_generation,
                      _FLOWS.c.state).where(
                _FLOWS.c.id == fence.flow_id)).one()
        if tuple(row) == (fence.owner, fence.generation, states.REVERTING):
            raise AbortRequested()
    raise exception.OrchestrationLeaseLost(
        uuid=fence.uuid, owner=fence.owner, generation=fence.generation)


@retry_on_disconnect
@api_db_api.context_manager.writer.connection
def renew(context, fence, lease_seconds):
    """Extend the lease; raise OrchestrationLeaseLost if it was taken."""
    now, expires = _lease_end(lease_seconds)
    _fenced_update(context, fence, {'lease_expires_at': expires})


@api_db_api.context_manager.writer.connection
def write_transition(context, fence, lease_seconds, finish=None, start=None,
                     flow_values=None, forward=False):
    """Record one step of a flow in a single fenced transaction.

    Joins the caller's API DB transaction if there is one (see
    ``Task.transactional``); ``transition`` is the same in a transaction
    of its own, retried on disconnects and deadlocks.

    :param finish: dict with the ``id`` of the stage row that ends and its
        new ``state``, ``result`` and ``failure`` (encoded).
    :param start: dict describing the stage that begins: with an ``id``,
        that row's new ``state`` (with ``rerun``, the RUNNING row is
        started again: its executions counted, its updated_at now, its
        owner and start time those of its first execution); else
        a new row's ``position``, ``attempt``, ``name``, ``state`` and
        optionally ``result``.
    :param flow_values: columns of the flow row to change (e.g. state).
    :param forward: the step moves the flow forward (starts a stage, ends
        the flow SUCCESS or starts its rollback): raise AbortRequested,
        writing nothing, if the flow was aborted.
    :returns: the id of the started stage row, if any.
    """
    now, expires = _lease_end(lease_seconds)
    values = dict(flow_values or {}, lease_expires_at=expires,
                  updated_at=now)
    _fenced_update(context, fence, values, forward=forward)
    if finish:
        changes = dict(finish, updated_at=now)
        if finish['state'] in (states.STAGE_SUCCESS, states.STAGE_FAILURE):
            changes['finished_at'] = now
        changes['stage_id'] = changes.pop('id')
        changes['prior_state'] = _PRIOR_STATE[finish['state']]
        result = context.connection.execute(_STAGE_FINISH, changes)
        if result.rowcount != 1:
            raise AlreadyRecorded()
    if not start:
        return None
    if start.get('rerun'):
        result = context.connection.execute(_STAGE_RERUN, {
            'stage_id': start['id'], 'updated_at': now})
        if result.rowcount != 1:
            raise AlreadyRecorded()
        return start['id']
    if 'id' in start:
        context.connection.execute(_STAGE_UPDATE, {
            'stage_id': start['id'], 'state': start['state'],
            'owner': fence.owner, 'updated_at': now})
        return start['id']
    result = context.connection.execute(_STAGE_INSERT, dict(
        start, flow_id=fence.flow_id, owner=fence.owner, started_at=now,
        created_at=now))
    return result.inserted_primary_key[0]


transition = retry_on_disconnect(write_transition)


@retry_on_disconnect
@api_db_api.context_manager.writer.connection
def hand_over(context, fence):
    """Let any conductor resume a flow now: this one stops.

    The lease expires now, and the execution of the stage this conductor
    stops waiting for is not counted: the stage was not interrupted, and
    its conductor handed its outcome over to the next one.
    """
    now = timeutils.utcnow()
    _fenced_update(context, fence, {'lease_expires_at': now,
                                    'updated_at': now})
    context.connection.execute(
        sa.update(_STAGES).where(
            _STAGES.c.flow_id == fence.flow_id,
            _STAGES.c.state == states.STAGE_RUNNING).values(
            executions=_STAGES.c.executions - 1, updated_at=now))


@retry_on_disconnect
@api_db_api.context_manager.writer.connection
def abort(context, flow_uuid, started=False):
    """Ask for a PENDING or RUNNING flow to be reverted.

    The flow becomes REVERTING with the ABORTED failure, its lease left
    alone: a live owner sees the request at its next forward transition and
    reverts the flow itself; a flow nobody runs is reverted by whichever
    conductor claims it next.

    :param started: only a flow that started a stage is aborted (checked
        in the same statement); see task.ONCE_STARTED.
    """
    statement = sa.update(_FLOWS).where(
        _FLOWS.c.uuid == flow_uuid,
        _FLOWS.c.state.in_((states.PENDING, states.RUNNING)))
    if started:
        statement = statement.where(
            sa.exists().where(_STAGES.c.flow_id == _FLOWS.c.id))
    result = context.connection.execute(statement.values(
        state=states.REVERTING,
        failure=encode(ABORTED, 'failure', flow_uuid),
        updated_at=timeutils.utcnow()))
    if result.rowcount == 1:
        return
    reason = 'only a pending or running flow can be aborted'
    if started:
        reason = ('only a pending or running flow that started a stage can '
                  'be aborted: abort it once it runs, when its first '
                  "stage's revert can undo what its creator committed it to")
    _raise_invalid_state(context, flow_uuid, reason)


@retry_on_disconnect
@api_db_api.context_manager.writer.connection
def release(context, flow_uuid):
    """Make an active or ERROR flow claimable at once by any conductor.

    The lease expires now and its generation is bumped, so that an owner,
    even a live one, is fenced out at its next write. An ERROR flow becomes
    REVERTING: its rollback is tried again, starting with the revert that
    failed.
    """
    now = timeutils.utcnow()
    values = dict(owner=None, lease_expires_at=now, updated_at=now,
                  lease_generation=_FLOWS.c.lease_generation + 1)
    for states_from, extra in ((states.ACTIVE, {}),
                               ((states.ERROR,),
                                {'state': states.REVERTING})):
        result = context.connection.execute(
            sa.update(_FLOWS).where(
                _FLOWS.c.uuid == flow_uuid,
                _FLOWS.c.state.in_(states_from)).values(
                dict(values, **extra)))
        if result.rowcount == 1:
            return
    _raise_invalid_state(context, flow_uuid, 'only an active or ERROR flow '
                         'can be resumed')


def _raise_invalid_state(context, flow_uuid, reason):
    state = context.connection.execute(
        sa.select(_FLOWS.c.state).where(
            _FLOWS.c.uuid == flow_uuid)).scalar_one_or_none()
    if state is None:
        raise exception.OrchestrationFlowNotFound(uuid=flow_uuid)
    raise exception.OrchestrationFlowInvalidState(
        uuid=flow_uuid, state=state, reason=reason)


@retry_on_disconnect
@api_db_api.context_manager.writer.connection
def purge(context, before, limit):
    """Delete finished flows last updated before a time, with their stages.

    Deletes at most limit flows in one transaction; returns how many.
    """
    flow_ids = context.connection.execute(
        sa.select(_FLOWS.c.id).where(
            _FLOWS.c.state.in_(states.FINISHED),
            _FLOWS.c.updated_at < before).limit(limit).with_for_update()
    ).scalars().all()
    if flow_ids:
        context.connection.execute(
            sa.delete(_STAGES).where(_STAGES.c.flow_id.in_(flow_ids)))
        context.connection.execute(
            sa.delete(_FLOWS).where(_FLOWS.c.id.in_(flow_ids)))
    return len(flow_ids)


@api_db_api.context_manager.reader.connection
def count_purgeable(context, before):
    """How many finished flows were last updated before a time."""
    return context.connection.execute(
        sa.select(sa.func.count()).select_from(_FLOWS).where(
            _FLOWS.c.state.in_(states.FINISHED),
            _FLOWS.c.updated_at < before)).scalar()


@api_db_api.context_manager.reader
def list_flows(context, state=None, kind=None, instance_uuid=None,
               owner=None, stuck=False, limit=None):
    """Flow rows matching every filter given, oldest first.

    :param stuck: only active flows whose lease expired, i.e. that no
        conductor works on until a sweep claims them.
    :param limit: only the ``limit`` most recently created of them.
    """
    query = sa.select(FlowRecord)
    for column, value in ((FlowRecord.state, state), (FlowRecord.kind, kind),
                          (FlowRecord.instance_uuid, instance_uuid),
                          (FlowRecord.owner, owner)):
        if value is not None:
            query = query.where(column == value)
    if stuck:
        query = query.where(FlowRecord.state.in_(states.ACTIVE),
                            FlowRecord.lease_expires_at <= timeutils.utcnow())
    if limit is None:
        return context.session.execute(
            query.order_by(FlowRecord.id)).scalars().all()
    newest = context.session.execute(
        query.order_by(FlowRecord.id.desc()).limit(limit)).scalars().all()
    return newest[::-1]


@api_db_api.context_manager.reader.connection
def existing_flows(context, flow_uuids):
    """The subset of flow_uuids that are stored."""
    rows = context.connection.execute(
        sa.select(_FLOWS.c.uuid).where(_FLOWS.c.uuid.in_(flow_uuids)))
    return {row.uuid for row in rows}


@api_db_api.context_manager.reader
def flows_of_instance(context, instance_uuid):
    """Flow rows of an instance, oldest first."""
    return context.session.execute(
        sa.select(FlowRecord).where(
            FlowRecord.instance_uuid == instance_uuid).order_by(
            FlowRecord.id)).scalars().all()


@api_db_api.context_manager.reader
def load(context, flow_uuid):
    """The flow row and its stage rows (by position, then attempt)."""
    flow = context.session.execute(
        sa.select(FlowRecord).where(
            FlowRecord.uuid == flow_uuid)).scalar_one_or_none()
    if flow is None:
        raise exception.OrchestrationFlowNotFound(uuid=flow_uuid)
    stages = context.session.execute(
        sa.select(StageRecord).where(StageRecord.flow_id == flow.id).order_by(
            StageRecord.position, StageRecord.attempt)).scalars().all()
    return flow, list(stages)
