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

"""The engine: runs, resumes and rolls back stored flows.

Running and resuming are the same code path: load the flow's records,
decide from each stage's stored state what to do next, and continue. Every
decision is persisted before the engine acts on it, so a crash at any point
leaves a state from which any conductor can carry on.
"""

import os
import threading
import time

from oslo_db import exception as db_exc
from oslo_log import log as logging
from oslo_utils import uuidutils

import nova.conf
from nova.db.api import api as api_db_api
from nova import exception
from nova.orchestration import persistence
from nova.orchestration import states
from nova.orchestration import task as task_mod
from nova import thread_pool_factory

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)


class _Row(object):
    """The engine's view of one stored stage row."""

    def __init__(self, row_id, position, attempt, name, state, result=None,
                 failure=None):
        self.id = row_id
        self.position = position
        self.attempt = attempt
        self.name = name
        self.state = state
        self.result = result
        self.failure = failure


# How often one pass re-reads a flow whose records moved under a retried
# write before it gives up and leaves the flow to a later sweep.
_MAX_RESYNCS = 10


class _Resync(Exception):
    """The stored records moved on under a retried write: reload them."""


class Engine(object):
    """Claims flows, runs them on a pool and keeps their leases alive."""

    def __init__(self, owner=None, transient=None):
        """:param transient: values every run of this engine receives for
            the transient names of its flows, never stored.
        """
        self.owner = owner or '%s:%d:%s' % (
            CONF.host, os.getpid(), uuidutils.generate_uuid()[:8])
        self.transient = dict(transient or {})
        self._lock = threading.Lock()
        # flow uuid -> [fence, monotonic deadline of the running stage]
        self._held = {}
        # Set when the service stops: stages that wait give up (raising
        # OrchestrationEngineStopped) and their flows are handed over.
        self.stopping = threading.Event()

    @property
    def lease_seconds(self):
        return CONF.orchestration.lease_duration

    def start(self, context, flow_uuid, transient=None):
        """Claim a flow if nobody holds it and run it on the pool.

        :param transient: values for the flow's transient names, for this
            run only (a run resumed elsewhere does not have them).
        :returns: the future of the run, or None if the flow is finished or
            owned by a live conductor.
        """
        claim = self._claim(context, flow_uuid)
        if claim is None:
            return None
        return thread_pool_factory.spawn_on(
            thread_pool_factory.ExecutorType.ORCHESTRATION,
            self._run_held, context, claim, transient)

    def run(self, context, flow_uuid, transient=None):
        """Claim and run a flow in the calling thread; return its state.

        Returns None if the flow could not be claimed or was lost to
        another conductor while running.
        """
        claim = self._claim(context, flow_uuid)
        if claim is None:
            return None
        return self._run_held(context, claim, transient)

    def _claim(self, context, flow_uuid):
        """Claim a flow and hold it; None if it cannot be claimed.

        A flow that has not started yet starts in the claim's transaction.
        """
        claim = persistence.claim(context, flow_uuid, self.owner,
                                  self.lease_seconds, _first_stage)
        if claim is not None:
            with self._lock:
                self._held[flow_uuid] = [claim.fence, None]
        return claim

    def stop(self):
        """Let waiting stages give up and hand their flows over.

        The stage that gave up stays running in the flow's records, as
        after a crash, and the flow's lease expires at once: the next sweep
        of any conductor resumes it under the stage's crash policy.
        """
        self.stopping.set()

    def _run_held(self, context, claim, transient=None):
        fence = claim.fence
        try:
            return _FlowRun(self, context, fence, transient).run(
                claim.flow, claim.stages, claim.started)
        except exception.OrchestrationLeaseLost as e:
            LOG.warning('Stopped working on a flow: %s', e)
            return None
        except exception.OrchestrationEngineStopped:
            LOG.info('Handing flow %s over as this service stops',
                     fence.uuid)
            try:
                persistence.renew(context, fence, 0)
            except (exception.OrchestrationLeaseLost, db_exc.DBError) as e:
                LOG.warning('Flow %s is resumed when its lease expires: '
                            '%s', fence.uuid, e)
            return None
        except Exception:
            # The lease will expire and another sweep will resume the flow
            # from its last committed transition.
            LOG.exception('Flow %s stopped on an unexpected error; it will '
                          'be resumed when its lease expires.', fence.uuid)
            return None
        except BaseException as e:
            # The thread was killed or the process exits: the flow is
            # resumed as after a crash. A run on the pool would otherwise
            # stop without a word, its future holding the exception.
            LOG.warning('Flow %s stopped on %r; it will be resumed when its '
                        'lease expires.', fence.uuid, e)
            raise
        finally:
            with self._lock:
                # This engine may have claimed the flow again meanwhile (a
                # stage of this run overran its timeout): leave that run's
                # entry alone.
                if self._holds(fence):
                    del self._held[fence.uuid]

    def sweep(self, context):
        """Claim and start flows whose lease expired, up to free capacity.

        :returns: the futures of the runs started.
        """
        with self._lock:
            free = CONF.orchestration.pool_size - len(self._held)
        if free <= 0:
            return []
        futures = []
        # Flows this engine does not know are left to a conductor that
        # does, rather than ended in ERROR (rolling upgrades).
        for flow_uuid in persistence.claimable(context, free,
                                               task_mod.definitions()):
            future = self.start(context, flow_uuid)
            if future is not None:
                futures.append(future)
        return futures

    def renew_leases(self, context):
        """Renew the lease of every flow this engine runs.

        A flow whose current stage overran its timeout is left to expire, so
        that the sweep hands it to a conductor which applies the stage's
        crash policy; the overrunning thread's next write is then fenced out.
        """
        with self._lock:
            held = list(self._held.values())
        now = time.monotonic()
        for fence, deadline in held:
            if deadline is not None and now > deadline:
                LOG.warning('A stage of flow %s overran its timeout; its '
                            'lease is no longer renewed.', fence.uuid)
                continue
            try:
                persistence.renew(context, fence, self.lease_seconds)
            except exception.OrchestrationLeaseLost as e:
                LOG.warning('%s', e)
            except db_exc.DBError:
                LOG.exception('Could not renew the lease of flow %s',
                              fence.uuid)

    def _holds(self, fence):
        held = self._held.get(fence.uuid)
        return held is not None and held[0] == fence

    def _set_deadline(self, fence, seconds):
        with self._lock:
            if self._holds(fence):
                self._held[fence.uuid][1] = (
                    None if seconds is None else time.monotonic() + seconds)


