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

"""Running a flow's stages forward: execute, execute again, retry blocks."""

import datetime
import math

from oslo_log import log as logging
from oslo_utils import timeutils

import nova.conf
from nova import exception
from nova.orchestration import persistence
from nova.orchestration import recorder
from nova.orchestration import states
from nova.orchestration import task as task_mod

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

# How often one pass re-reads a flow whose records moved under a retried
# write before it gives up and leaves the flow to a later sweep.
_MAX_RESYNCS = 10


def _rerun_delay(row):
    """Seconds to wait before a stopped stage is executed again.

    A stage stopped once runs again as soon as its lease expired; one that
    stopped its conductors more often waits [orchestration]
    stage_rerun_backoff after its last start, doubled at each further time.
    """
    base = CONF.orchestration.stage_rerun_backoff
    if row.executions < 2 or not base or row.last_started is None:
        return 0
    due = row.last_started + datetime.timedelta(
        seconds=base * 2 ** (row.executions - 2))
    return max(0, int(math.ceil(
        (due - timeutils.utcnow()).total_seconds())))


class Forward(object):
    """Runs the stages of a flow forward from where its records stand."""

    def __init__(self, context, records, reverter, set_deadline):
        """:param records: the Recorder of the pass.
        :param reverter: the Reverter of a failed stage's block or flow.
        :param set_deadline: set_deadline(fence, seconds) tells the engine
            how long the running stage may take (None: no stage runs).
        """
        self.context = context
        self.records = records
        self.reverter = reverter
        self._set_deadline = set_deadline

    def run(self):
        records = self.records
        for _ in range(_MAX_RESYNCS):
            try:
                return self._forward_once()
            except recorder.Resync:
                records.reload()
            except persistence.AbortRequested:
                records.reload()
                # A joined write that saw the abort may have rolled back
                # a caller's transaction holding it: check it committed.
                if records.state == states.REVERTING:
                    LOG.info('Flow %s was aborted; reverting it',
                             records.fence.uuid)
                    return self.reverter.revert_flow()
        raise exception.OrchestrationFlowInvalid(
            uuid=records.fence.uuid, reason='its records keep changing under '
            'retried writes; leaving it to a later sweep')

    def _forward_once(self):
        records = self.records
        flow = records.flow
        position = 0
        while position < len(flow.stages):
            stage = flow.stages[position]
            attempt = records.attempt(stage)
            row = records.rows.get((position, attempt))
            if row is not None and row.state == states.STAGE_SUCCESS:
                position += 1
                continue
            if row is not None and row.state != states.STAGE_RUNNING:
                # A previous owner stopped while handling this failure.
                return self._handle_failure(stage, attempt)
            rerun = False
            if row is None:
                row = records.start(stage, attempt)
            elif (row.id not in records.started and
                  stage.item.on_crash == task_mod.REVERT and
                  not stage.item.transactional):
                failure = {
                    'type': 'StageInterrupted', 'stage': row.name,
                    'message': 'The conductor running this stage stopped '
                               'before recording its outcome; the stage '
                               'declares that it must then be reverted.',
                    'traceback': None}
                records.fail(row, failure)
                return self._handle_failure(stage, attempt)
            elif row.id not in records.started:
                if row.executions >= CONF.orchestration.max_stage_executions:
                    return self._give_up(row)
                wait = _rerun_delay(row)
                if wait > 0:
                    records.defer(wait)
                    return records.state
                LOG.info('Re-running stage %s of flow %s (attempt %d, '
                         'execution %d)', row.name, records.fence.uuid,
                         attempt, row.executions + 1)
                records.rerun(row)
                rerun = True
            try:
                if stage.item.transactional:
                    # A rerun finds nothing: the transaction rolled back.
                    records.succeed_in_transaction(
                        row, lambda: self._execute(stage, attempt))
                else:
                    result = self._execute(stage, attempt, rerun=rerun)
                    encoded = persistence.encode(result, 'result', row.name)
            except (exception.OrchestrationLeaseLost,
                    exception.OrchestrationEngineStopped, recorder.Resync,
                    persistence.AbortRequested):
                raise
            except Exception as exc:
                LOG.warning('Stage %s of flow %s failed: %s', row.name,
                            records.fence.uuid, exc)
                records.fail(row, persistence.failure_record(exc, row.name))
                return self._handle_failure(stage, attempt, exc)
            if not stage.item.transactional:
                records.succeed(row, result, encoded)
            position += 1
        return records.state

    def _execute(self, stage, attempt, rerun=False):
        records = self.records
        item = stage.item
        timeout = item.timeout or CONF.orchestration.stage_timeout
        self._set_deadline(records.fence, timeout)
        try:
            kwargs = records.kwargs(item)
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
            self._set_deadline(records.fence, None)

    def _give_up(self, row):
        """End the flow ERROR: its stage keeps stopping its conductors.

        Its reverts are not run: they may stop their conductors alike. An
        operator looks into it and resumes the flow to revert it.
        """
        records = self.records
        failure = {
            'type': 'StageExecutionLimit', 'stage': row.name,
            'message': 'Stage %s was started %d times and its conductor '
                       'stopped each time before recording its outcome '
                       '([orchestration]max_stage_executions).' % (
                           row.name, row.executions),
            'traceback': None}
        LOG.error('Flow %s: %s', records.fence.uuid, failure['message'])
        state = records.end(states.ERROR, failure, finish={
            'id': row.id, 'state': states.STAGE_FAILURE,
            'failure': persistence.encode(failure, 'failure', row.name)})
        row.state, row.failure = states.STAGE_FAILURE, failure
        return state

    def _handle_failure(self, stage, attempt, exc=None):
        """Retry the stage's block if its controller agrees, else revert.

        :param exc: the exception the stage raised in this pass, if any.
        """
        records = self.records
        block = stage.block
        if block is not None and not isinstance(stage.item, task_mod.Retry):
            first, last = records.flow.block_range(block)
            block_rows = [records.rows[(p, attempt)]
                          for p in range(last, first, -1)
                          if (p, attempt) in records.rows]
            failure = task_mod.Failure(
                next((r.failure for r in block_rows if r.failure), None),
                exc)
            if not self.reverter.revert_rows(block_rows, failure):
                return records.state
            try:
                values = block.retry.next(
                    self.context, attempt, failure,
                    **records.kwargs(block.retry))
                if values is not None and not isinstance(values, dict):
                    raise TypeError('%s.next() must return a dict or None'
                                    % block.retry.name)
            except Exception as exc:
                # The controller gives up with that failure.
                LOG.warning('Retry controller %s of flow %s gave up: %s',
                            block.retry.name, records.fence.uuid, exc)
                failure = task_mod.Failure(persistence.failure_record(
                    exc, block.retry.name), exc)
                values = None
            if values is not None:
                LOG.info('Flow %s: retrying from stage %s (attempt %d)',
                         records.fence.uuid, block.retry.name, attempt + 1)
                records.start_retry(records.flow.stages[first], attempt + 1,
                                    values)
                return self.run()
        else:
            failure = task_mod.Failure(
                records.rows[(stage.position, attempt)].failure, exc)
        records.start_reverting(failure.record)
        return self.reverter.revert_flow(failure)
