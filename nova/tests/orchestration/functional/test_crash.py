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

"""Conductors that die by SIGKILL at every point of a flow.

The flow (worker.CRASH_KIND) has four stages:

* a: RERUN, idempotent (its effect is keyed on the flow);
* b: REVERT, not idempotent;
* c: transactional (its effect is written in the engine's transaction);
* d: RERUN, idempotent; fails when the flow's input ``fail`` is 'd'.

Each case runs the flow in a worker that SIGKILLs itself at one point,
expires the lease and resumes the flow in a new worker, then checks the
end state, what executed and reverted, in which order, and which effects
are left. The matrix covers every distinct state the records can be in
when a conductor dies; points that leave the same records as a listed one
are left out (e.g. "after a" is "middle of a": the effect is there and the
success is not recorded):

* every stage boundary: after the claim, before each stage (its RUNNING
  row committed with the previous stage's success), after the final
  commit, and after a failure was recorded;
* the middle of the RERUN (a, d), REVERT (b) and transactional (c)
  stages, and a transactional stage whose statements all ran but whose
  COMMIT did not;
* during rollback: in the first revert (of the failed stage itself), in a
  middle one and in the last one.

That is 15 crash points (_CrashTests.MATRIX_SIZE), each run on a file
SQLite database and on PostgreSQL: 30 cases of two processes each.

_CrashLoopTests kill every conductor in the middle of a, until the flow
ends in ERROR with [orchestration]max_stage_executions reached.
"""

import datetime

from oslo_serialization import jsonutils
from oslo_utils import timeutils
import testscenarios

from nova.tests.orchestration.functional import base
from nova.tests.orchestration.functional import worker

ALL = ('a', 'b', 'c', 'd')
SUCCESS = 'SUCCESS'
REVERTED = 'REVERTED'


def _case(kill_at, state, executed=ALL, twice=(), reverted=(),
          again=None, fail=None, resumed=True):
    """One crash case.

    :param executed: stages whose execute is called once
    :param twice: stages whose execute is called twice (re-run)
    :param reverted: stages reverted, in the expected (reverse) order; the
        first one is the stage that failed or was interrupted, whose revert
        gets no result
    :param again: the stage whose revert is expected to run twice
    :param fail: the stage that fails (and so leaves no effect)
    :param resumed: False if the crash left nothing to resume
    """
    calls = [('execute', s) for s in ALL if s in executed or s in twice
             for _ in range(2 if s in twice else 1)]
    for stage in reverted:
        calls += [('revert', stage)] * (2 if stage == again else 1)
    effects = [s for s in ALL if (s in executed or s in twice) and s != fail]
    if state == SUCCESS:
        rows = [(s, 1, SUCCESS) for s in ALL]
    else:
        rows = [(s, 1, REVERTED) for s in ALL if s in reverted]
    return (kill_at.replace(':', '_'), dict(
        kill_at=kill_at, fail_at=fail, state=state, calls=calls,
        expected_effects=effects, rows=rows, resumed=resumed,
        interrupted=reverted[0] if reverted else None))


_ROLLBACK = dict(state=REVERTED, fail='d', reverted=('d', 'c', 'b', 'a'))

CASES = [
    _case('claimed', SUCCESS),
    _case('before:a', SUCCESS),
    _case('middle:a', SUCCESS, twice=('a',)),
    # The RUNNING row of b cannot tell "not started" from "half done":
    # b declares REVERT, so the flow is rolled back either way.
    _case('before:b', REVERTED, executed=('a',), reverted=('b', 'a')),
    _case('middle:b', REVERTED, executed=('a', 'b'), reverted=('b', 'a')),
    _case('before:c', SUCCESS),
    # The effect of c rolled back with the transaction: c runs again
    # although it declares REVERT.
    _case('middle:c', SUCCESS, twice=('c',)),
    _case('after:c', SUCCESS, twice=('c',)),
    _case('before:d', SUCCESS),
    _case('middle:d', SUCCESS, twice=('d',)),
    _case('committed:d', SUCCESS, resumed=False),
    _case('failed:d', **_ROLLBACK),
    _case('revert:d', again='d', **_ROLLBACK),
    _case('revert:b', again='b', **_ROLLBACK),
    _case('revert:a', again='a', **_ROLLBACK),
]


