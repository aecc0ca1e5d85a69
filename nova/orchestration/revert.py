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

"""The revert of the stages a flow started, newest first."""

from oslo_log import log as logging

from nova import exception
from nova.orchestration import persistence
from nova.orchestration import states
from nova.orchestration import task as task_mod

LOG = logging.getLogger(__name__)


class Reverter(object):
    """Reverts started stages, recording each step through a Recorder."""

    def __init__(self, context, records):
        self.context = context
        self.records = records

    def revert_flow(self, failure=None):
        """Revert every started stage; failure defaults to the flow's."""
        records = self.records
        pending = [row for key, row in sorted(records.rows.items(),
                                              reverse=True)
                   if row.state != states.STAGE_REVERTED]
        failure = failure or task_mod.Failure(records.failure)
        if self.revert_rows(pending, failure, end_state=states.REVERTED):
            LOG.info('Flow %s ended %s', records.fence.uuid, states.REVERTED)
        return records.state

    def revert_rows(self, rows, failure, end_state=None):
        """Revert rows in the given order; False if a revert failed.

        Each revert receives failure (a task.Failure).

        Each row is marked REVERTING before its revert runs and REVERTED
        after it, the latter in the same transaction as the next row's
        REVERTING (or the flow's end_state), so that a crash re-runs at
        most the one revert that was in flight.
        """
        records = self.records
        done = None
        for row in rows:
            if row.state == states.STAGE_REVERTED:
                continue
            item = records.flow.stages[row.position].item
            if row.state != states.STAGE_REVERTING or done:
                records.mark_reverting(row, done)
                done = None
            try:
                item.revert(self.context, row.result, failure,
                            **records.kwargs(item))
            except (exception.OrchestrationLeaseLost,
                    exception.OrchestrationEngineStopped):
                # Another conductor runs this revert again.
                raise
            except Exception as exc:
                LOG.exception('Revert of stage %s of flow %s failed',
                              row.name, records.fence.uuid)
                records.end(states.ERROR, persistence.failure_record(
                    exc, row.name))
                return False
            done = {'id': row.id, 'state': states.STAGE_REVERTED}
            row.state = states.STAGE_REVERTED
        records.finish_reverts(done, end_state)
        return True
