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

"""The records of one pass over a flow, and every write that changes them.

A ``Recorder`` holds the pass's view of the flow's stored rows and is the
one way the pass writes them through ``nova.orchestration.persistence``:
fenced transitions, and re-reading the records after a retried write
committed (``Resync``).
"""

from oslo_db import exception as db_exc
from oslo_log import log as logging

from nova.db.api import api as api_db_api
from nova import exception
from nova.orchestration import persistence
from nova.orchestration import states
from nova.orchestration import task as task_mod

LOG = logging.getLogger(__name__)


class _Row(object):
    """The engine's view of one stored stage row."""

    def __init__(self, row_id, position, attempt, name, state, result=None,
                 failure=None, executions=1, last_started=None):
        self.id = row_id
        self.position = position
        self.attempt = attempt
        self.name = name
        self.state = state
        self.result = result
        self.failure = failure
        self.executions = executions
        # When the stage was last started (or handed over).
        self.last_started = last_started


class Resync(Exception):
    """The stored records moved on under a retried write: reload them."""


class Recorder(object):
    """One pass's view of a flow's records; all its writes go through it."""

    def __init__(self, context, fence, lease_seconds, transient):
        """:param lease_seconds: returns the lease each write renews.
        :param transient: the values of the flow's transient names.
        """
        self.context = context
        self.fence = fence
        self._lease_seconds = lease_seconds
        self.transient = transient
        self.flow = None
        self.state = None
        self.inputs = None
        # Why the flow is reverted or ended ERROR, as stored.
        self.failure = None
        self.rows = {}
        # Rows this pass started: RUNNING for them is not a crash.
        self.started = set()

    # -- loading -----------------------------------------------------------

    def invalid(self, reason):
        return exception.OrchestrationFlowInvalid(uuid=self.fence.uuid,
                                                  reason=reason)

    def load(self, flow_row, stage_rows):
        self.state = flow_row.state
        self.flow = task_mod.lookup(flow_row.kind, flow_row.version)
        if self.flow is None:
            raise self.invalid('no flow of kind %r version %r is known to '
                               'this conductor' % (flow_row.kind,
                                                   flow_row.version))
        self.inputs = persistence.decode(flow_row.inputs)
        self.failure = persistence.decode(flow_row.failure)
        if not isinstance(self.inputs, dict):
            raise self.invalid('inputs are not a JSON object')
        missing = set(self.flow.inputs) - set(self.inputs)
        if missing:
            raise self.invalid('inputs lack %s' % ', '.join(sorted(missing)))
        for row in stage_rows:
            if (row.position >= len(self.flow.stages) or
                    self.flow.stages[row.position].item.name != row.name):
                raise self.invalid('stored stage %r at position %d does not '
                                   'match the flow definition' % (
                                       row.name, row.position))
            self.rows[(row.position, row.attempt)] = _Row(
                row.id, row.position, row.attempt, row.name, row.state,
                persistence.decode(row.result),
                persistence.decode(row.failure), row.executions,
                row.updated_at or row.started_at)

    def claimed_start(self, started):
        """Add the row of the first stage, which the claim started."""
        stage = self.flow.stages[0]
        self.state = states.RUNNING
        self.rows[(0, 1)] = _Row(started, 0, 1, stage.item.name,
                                 states.STAGE_RUNNING)
        self.started.add(started)

    def reload(self):
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
        self.rows = {}
        self.load(flow_row, stage_rows)
        for row in stage_rows:
            if ((row.position, row.attempt) not in known and
                    row.state == states.STAGE_RUNNING and
                    row.owner == self.fence.owner):
                self.started.add(row.id)

    # -- reading -----------------------------------------------------------

    def attempt(self, stage):
        """The current attempt of the stage's retry block (1 outside)."""
        if stage.block is None:
            return 1
        first, _ = self.flow.block_range(stage.block)
        return max([a for (p, a) in self.rows if p == first] or [1])

    def _value(self, name):
        """The latest completed result, else input or transient value."""
        for position in reversed(self.flow.providers.get(name, ())):
            stage = self.flow.stages[position]
            row = self.rows.get((position, self.attempt(stage)))
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

    def kwargs(self, item):
        return {name: self._value(name) for name in item.requires}

    # -- writing -----------------------------------------------------------

    def _transition(self, finish=None, start=None, flow_values=None,
                    forward=False):
        return persistence.transition(
            self.context, self.fence, self._lease_seconds(),
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

    def end(self, state, failure=None, finish=None):
        values = self._ended(state)
        if failure is not None:
            values['failure'] = persistence.encode(failure, 'failure',
                                                   self.fence.uuid)
        self._transition(finish=finish, flow_values=values)
        self.state = state
        LOG.info('Flow %s ended %s', self.fence.uuid, state)
        return state

    def _new_row_spec(self, stage, attempt, state=states.STAGE_RUNNING):
        return {'position': stage.position, 'attempt': attempt,
                'name': stage.item.name, 'state': state}

    def start(self, stage, attempt):
        # The flow is RUNNING: its claim started its first stage.
        spec = self._new_row_spec(stage, attempt)
        try:
            row_id = self._transition(start=spec, forward=True)
        except db_exc.DBDuplicateEntry:
            raise Resync()
        row = _Row(row_id, stage.position, attempt, stage.item.name,
                   states.STAGE_RUNNING)
        self.rows[(stage.position, attempt)] = row
        self.started.add(row_id)
        return row

    def rerun(self, row):
        """Record that a RUNNING row found stopped is executed again."""
        try:
            self._transition(start={'id': row.id, 'rerun': True},
                             forward=True)
        except persistence.AlreadyRecorded:
            raise Resync()
        row.executions += 1
        self.started.add(row.id)

    def defer(self, seconds):
        """Leave the flow to whichever conductor claims it in seconds."""
        persistence.renew(self.context, self.fence, seconds)
        LOG.info('Flow %s is resumed in %d seconds', self.fence.uuid,
                 seconds)

    def succeed_in_transaction(self, row, execute):
        """Run execute and record its success in one fenced API DB
        transaction.
        """

        @persistence.retry_on_disconnect
        def execute_and_record():
            with api_db_api.context_manager.writer.using(self.context):
                result = execute()
                encoded = persistence.encode(result, 'result', row.name)
                return self.succeed(row, result, encoded, joined=True)

        try:
            execute_and_record()
        except (db_exc.DBDuplicateEntry, persistence.AlreadyRecorded):
            raise Resync()

    def succeed(self, row, result, encoded, joined=False):
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
                write(self.context, self.fence, self._lease_seconds(),
                      finish=finish, flow_values=self._ended(states.SUCCESS),
                      forward=True)
            else:
                attempt = self.attempt(nxt)
                row_id = write(self.context, self.fence,
                               self._lease_seconds(), finish=finish,
                               start=self._new_row_spec(nxt, attempt),
                               forward=True)
        except (db_exc.DBDuplicateEntry, persistence.AlreadyRecorded):
            if joined:
                raise
            raise Resync()
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

    def fail(self, row, failure):
        self._transition(finish={
            'id': row.id, 'state': states.STAGE_FAILURE,
            'failure': persistence.encode(failure, 'failure', row.name)})
        row.state, row.failure = states.STAGE_FAILURE, failure

    def start_retry(self, controller, attempt, values):
        """Record a retry controller's values as its attempt's success."""
        name = controller.item.name
        spec = self._new_row_spec(controller, attempt, states.STAGE_SUCCESS)
        spec['result'] = persistence.encode(values, 'result', name)
        row_id = self._transition(start=spec, forward=True)
        self.rows[(controller.position, attempt)] = _Row(
            row_id, controller.position, attempt, name,
            states.STAGE_SUCCESS, values)

    def start_reverting(self, failure):
        # Forward: if the flow was aborted meanwhile, its failure stays the
        # abort's.
        self._transition(flow_values={
            'state': states.REVERTING,
            'failure': persistence.encode(failure, 'failure',
                                          self.fence.uuid)}, forward=True)
        self.state, self.failure = states.REVERTING, failure

    def mark_reverting(self, row, done=None):
        """Mark row REVERTING, with done (a reverted row) if given."""
        self._transition(finish=done, start={
            'id': row.id, 'state': states.STAGE_REVERTING})
        row.state = states.STAGE_REVERTING

    def finish_reverts(self, done, end_state=None):
        """Record done (the last reverted row) and the flow's end_state."""
        flow_values = self._ended(end_state) if end_state else None
        if done or flow_values:
            self._transition(finish=done, flow_values=flow_values)
        if end_state:
            self.state = end_state