class _CrashTests(testscenarios.WithScenarios):

    #: Number of crash points per database (the scenarios of this class).
    MATRIX_SIZE = len(CASES)
    scenarios = CASES

    def test_crash_and_resume(self):
        """Kill the conductor at one point and resume in a new process."""
        flow_uuid, = self.create_flows(worker.CRASH_KIND, fail=self.fail_at)

        self.worker(['run', flow_uuid], owner='first', kill_at=self.kill_at,
                    expect_kill=True)
        crashed = self.flow(flow_uuid)
        self.assertEqual(('first', 1), (crashed.owner,
                                        crashed.lease_generation))
        self.expire_lease(flow_uuid)
        result = self.worker(['run', flow_uuid], owner='second')

        flow = self.flow(flow_uuid)
        self.assertEqual(self.state, flow.state)
        if self.resumed:
            self.assertEqual(self.state, result.output['state'])
            self.assertEqual(('second', 2), (flow.owner,
                                             flow.lease_generation))
        else:
            # A finished flow is never claimed again.
            self.assertIsNone(result.output['state'])
            self.assertEqual(1, flow.lease_generation)
        self.assertEqual(self.rows, self.stages(flow_uuid))

        events = self.events(flow_uuid)
        # What ran, in order: re-runs are consecutive, reverts reversed.
        self.assertEqual(self.calls, [e[:2] for e in events])
        # A revert gets the stage's result, or None if it did not complete.
        for call, stage, result in events:
            if call == 'revert':
                self.assertEqual(
                    None if stage == self.interrupted else
                    '%s-result' % stage, result, stage)
        # Every effect committed exactly once, undone iff rolled back.
        undone = self.state == REVERTED
        self.assertEqual({s: [undone] for s in self.expected_effects},
                         self.effects(flow_uuid))


class _CrashLoopTests(object):

    def _run(self, flow_uuid, owner, **kwargs):
        return self.worker(['run', flow_uuid], owner=owner,
                           kill_at='middle:a', max_stage_executions=3,
                           stage_rerun_backoff=60, **kwargs)

    def test_stage_killing_every_conductor_ends_the_flow_in_error(self):
        """A stage that kills each conductor running it is given up."""
        flow_uuid, = self.create_flows(worker.CRASH_KIND)
        for owner in ('first', 'second'):
            self._run(flow_uuid, owner, expect_kill=True)
            self.expire_lease(flow_uuid)
        # Killed twice: the third execution waits a minute from the start
        # of the second one; the flow is held until then.
        self.assertEqual('RUNNING', self._run(flow_uuid, 'third').output[
            'state'])
        self.assertEqual(2, len(self.events(flow_uuid)))
        self.assertGreater(self.flow(flow_uuid).lease_expires_at,
                           timeutils.utcnow() + datetime.timedelta(
                               seconds=30))
        # A minute later:
        with self.engine.begin() as conn:
            row = conn.execute(base.STAGES.select()).one()
            conn.execute(base.STAGES.update().values(
                updated_at=row.updated_at - datetime.timedelta(seconds=60)))
        self.expire_lease(flow_uuid)
        self._run(flow_uuid, 'fourth', expect_kill=True)
        self.expire_lease(flow_uuid)

        result = self._run(flow_uuid, 'fifth')

        self.assertEqual('ERROR', result.output['state'])
        flow = self.flow(flow_uuid)
        self.assertEqual('ERROR', flow.state)
        failure = jsonutils.loads(flow.failure)
        self.assertEqual(('StageExecutionLimit', 'a'),
                         (failure['type'], failure['stage']))
        self.assertEqual([('a', 1, 'FAILURE')], self.stages(flow_uuid))
        # Started three times, never a fourth, and not reverted: its one
        # (keyed) effect is left for the operator's decision.
        self.assertEqual([('execute', 'a')] * 3,
                         [e[:2] for e in self.events(flow_uuid)])
        self.assertEqual({'a': [False]}, self.effects(flow_uuid))


class CrashTestSQLite(base.SQLiteMixin, _CrashTests,
                      base._WorkerTestCase):
    pass


class CrashTestPostgreSQL(base.PostgreSQLMixin, _CrashTests,
                          base._WorkerTestCase):
    pass


class CrashLoopTestSQLite(base.SQLiteMixin, _CrashLoopTests,
                          base._WorkerTestCase):
    pass


class CrashLoopTestPostgreSQL(base.PostgreSQLMixin, _CrashLoopTests,
                              base._WorkerTestCase):
    pass