def _first_stage(kind, version):
    """The name of the first stage of a known flow, else None."""
    flow = task_mod.lookup(kind, version)
    return None if flow is None else flow.stages[0].item.name


class _FlowRun(object):
    """One engine's pass over one flow: forward, retry or revert."""

    def __init__(self, engine, context, fence, transient=None):
        self.engine = engine
        self.context = context
        self.fence = fence
        self.transient = dict(engine.transient, **(transient or {}))
        self.flow = None
        self.state = None
        self.inputs = None
        self.rows = {}
        # Rows this pass started: RUNNING for them is not a crash.
        self.started = set()

    # -- loading -----------------------------------------------------------

    def run(self, flow_row, stage_rows, started=None):
        """Run the flow from the records read when it was claimed.

        :param started: the id of the first stage's row, if the claim
            started it.
        """
        self.state = flow_row.state
        try:
            self._load(flow_row, stage_rows)
        except exception.OrchestrationFlowInvalid as e:
            reason = e
        except (ValueError, TypeError) as e:
            reason = self._invalid('undecodable record: %s' % e)
        else:
            reason = None
        if reason is not None:
            LOG.error('%s', reason)
            failure = persistence.failure_record(reason)
            # The first stage, if the claim started it, cannot run.
            finish = None if started is None else {
                'id': started, 'state': states.STAGE_FAILURE,
                'failure': persistence.encode(failure, 'failure',
                                              self.fence.uuid)}
            return self._end(states.ERROR, failure, finish)
        if started is not None:
            stage = self.flow.stages[0]
            self.state = states.RUNNING
            self.rows[(0, 1)] = _Row(started, 0, 1, stage.item.name,
                                     states.STAGE_RUNNING)
            self.started.add(started)
        if self.state in states.FINISHED:
            return self.state
        if self.state == states.REVERTING:
            return self._revert_flow()
        return self._forward()

    def _invalid(self, reason):
        return exception.OrchestrationFlowInvalid(uuid=self.fence.uuid,
                                                  reason=reason)

    def _load(self, flow_row, stage_rows):
        self.flow = task_mod.lookup(flow_row.kind, flow_row.version)
        if self.flow is None:
            raise self._invalid('no flow of kind %r version %r is known to '
                                'this conductor' % (flow_row.kind,
                                                    flow_row.version))
        self.inputs = persistence.decode(flow_row.inputs)
        if not isinstance(self.inputs, dict):
            raise self._invalid('inputs are not a JSON object')
        missing = set(self.flow.inputs) - set(self.inputs)
        if missing:
            raise self._invalid('inputs lack %s' % ', '.join(sorted(missing)))
        for row in stage_rows:
            if (row.position >= len(self.flow.stages) or
                    self.flow.stages[row.position].item.name != row.name):
                raise self._invalid('stored stage %r at position %d does not '
                                    'match the flow definition' % (
                                        row.name, row.position))
            self.rows[(row.position, row.attempt)] = _Row(
                row.id, row.position, row.attempt, row.name, row.state,
                persistence.decode(row.result),
                persistence.decode(row.failure))

    # -- helpers -----------------------------------------------------------

    def _attempt(self, stage):
        """The current attempt of the stage's retry block (1 outside)."""
        if stage.block is None:
            return 1
        first, _ = self.flow.block_range(stage.block)
        return max([a for (p, a) in self.rows if p == first] or [1])

    def _value(self, name):
        """The latest completed result, else input or transient value."""
        for position in reversed(self.flow.providers.get(name, ())):
            stage = self.flow.stages[position]
            row = self.rows.get((position, self._attempt(stage)))
            if row is None or row.state not in (states.STAGE_SUCCESS,
                                                states.STAGE_REVERTING):
                continue
            if not isinstance(stage.item, task_mod.Retry):
                return row.result
            if name in (row.result or {}):
                return row.result[name]
        if name in self.flow.transient:
            return self.transient.get(name)
        return self.inputs.get(name)

    def _kwargs(self, item):
        return {name: self._value(name) for name in item.requires}

    def _transition(self, finish=None, start=None, flow_values=None,
                    forward=False):
        return persistence.transition(
            self.context, self.fence, self.engine.lease_seconds,
            finish=finish, start=start, flow_values=flow_values,
            forward=forward)

    def _ended(self, state):
        """The flow row's new values when the run ends in state."""
        values = {'state': state}
        if (self.flow is not None and self.flow.ended_inputs is not None and
                isinstance(self.inputs, dict)):
            kept = self.flow.ended_inputs(self.inputs)
            if kept is not None:
                values['inputs'] = persistence.encode(kept, 'inputs',
                                                      self.fence.uuid)
        return values

    def _end(self, state, failure=None, finish=None):
        values = self._ended(state)
        if failure is not None:
            values['failure'] = persistence.encode(failure, 'failure',
                                                   self.fence.uuid)
        self._transition(finish=finish, flow_values=values)
        self.state = state
        LOG.info('Flow %s ended %s', self.fence.uuid, state)
        return state

    # -- forward -----------------------------------------------------------

    def _forward(self):
        for _ in range(_MAX_RESYNCS):
            try:
                return self._forward_once()
            except _Resync:
                self._reload()
            except persistence.AbortRequested:
                self._reload()
                # A joined write that saw the abort may have rolled back
                # a caller's transaction holding it: check it committed.
                if self.state == states.REVERTING:
                    LOG.info('Flow %s was aborted; reverting it',
                             self.fence.uuid)
                    return self._revert_flow()
        raise exception.OrchestrationFlowInvalid(
            uuid=self.fence.uuid, reason='its records keep changing under '
            'retried writes; leaving it to a later sweep')

    def _forward_once(self):
        position = 0
        while position < len(self.flow.stages):
            stage = self.flow.stages[position]
            attempt = self._attempt(stage)
            row = self.rows.get((position, attempt))
            if row is not None and row.state == states.STAGE_SUCCESS:
                position += 1
                continue
            if row is not None and row.state != states.STAGE_RUNNING:
                # A previous owner stopped while handling this failure.
                return self._handle_failure(stage, attempt)
            rerun = False
            if row is None:
                row = self._start(stage, attempt)
            elif (row.id not in self.started and
                  stage.item.on_crash == task_mod.REVERT and
                  not stage.item.transactional):
                failure = {
                    'type': 'StageInterrupted', 'stage': row.name,
                    'message': 'The conductor running this stage stopped '
                               'before recording its outcome; the stage '
                               'declares that it must then be reverted.',
                    'traceback': None}
                self._fail(row, failure)
                return self._handle_failure(stage, attempt)
            elif row.id not in self.started:
                LOG.info('Re-running stage %s of flow %s (attempt %d)',
                         row.name, self.fence.uuid, attempt)
                rerun = True
            try:
                if stage.item.transactional:
                    # A rerun finds nothing: the transaction rolled back.
                    self._run_transactional(stage, attempt, row)
                else:
                    result = self._execute(stage, attempt, rerun=rerun)
                    encoded = persistence.encode(result, 'result', row.name)
            except (exception.OrchestrationLeaseLost,
                    exception.OrchestrationEngineStopped, _Resync,
                    persistence.AbortRequested):
                raise
            except Exception as exc:
                LOG.warning('Stage %s of flow %s failed: %s', row.name,
                            self.fence.uuid, exc)
                self._fail(row, persistence.failure_record(exc, row.name))
                return self._handle_failure(stage, attempt)
            if not stage.item.transactional:
                self._succeed(row, result, encoded)
            position += 1
        return self.state

    def _run_transactional(self, stage, attempt, row):
        """Execute and record success in one fenced API DB transaction."""

        @persistence.retry_on_disconnect
        def execute_and_record():
            with api_db_api.context_manager.writer.using(self.context):
                result = self._execute(stage, attempt)
                encoded = persistence.encode(result, 'result', row.name)
                return self._succeed(row, result, encoded, joined=True)

        try:
            execute_and_record()
        except (db_exc.DBDuplicateEntry, persistence.AlreadyRecorded):
            raise _Resync()

    def _reload(self):
        """Re-read the stage rows after a retried write found them moved.

        A RUNNING row of ours that the reload reveals was started by the
        write whose acknowledgement was lost, i.e. by this pass.
        """
        known = set(self.rows)
        flow_row, stage_rows = persistence.load(self.context,
                                                self.fence.uuid)
        if (flow_row.owner, flow_row.lease_generation) != (
                self.fence.owner, self.fence.generation):
            raise exception.OrchestrationLeaseLost(
                uuid=self.fence.uuid, owner=self.fence.owner,
                generation=self.fence.generation)
        self.state = flow_row.state
        self.rows = {}
        self._load(flow_row, stage_rows)
        for row in stage_rows:
            if ((row.position, row.attempt) not in known and
                    row.state == states.STAGE_RUNNING and
                    row.owner == self.fence.owner):
                self.started.add(row.id)

    def _execute(self, stage, attempt, rerun=False):
        item = stage.item
        timeout = item.timeout or CONF.orchestration.stage_timeout
        self.engine._set_deadline(self.fence, timeout)
        try:
            kwargs = self._kwargs(item)
            if isinstance(item, task_mod.Retry):
                result = item.first(self.context, **kwargs)
                if not isinstance(result, dict):
                    raise TypeError('%s.first() must return a dict' %
                                    item.name)
                return result
            if rerun:
                return item.execute_again(self.context, **kwargs)
            return item.execute(self.context, **kwargs)
        finally:
            self.engine._set_deadline(self.fence, None)

    def _new_row_spec(self, stage, attempt, state=states.STAGE_RUNNING):
        return {'position': stage.position, 'attempt': attempt,
                'name': stage.item.name, 'state': state}

    def _start(self, stage, attempt):
        # The flow is RUNNING: its claim started its first stage.
        spec = self._new_row_spec(stage, attempt)
        try:
            row_id = self._transition(start=spec, forward=True)
        except db_exc.DBDuplicateEntry:
            raise _Resync()
        row = _Row(row_id, stage.position, attempt, stage.item.name,
                   states.STAGE_RUNNING)
        self.rows[(stage.position, attempt)] = row
        self.started.add(row_id)
        return row

    def _succeed(self, row, result, encoded, joined=False):
        """Finish row and start the next stage in one transaction.

        With joined, the write joins the caller's transaction and is not
        retried on its own. If the flow was aborted, only the end of the
        stage is recorded (unless joined: the caller's transaction is then
        rolled back) before AbortRequested is raised.
        """
        write = (persistence.write_transition if joined
                 else persistence.transition)
        finish = {'id': row.id, 'state': states.STAGE_SUCCESS,
                  'result': encoded}
        next_position = row.position + 1
        nxt = (self.flow.stages[next_position]
               if next_position < len(self.flow.stages) else None)
        try:
            if nxt is None:
                write(self.context, self.fence, self.engine.lease_seconds,
                      finish=finish, flow_values=self._ended(states.SUCCESS),
                      forward=True)
            else:
                attempt = self._attempt(nxt)
                row_id = write(self.context, self.fence,
                               self.engine.lease_seconds, finish=finish,
                               start=self._new_row_spec(nxt, attempt),
                               forward=True)
        except (db_exc.DBDuplicateEntry, persistence.AlreadyRecorded):
            if joined:
                raise
            raise _Resync()
        except persistence.AbortRequested:
            if not joined:
                # Keep the result: the stage's revert needs it.
                self._transition(finish=finish)
                row.state, row.result = states.STAGE_SUCCESS, result
            raise
        row.state, row.result = states.STAGE_SUCCESS, result
        if nxt is None:
            self.state = states.SUCCESS
            LOG.info('Flow %s ended %s', self.fence.uuid, states.SUCCESS)
            return
        self.rows[(nxt.position, attempt)] = _Row(
            row_id, nxt.position, attempt, nxt.item.name,
            states.STAGE_RUNNING)
        self.started.add(row_id)

    def _fail(self, row, failure):
        self._transition(finish={
            'id': row.id, 'state': states.STAGE_FAILURE,
            'failure': persistence.encode(failure, 'failure', row.name)})
        row.state, row.failure = states.STAGE_FAILURE, failure

    # -- failure handling ------------------------------------------------

    def _handle_failure(self, stage, attempt):
        """Retry the stage's block if its controller agrees, else revert."""
        block = stage.block
        if block is not None and not isinstance(stage.item, task_mod.Retry):
            first, last = self.flow.block_range(block)
            block_rows = [self.rows[(p, attempt)]
                          for p in range(last, first, -1)
                          if (p, attempt) in self.rows]
            failure = next((r.failure for r in block_rows if r.failure),
                           None)
            if not self._revert_rows(block_rows):
                return self.state
            try:
                values = block.retry.next(
                    self.context, attempt, failure,
                    **self._kwargs(block.retry))
                if values is not None and not isinstance(values, dict):
                    raise TypeError('%s.next() must return a dict or None'
                                    % block.retry.name)
            except Exception as exc:
                LOG.exception('Retry controller of flow %s failed',
                              self.fence.uuid)
                failure = persistence.failure_record(exc,
                                                     block.retry.name)
                values = None
            if values is not None:
                LOG.info('Flow %s: retrying from stage %s (attempt %d)',
                         self.fence.uuid, block.retry.name, attempt + 1)
                controller = self.flow.stages[first]
                spec = self._new_row_spec(controller, attempt + 1,
                                          states.STAGE_SUCCESS)
                spec['result'] = persistence.encode(values, 'result',
                                                    block.retry.name)
                row_id = self._transition(start=spec, forward=True)
                self.rows[(first, attempt + 1)] = _Row(
                    row_id, first, attempt + 1, block.retry.name,
                    states.STAGE_SUCCESS, values)
                return self._forward()
        else:
            failure = self.rows[(stage.position, attempt)].failure
        # Forward: if the flow was aborted meanwhile, its failure stays the
        # abort's.
        self._transition(flow_values={
            'state': states.REVERTING,
            'failure': persistence.encode(failure, 'failure',
                                          self.fence.uuid)}, forward=True)
        self.state = states.REVERTING
        return self._revert_flow()

    def _revert_flow(self):
        pending = [row for key, row in sorted(self.rows.items(),
                                              reverse=True)
                   if row.state != states.STAGE_REVERTED]
        if self._revert_rows(pending, end_state=states.REVERTED):
            LOG.info('Flow %s ended %s', self.fence.uuid, states.REVERTED)
        return self.state

    def _revert_rows(self, rows, end_state=None):
        """Revert rows in the given order; False if a revert failed.

        Each row is marked REVERTING before its revert runs and REVERTED
        after it, the latter in the same transaction as the next row's
        REVERTING (or the flow's end_state), so that a crash re-runs at
        most the one revert that was in flight.
        """
        done = None
        for row in rows:
            if row.state == states.STAGE_REVERTED:
                continue
            item = self.flow.stages[row.position].item
            if row.state != states.STAGE_REVERTING or done:
                self._transition(finish=done, start={
                    'id': row.id, 'state': states.STAGE_REVERTING})
                row.state, done = states.STAGE_REVERTING, None
            try:
                item.revert(self.context, row.result, **self._kwargs(item))
            except Exception as exc:
                LOG.exception('Revert of stage %s of flow %s failed',
                              row.name, self.fence.uuid)
                self._end(states.ERROR, persistence.failure_record(
                    exc, row.name))
                return False
            done = {'id': row.id, 'state': states.STAGE_REVERTED}
            row.state = states.STAGE_REVERTED
        flow_values = self._ended(end_state) if end_state else None
        if done or flow_values:
            self._transition(finish=done, flow_values=flow_values)
        if end_state:
            self.state = end_state
        return True
