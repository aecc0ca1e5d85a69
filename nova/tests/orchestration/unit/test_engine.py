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

from unittest import mock

import fixtures
from oslo_utils import fixture as utils_fixture
from oslo_utils import timeutils
import sqlalchemy as sa

from nova import context as nova_context
from nova.db.api import api as api_db_api
from nova.db.api import models as api_models
from nova import exception
from nova.orchestration import engine as engine_mod
from nova.orchestration import persistence
from nova.orchestration import states
from nova.orchestration import task
from nova import test
from nova.tests.orchestration.unit import helpers


class Crash(BaseException):
    """Stands for the death of the process running a stage."""


class Recorder(task.Task):
    """A task that journals its calls and fails or crashes on demand."""

    def __init__(self, name, journal, requires=(), provides=None,
                 on_crash=task.REVERT, fail_on=(), crash_on=()):
        self.name = name
        self.journal = journal
        self.requires = requires
        self.provides = provides
        self.on_crash = on_crash
        # Calls (1-based, per task) that raise or crash.
        self.fail_on = set(fail_on)
        self.crash_on = set(crash_on)
        self.calls = 0
        # The task.Failure each revert received.
        self.failures = []

    def execute(self, context, **kwargs):
        self.calls += 1
        self.journal.append(('execute', self.name, kwargs))
        if self.calls in self.crash_on:
            raise Crash()
        if self.calls in self.fail_on:
            raise ValueError('%s failed, password=secret' % self.name)
        return '%s-result' % self.name

    def execute_again(self, context, **kwargs):
        self.journal.append(('execute_again', self.name, kwargs))
        return super().execute_again(context, **kwargs)

    def revert(self, context, result, failure, **kwargs):
        self.journal.append(('revert', self.name, result))
        self.failures.append(failure)


CHILD = '0b4bd5a6-7c59-4b2f-8a3e-3f7e1a8c2d10'


class SpawnChild(Recorder):
    """A transactional task whose side effect is an API DB row."""

    transactional = True

    def execute(self, context, **kwargs):
        persistence.create_flow(context, 'child', 1, {},
                                instance_uuid=CHILD)
        return super().execute(context, **kwargs)


class Hosts(task.Retry):
    """Walks a list of hosts: one attempt per host."""

    name = 'pick-host'
    requires = ('hosts',)
    provides = ('host',)

    def __init__(self, journal):
        self.journal = journal

    def first(self, context, hosts):
        self.journal.append(('first', self.name, hosts[0]))
        return {'host': hosts[0]}

    def next(self, context, attempt, failure, hosts):
        self.journal.append(('next', self.name, attempt, failure.type))
        return {'host': hosts[attempt]} if attempt < len(hosts) else None


class NextHost(task.Retry):
    """Walks a list of hosts from the index of the attempt that failed."""

    name = 'next-host'
    requires = ('hosts', 'index')
    provides = ('host', 'index')

    def __init__(self, journal):
        self.journal = journal

    def first(self, context, hosts, index):
        self.journal.append(('first', self.name, index))
        return {'host': hosts[0], 'index': 0}

    def next(self, context, attempt, failure, hosts, index):
        self.journal.append(('next', self.name, index))
        index += 2
        return {'host': hosts[index], 'index': index} if index < len(
            hosts) else None


class _Registry(fixtures.Fixture):
    """Forget the flows a test registers."""

    def _setUp(self):
        self.useFixture(fixtures.MockPatchObject(task, '_REGISTRY', {}))


class EngineTestCase(test.TestCase):

    def setUp(self):
        super().setUp()
        self.context = nova_context.get_admin_context()
        self.journal = []
        self.useFixture(_Registry())
        self.flags(lease_duration=60, group='orchestration')

    def _flow(self, items, inputs=('x',), version=1):
        return task.register(
            task.FlowDefinition(self.id(), version, inputs, items))

    def _create(self, flow, inputs=None):
        return persistence.create_flow(
            self.context, flow.kind, flow.version,
            {'x': 1} if inputs is None else inputs)

    def _stages(self, flow_uuid):
        flow, rows = persistence.load(self.context, flow_uuid)
        return flow, [(r.name, r.attempt, r.state) for r in rows]

    def _resume(self, flow_uuid, owner='second'):
        helpers.expire_lease(self.context, flow_uuid)
        return engine_mod.Engine(owner=owner).run(self.context, flow_uuid)

    def _calls(self):
        return [entry[:2] for entry in self.journal]

    def _executions(self, flow_uuid):
        _, rows = persistence.load(self.context, flow_uuid)
        return [row.executions for row in rows]

    def test_runs_stages_in_order_and_passes_results(self):
        a = Recorder('a', self.journal, requires=('x',), provides='ra')
        b = Recorder('b', self.journal, requires=('ra', 'x'))
        flow = self._flow([a, b])
        flow_uuid = self._create(flow)

        state = engine_mod.Engine().run(self.context, flow_uuid)

        self.assertEqual(states.SUCCESS, state)
        self.assertEqual([('execute', 'a', {'x': 1}),
                          ('execute', 'b', {'ra': 'a-result', 'x': 1})],
                         self.journal)
        row, stages = self._stages(flow_uuid)
        self.assertEqual(states.SUCCESS, row.state)
        self.assertEqual([('a', 1, 'SUCCESS'), ('b', 1, 'SUCCESS')], stages)
        _, rows = persistence.load(self.context, flow_uuid)
        self.assertEqual('"a-result"', rows[0].result)
        self.assertIsNotNone(rows[0].finished_at)

    def test_a_flow_starts_in_the_transaction_that_claims_it(self):
        flow = self._flow([Recorder('a', self.journal, requires=('x',))])
        flow_uuid = self._create(flow)
        commits = []

        def commit(conn):
            commits.append(conn)

        engine = api_db_api.get_engine()
        sa.event.listen(engine, 'commit', commit)
        self.addCleanup(sa.event.remove, engine, 'commit', commit)

        self.assertEqual(states.SUCCESS,
                         engine_mod.Engine().run(self.context, flow_uuid))

        # The claim that starts stage a, then the end of a and the flow.
        self.assertEqual(2, len(commits))
        self.assertEqual([('execute', 'a')], self._calls())

    def _ended_inputs(self, version, items, inputs):
        """Run a flow that drops its input 'secret' when it ends."""
        def drop(stored):
            return {k: v for k, v in stored.items() if k != 'secret'}

        flow = task.register(task.FlowDefinition(
            self.id(), version, ('x', 'secret'), items, ended_inputs=drop))
        flow_uuid = self._create(flow, inputs)
        state = engine_mod.Engine().run(self.context, flow_uuid)
        row, _ = self._stages(flow_uuid)
        return state, persistence.decode(row.inputs)

    def test_ended_flow_keeps_what_its_definition_keeps_of_its_inputs(self):
        inputs = {'x': 1, 'secret': 's3cr3t'}
        journal = []

        class RevertFails(Recorder):
            def revert(self, context, result, failure, **kwargs):
                raise ValueError('revert broke')

        for version, (items, end) in enumerate((
                ([Recorder('a', journal, requires=('secret',))],
                 states.SUCCESS),
                ([Recorder('a', journal),
                  Recorder('b', journal, fail_on=[1])], states.REVERTED),
                ([RevertFails('a', journal),
                  Recorder('b', journal, fail_on=[1])], states.ERROR)),
                start=1):
            state, stored = self._ended_inputs(version, items, inputs)
            self.assertEqual(end, state)
            self.assertEqual({'x': 1}, stored)
        # The stages had the value while the flow ran.
        self.assertEqual(('execute', 'a', {'secret': 's3cr3t'}), journal[0])

    def test_failure_reverts_started_stages_in_reverse_order(self):
        a = Recorder('a', self.journal)
        b = Recorder('b', self.journal)
        c = Recorder('c', self.journal, fail_on=[1])
        d = Recorder('d', self.journal)
        flow_uuid = self._create(self._flow([a, b, c, d]))

        state = engine_mod.Engine().run(self.context, flow_uuid)

        self.assertEqual(states.REVERTED, state)
        self.assertEqual(
            [('execute', 'a'), ('execute', 'b'), ('execute', 'c'),
             ('revert', 'c'), ('revert', 'b'), ('revert', 'a')],
            self._calls())
        # The failed stage is reverted without a result, others with theirs.
        self.assertEqual([None, 'b-result', 'a-result'],
                         [e[2] for e in self.journal[3:]])
        row, stages = self._stages(flow_uuid)
        self.assertEqual([('a', 1, 'REVERTED'), ('b', 1, 'REVERTED'),
                          ('c', 1, 'REVERTED')], stages)
        failure = persistence.decode(row.failure)
        self.assertEqual('ValueError', failure['type'])
        self.assertEqual('c', failure['stage'])
        # Secrets in exception messages are masked before they are stored.
        self.assertNotIn('secret', row.failure)

    def test_retry_block_runs_again_with_next_values(self):
        before = Recorder('before', self.journal)
        claim = Recorder('claim', self.journal, requires=('host',))
        spawn = Recorder('spawn', self.journal, requires=('host',),
                         fail_on=[1])
        after = Recorder('after', self.journal, requires=('host',))
        flow = self._flow(
            [before, task.RetryBlock(Hosts(self.journal), [claim, spawn]),
             after], inputs=('hosts',))
        flow_uuid = self._create(flow, {'hosts': ['h1', 'h2']})

        state = engine_mod.Engine().run(self.context, flow_uuid)

        self.assertEqual(states.SUCCESS, state)
        self.assertEqual(
            [('execute', 'before'), ('first', 'pick-host'),
             ('execute', 'claim'), ('execute', 'spawn'),
             ('revert', 'spawn'), ('revert', 'claim'),
             ('next', 'pick-host'),
             ('execute', 'claim'), ('execute', 'spawn'),
             ('execute', 'after')], self._calls())
        self.assertEqual({'host': 'h2'}, self.journal[-1][2])
        _, stages = self._stages(flow_uuid)
        self.assertEqual(
            [('before', 1, 'SUCCESS'),
             ('pick-host', 1, 'SUCCESS'), ('pick-host', 2, 'SUCCESS'),
             ('claim', 1, 'REVERTED'), ('claim', 2, 'SUCCESS'),
             ('spawn', 1, 'REVERTED'), ('spawn', 2, 'SUCCESS'),
             ('after', 1, 'SUCCESS')], stages)

    def test_exhausted_retry_reverts_the_whole_flow(self):
        before = Recorder('before', self.journal)
        spawn = Recorder('spawn', self.journal, requires=('host',),
                         fail_on=[1, 2])
        flow = self._flow(
            [before, task.RetryBlock(Hosts(self.journal), [spawn])],
            inputs=('hosts',))
        flow_uuid = self._create(flow, {'hosts': ['h1', 'h2']})

        state = engine_mod.Engine().run(self.context, flow_uuid)

        self.assertEqual(states.REVERTED, state)
        self.assertEqual(
            [('execute', 'before'), ('first', 'pick-host'),
             ('execute', 'spawn'), ('revert', 'spawn'),
             ('next', 'pick-host'), ('execute', 'spawn'),
             ('revert', 'spawn'), ('next', 'pick-host'),
             ('revert', 'before')], self._calls())
        row, stages = self._stages(flow_uuid)
        self.assertEqual(states.REVERTED, row.state)
        self.assertTrue(all(s[2] == 'REVERTED' for s in stages), stages)

    def test_retry_controller_reads_the_failed_attempts_values(self):
        spawn = Recorder('spawn', self.journal, requires=('host',),
                         fail_on=[1])
        flow = self._flow(
            [task.RetryBlock(NextHost(self.journal), [spawn])],
            inputs=('hosts',))
        flow_uuid = self._create(flow, {'hosts': ['h1', 'h2', 'h3']})

        state = engine_mod.Engine().run(self.context, flow_uuid)

        self.assertEqual(states.SUCCESS, state)
        self.assertIn(('first', 'next-host', None), self.journal)
        self.assertIn(('next', 'next-host', 0), self.journal)
        self.assertEqual({'host': 'h3'}, self.journal[-1][2])

    def test_transient_values_reach_stages_but_are_never_stored(self):
        a = Recorder('a', self.journal, requires=('x', 'svc', 'secret'),
                     fail_on=[1])
        flow = task.register(task.FlowDefinition(self.id(), 1, ('x',), [a],
                                       transient=('svc', 'secret')))
        flow_uuid = self._create(flow)
        engine = engine_mod.Engine(transient={'svc': 'manager'})

        state = engine.run(self.context, flow_uuid,
                           transient={'secret': 'hunter2-transient'})

        self.assertEqual(states.REVERTED, state)
        self.assertEqual({'x': 1, 'svc': 'manager',
                          'secret': 'hunter2-transient'},
                         self.journal[0][2])
        row, rows = persistence.load(self.context, flow_uuid)
        stored = [row.inputs, row.failure] + [
            r.result for r in rows] + [r.failure for r in rows]
        self.assertNotIn('hunter2-transient', ' '.join(
            v for v in stored if v))
        self.assertNotIn('manager', ' '.join(v for v in stored if v))

    def test_resumed_run_has_only_its_engines_transient_values(self):
        a = Recorder('a', self.journal, requires=('svc', 'secret'),
                     on_crash=task.RERUN, crash_on=[1])
        flow = task.register(task.FlowDefinition(self.id(), 1, (), [a],
                                       transient=('svc', 'secret')))
        flow_uuid = self._create(flow, {})
        self.assertRaises(
            Crash, engine_mod.Engine(owner='first',
                                     transient={'svc': 'first-mgr'}).run,
            self.context, flow_uuid, transient={'secret': 's'})

        helpers.expire_lease(self.context, flow_uuid)
        second = engine_mod.Engine(owner='second',
                                   transient={'svc': 'second-mgr'})
        self.assertEqual(states.SUCCESS, second.run(self.context, flow_uuid))

        self.assertEqual([{'svc': 'first-mgr', 'secret': 's'},
                          {'svc': 'second-mgr', 'secret': None}],
                         [entry[2] for entry in self.journal
                          if entry[0] == 'execute'])

    def test_crash_mid_stage_reruns_an_idempotent_stage(self):
        a = Recorder('a', self.journal)
        b = Recorder('b', self.journal, on_crash=task.RERUN, crash_on=[1])
        flow_uuid = self._create(self._flow([a, b]))

        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, flow_uuid)
        _, stages = self._stages(flow_uuid)
        self.assertEqual([('a', 1, 'SUCCESS'), ('b', 1, 'RUNNING')], stages)

        self.assertEqual(states.SUCCESS, self._resume(flow_uuid))
        # The stage is executed again through execute_again, with the
        # arguments of execute, which it calls by default.
        self.assertEqual([('execute', 'a'), ('execute', 'b'),
                          ('execute_again', 'b'), ('execute', 'b')],
                         self._calls())
        self.assertEqual(self.journal[-1][2], self.journal[-2][2])

    def test_stage_executed_again_may_find_its_result(self):
        class FindsItsResult(Recorder):
            def execute_again(self, context, **kwargs):
                self.journal.append(('execute_again', self.name, kwargs))
                return 'found'

        a = FindsItsResult('a', self.journal, provides='ra',
                           on_crash=task.RERUN, crash_on=[1])
        b = Recorder('b', self.journal, requires=('ra',))
        flow_uuid = self._create(self._flow([a, b]))
        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, flow_uuid)

        self.assertEqual(states.SUCCESS, self._resume(flow_uuid))

        # Only an execution after a crash goes through execute_again; what
        # it returns is the stage's result.
        self.assertEqual([('execute', 'a'), ('execute_again', 'a'),
                          ('execute', 'b')], self._calls())
        self.assertEqual({'ra': 'found'}, self.journal[-1][2])

    def test_run_stopped_by_a_base_exception_says_so(self):
        a = Recorder('a', self.journal, crash_on=[1])
        flow_uuid = self._create(self._flow([a]))
        engine = engine_mod.Engine(owner='first')

        future = engine.start(self.context, flow_uuid)

        self.assertIsInstance(future.exception(), Crash)
        self.assertIn('Flow %s stopped on Crash(); it will be resumed when '
                      'its lease expires.' % flow_uuid,
                      self.stdlog.logger.output)
        # The engine no longer holds it: its lease is left to expire.
        self.assertEqual({}, engine._held)

    def test_stopped_engine_hands_the_flow_over(self):
        engine = engine_mod.Engine(owner='first')

        class Waits(Recorder):
            def execute(self, context, **kwargs):
                super().execute(context, **kwargs)
                if self.calls == 1:
                    # The service stops while the stage waits.
                    engine.stop()
                    raise exception.OrchestrationEngineStopped()
                return 'waited'

        a = Recorder('a', self.journal)
        b = Waits('b', self.journal, on_crash=task.RERUN)
        flow_uuid = self._create(self._flow([a, b]))

        self.assertIsNone(engine.run(self.context, flow_uuid))

        # Left as after a crash, and claimable at once; the execution
        # handed over is not counted.
        row, stages = self._stages(flow_uuid)
        self.assertEqual(states.RUNNING, row.state)
        self.assertEqual([('a', 1, 'SUCCESS'), ('b', 1, 'RUNNING')], stages)
        self.assertEqual([1, 0], self._executions(flow_uuid))
        self.assertEqual({}, engine._held)
        self.assertEqual(states.SUCCESS, engine_mod.Engine(
            owner='second').run(self.context, flow_uuid))
        self.assertEqual([1, 1], self._executions(flow_uuid))
        self.assertEqual([('execute', 'a'), ('execute', 'b'),
                          ('execute_again', 'b'), ('execute', 'b')],
                         self._calls())

    def test_rerun_is_counted_as_an_execution_of_the_stage(self):
        b = Recorder('b', self.journal, on_crash=task.RERUN, crash_on=[1])
        flow_uuid = self._create(self._flow([b]))
        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, flow_uuid)
        self.assertEqual([1], self._executions(flow_uuid))

        self.assertEqual(states.SUCCESS, self._resume(flow_uuid))

        self.assertEqual([2], self._executions(flow_uuid))

    def test_stage_stopping_every_conductor_ends_the_flow_in_error(self):
        self.flags(max_stage_executions=3, stage_rerun_backoff=0,
                   group='orchestration')
        a = Recorder('a', self.journal)
        b = Recorder('b', self.journal, on_crash=task.RERUN,
                     crash_on=[1, 2, 3])
        flow_uuid = self._create(self._flow([a, b]))
        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, flow_uuid)
        for owner in ('second', 'third'):
            self.assertRaises(Crash, self._resume, flow_uuid, owner)

        self.assertEqual(states.ERROR, self._resume(flow_uuid, 'fourth'))

        # Not executed a fourth time, and not reverted: an operator looks
        # into it first.
        self.assertEqual([('execute', 'a'), ('execute', 'b'),
                          ('execute_again', 'b'), ('execute', 'b'),
                          ('execute_again', 'b'), ('execute', 'b')],
                         self._calls())
        row, stages = self._stages(flow_uuid)
        self.assertEqual([('a', 1, 'SUCCESS'), ('b', 1, 'FAILURE')], stages)
        failure = persistence.decode(row.failure)
        self.assertEqual('StageExecutionLimit', failure['type'])
        self.assertEqual('b', failure['stage'])
        self.assertIn('started 3 times', failure['message'])
        _, rows = persistence.load(self.context, flow_uuid)
        self.assertEqual(failure, persistence.decode(rows[-1].failure))

    def test_stage_stopping_again_waits_before_its_next_execution(self):
        self.useFixture(utils_fixture.TimeFixture())
        self.flags(stage_rerun_backoff=30, group='orchestration')
        b = Recorder('b', self.journal, on_crash=task.RERUN,
                     crash_on=[1, 2])
        flow_uuid = self._create(self._flow([b]))
        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, flow_uuid)
        # Stopped once, it runs again as soon as the lease expired.
        self.assertRaises(Crash, self._resume, flow_uuid)

        # Stopped twice, it waits 30 s from its last start.
        timeutils.advance_time_seconds(10)
        self.assertEqual(states.RUNNING, self._resume(flow_uuid, 'third'))
        self.assertEqual(2, self._calls().count(('execute', 'b')))
        self.assertEqual([2], self._executions(flow_uuid))
        timeutils.advance_time_seconds(19)
        self.assertEqual([], persistence.claimable(self.context, 10))
        timeutils.advance_time_seconds(1)
        self.assertEqual([flow_uuid],
                         persistence.claimable(self.context, 10))
        self.assertEqual(states.SUCCESS, engine_mod.Engine(
            owner='fourth').run(self.context, flow_uuid))
        self.assertEqual([3], self._executions(flow_uuid))

    def test_crash_mid_stage_reverts_a_non_idempotent_stage(self):
        a = Recorder('a', self.journal)
        b = Recorder('b', self.journal, crash_on=[1])
        flow_uuid = self._create(self._flow([a, b]))
        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, flow_uuid)

        self.assertEqual(states.REVERTED, self._resume(flow_uuid))

        self.assertEqual([('execute', 'a'), ('execute', 'b'),
                          ('revert', 'b'), ('revert', 'a')], self._calls())
        row, _ = self._stages(flow_uuid)
        self.assertEqual('StageInterrupted',
                         persistence.decode(row.failure)['type'])

    def test_crash_during_rollback_resumes_the_rollback(self):
        a = Recorder('a', self.journal)
        b = Recorder('b', self.journal)
        c = Recorder('c', self.journal, fail_on=[1])
        flow_uuid = self._create(self._flow([a, b, c]))
        real_revert = b.revert

        def crash_once(context, result, failure, **kwargs):
            b.revert = real_revert
            raise Crash()
        b.revert = crash_once
        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, flow_uuid)
        row, stages = self._stages(flow_uuid)
        self.assertEqual(states.REVERTING, row.state)
        self.assertEqual([('a', 1, 'SUCCESS'), ('b', 1, 'REVERTING'),
                          ('c', 1, 'REVERTED')], stages)

        self.assertEqual(states.REVERTED, self._resume(flow_uuid))
        self.assertEqual([('execute', 'a'), ('execute', 'b'),
                          ('execute', 'c'), ('revert', 'c'),
                          ('revert', 'b'), ('revert', 'a')], self._calls())
        # The pass that caught c's exception gives it to c's revert.
        caught = c.failures[0]
        self.assertEqual(('ValueError', 'c'),
                         (caught.type, caught.record['stage']))
        self.assertIsInstance(caught.exception(), ValueError)
        # The pass that resumed the rollback has the stored record: its
        # exception carries the masked message and a traceback.
        for stored in b.failures + a.failures:
            self.assertEqual('ValueError', stored.type)
            exc = stored.exception()
            self.assertIsInstance(exc, exception.NovaException)
            self.assertEqual('c failed, password=***', exc.format_message())
            self.assertIsNotNone(exc.__traceback__)

    def test_retry_controller_raising_gives_up_with_its_exception(self):
        class GiveUp(Hosts):
            def next(self, context, attempt, failure, hosts):
                raise exception.MaxRetriesExceeded(reason='no host left')

        before = Recorder('before', self.journal)
        spawn = Recorder('spawn', self.journal, requires=('host',),
                         fail_on=[1])
        flow = self._flow(
            [before, task.RetryBlock(GiveUp(self.journal), [spawn])],
            inputs=('hosts',))
        flow_uuid = self._create(flow, {'hosts': ['h1', 'h2']})

        self.assertEqual(states.REVERTED,
                         engine_mod.Engine().run(self.context, flow_uuid))

        row, _ = self._stages(flow_uuid)
        self.assertEqual(('MaxRetriesExceeded', 'pick-host'), (
            persistence.decode(row.failure)['type'],
            persistence.decode(row.failure)['stage']))
        # The block was reverted with the stage's failure, the rest of the
        # flow with the controller's exception.
        self.assertEqual(['ValueError'], [f.type for f in spawn.failures])
        self.assertEqual(['MaxRetriesExceeded'],
                         [f.type for f in before.failures])
        self.assertIsInstance(before.failures[0].exception(),
                              exception.MaxRetriesExceeded)

    def test_crash_during_block_revert_then_retries(self):
        claim = Recorder('claim', self.journal, requires=('host',))
        spawn = Recorder('spawn', self.journal, requires=('host',),
                         fail_on=[1])
        flow = self._flow(
            [task.RetryBlock(Hosts(self.journal), [claim, spawn])],
            inputs=('hosts',))
        flow_uuid = self._create(flow, {'hosts': ['h1', 'h2']})
        real_revert = claim.revert

        def crash_once(context, result, failure, **kwargs):
            claim.revert = real_revert
            raise Crash()
        claim.revert = crash_once
        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, flow_uuid)

        self.assertEqual(states.SUCCESS, self._resume(flow_uuid))
        self.assertEqual(
            [('first', 'pick-host'), ('execute', 'claim'),
             ('execute', 'spawn'), ('revert', 'spawn'),
             ('revert', 'claim'), ('next', 'pick-host'),
             ('execute', 'claim'), ('execute', 'spawn')], self._calls())

    def test_revert_failure_ends_in_error_with_reason(self):
        a = Recorder('a', self.journal)
        b = Recorder('b', self.journal, fail_on=[1])
        a.revert = mock.Mock(side_effect=RuntimeError('port stuck'))
        flow_uuid = self._create(self._flow([a, b]))

        self.assertEqual(states.ERROR,
                         engine_mod.Engine().run(self.context, flow_uuid))
        row, stages = self._stages(flow_uuid)
        failure = persistence.decode(row.failure)
        self.assertEqual(('RuntimeError', 'a'),
                         (failure['type'], failure['stage']))
        self.assertIn('port stuck', failure['message'])
        self.assertEqual([('a', 1, 'REVERTING'), ('b', 1, 'REVERTED')],
                         stages)

    def test_revert_of_a_stopping_engine_is_handed_over(self):
        # Not a failed revert: the next conductor runs it again.
        a = Recorder('a', self.journal)
        b = Recorder('b', self.journal, fail_on=[1])
        a.revert = mock.Mock(side_effect=[
            exception.OrchestrationEngineStopped(), None])
        flow_uuid = self._create(self._flow([a, b]))

        self.assertIsNone(engine_mod.Engine().run(self.context, flow_uuid))
        row, stages = self._stages(flow_uuid)
        self.assertEqual(states.REVERTING, row.state)
        self.assertEqual([('a', 1, 'REVERTING'), ('b', 1, 'REVERTED')],
                         stages)

        self.assertEqual(states.REVERTED, self._resume(flow_uuid))
        self.assertEqual(2, a.revert.call_count)

    def _assert_error(self, flow_uuid, text):
        self.assertEqual(states.ERROR,
                         engine_mod.Engine().run(self.context, flow_uuid))
        row, _ = self._stages(flow_uuid)
        failure = persistence.decode(row.failure)
        self.assertEqual('OrchestrationFlowInvalid', failure['type'])
        self.assertIn(text, failure['message'])
        # A flow in ERROR is never claimed again: no crash loop.
        self.assertIsNone(self._resume(flow_uuid))

    def test_unknown_kind_ends_in_error(self):
        flow_uuid = persistence.create_flow(self.context, 'nope', 1, {})
        self._assert_error(flow_uuid, "kind 'nope' version 1")

    def test_unknown_version_ends_in_error(self):
        flow = self._flow([Recorder('a', self.journal)])
        flow_uuid = persistence.create_flow(self.context, flow.kind, 2,
                                            {'x': 1})
        self._assert_error(flow_uuid, 'version 2 is known')
        self.assertEqual([], self.journal)

    def test_missing_inputs_end_in_error(self):
        flow = self._flow([Recorder('a', self.journal)])
        flow_uuid = self._create(flow, {})
        self._assert_error(flow_uuid, 'inputs lack x')
        # The claim started the first stage, which could not run.
        self.assertEqual([('a', 1, states.STAGE_FAILURE)],
                         self._stages(flow_uuid)[1])
        self.assertEqual([], self.journal)

    def test_undecodable_inputs_end_in_error(self):
        flow = self._flow([Recorder('a', self.journal)])
        flow_uuid = self._create(flow)
        row, _ = self._stages(flow_uuid)
        helpers.set_column(self.context, api_models.OrchestrationFlow,
                           row.id, inputs='{not json')
        self._assert_error(flow_uuid, 'undecodable record')

    def test_undecodable_stage_result_ends_in_error(self):
        a = Recorder('a', self.journal)
        b = Recorder('b', self.journal, crash_on=[1], on_crash=task.RERUN)
        flow_uuid = self._create(self._flow([a, b]))
        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, flow_uuid)
        _, rows = persistence.load(self.context, flow_uuid)
        helpers.set_column(self.context, api_models.OrchestrationStage,
                           rows[0].id, result='\x00garbage')
        helpers.expire_lease(self.context, flow_uuid)
        self._assert_error(flow_uuid, 'undecodable record')

    def test_stage_not_in_definition_ends_in_error(self):
        a = Recorder('a', self.journal, crash_on=[1], on_crash=task.RERUN)
        flow_uuid = self._create(self._flow([a]))
        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, flow_uuid)
        _, rows = persistence.load(self.context, flow_uuid)
        helpers.set_column(self.context, api_models.OrchestrationStage,
                           rows[0].id, name='renamed')
        helpers.expire_lease(self.context, flow_uuid)
        self._assert_error(flow_uuid, "stored stage 'renamed'")

    def test_oversized_result_fails_the_stage(self):
        a = Recorder('a', self.journal)
        a.execute = mock.Mock(return_value='x' * (
            persistence.MAX_RECORD_BYTES + 1))
        flow_uuid = self._create(self._flow([a]))
        self.assertEqual(states.REVERTED,
                         engine_mod.Engine().run(self.context, flow_uuid))
        row, _ = self._stages(flow_uuid)
        self.assertEqual('OrchestrationRecordTooLarge',
                         persistence.decode(row.failure)['type'])

    def test_stale_owner_stops_without_writing(self):
        journal = self.journal
        context = self.context

        class TakeOver(Recorder):
            def execute(self, ctx, **kwargs):
                # Another conductor claims the flow while this stage runs.
                helpers.expire_lease(context, flow_uuid)
                self.thief = persistence.claim(context, flow_uuid, 'thief',
                                               60).fence
                return super().execute(ctx, **kwargs)

        a = TakeOver('a', journal)
        b = Recorder('b', journal)
        flow_uuid = self._create(self._flow([a, b]))

        self.assertIsNone(engine_mod.Engine(owner='first').run(
            self.context, flow_uuid))

        self.assertEqual([('execute', 'a')], self._calls())
        row, stages = self._stages(flow_uuid)
        self.assertEqual(('thief', 2), (row.owner, row.lease_generation))
        self.assertEqual([('a', 1, 'RUNNING')], stages)

    def test_stale_run_leaves_the_next_run_of_its_engine_alone(self):
        engine = engine_mod.Engine(owner='me')
        context = self.context
        test = self

        class Overrun(Recorder):
            def execute(self, ctx, **kwargs):
                # The stage overran: a sweep of the same engine took the
                # flow over and is running it.
                helpers.expire_lease(context, flow_uuid)
                test.current = persistence.claim(context, flow_uuid, 'me',
                                                 60).fence
                engine._held[flow_uuid] = [test.current, 12345.0]
                return super().execute(ctx, **kwargs)

        flow_uuid = self._create(self._flow([Overrun('a', self.journal)]))

        # The stale run is fenced out when it records its stage...
        self.assertIsNone(engine.run(self.context, flow_uuid))
        # ...without dropping the current run from the leases to renew,
        # nor clearing the deadline of its stage.
        self.assertEqual({flow_uuid: [self.current, 12345.0]}, engine._held)

    def test_live_lease_is_not_claimed(self):
        flow_uuid = self._create(self._flow([Recorder('a', self.journal)]))
        self.assertIsNotNone(persistence.claim(self.context, flow_uuid,
                                               'one', 60))
        self.assertIsNone(engine_mod.Engine().run(self.context, flow_uuid))
        self.assertEqual([], self.journal)

    def test_sweep_resumes_expired_flows_on_the_pool(self):
        a = Recorder('a', self.journal, on_crash=task.RERUN, crash_on=[1])
        flow = self._flow([a])
        crashed = self._create(flow)
        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, crashed)
        pending = self._create(flow)
        helpers.expire_lease(self.context, crashed)

        futures = engine_mod.Engine(owner='sweeper').sweep(self.context)

        self.assertEqual(2, len(futures))
        self.assertEqual([states.SUCCESS] * 2,
                         [f.result(timeout=10) for f in futures])
        for flow_uuid in (crashed, pending):
            row, _ = self._stages(flow_uuid)
            self.assertEqual((states.SUCCESS, 'sweeper'),
                             (row.state, row.owner))

    def test_sweep_leaves_flows_it_does_not_know(self):
        # A newer conductor's flow, swept by an older one during a rolling
        # upgrade, stays for a conductor that knows it.
        flow_uuid = persistence.create_flow(self.context, 'newer', 1, {})

        self.assertEqual([], engine_mod.Engine().sweep(self.context))

        row, _ = self._stages(flow_uuid)
        self.assertEqual((states.PENDING, None), (row.state, row.owner))

    def test_renewal_skips_flows_whose_stage_overran(self):
        engine = engine_mod.Engine(owner='me')
        flow_uuid = self._create(self._flow([Recorder('a', self.journal)]))
        fence = persistence.claim(self.context, flow_uuid, 'me', 60).fence
        engine._held[flow_uuid] = [fence, None]
        with mock.patch.object(persistence, 'renew') as renew:
            engine.renew_leases(self.context)
            renew.assert_called_once_with(self.context, fence, 60)
            renew.reset_mock()
            engine._set_deadline(fence, -1)
            engine.renew_leases(self.context)
            renew.assert_not_called()

    def test_renewal_extends_the_lease(self):
        engine = engine_mod.Engine(owner='me')
        flow_uuid = self._create(self._flow([Recorder('a', self.journal)]))
        fence = persistence.claim(self.context, flow_uuid, 'me', 1).fence
        before, _ = self._stages(flow_uuid)
        engine._held[flow_uuid] = [fence, None]
        engine.renew_leases(self.context)
        after, _ = self._stages(flow_uuid)
        self.assertGreater(after.lease_expires_at, before.lease_expires_at)

    def test_lost_lease_is_reported_not_raised_by_renewal(self):
        engine = engine_mod.Engine(owner='me')
        flow_uuid = self._create(self._flow([Recorder('a', self.journal)]))
        fence = persistence.claim(self.context, flow_uuid, 'me', 60).fence
        engine._held[flow_uuid] = [fence._replace(generation=7), None]
        with mock.patch.object(engine_mod.LOG, 'warning') as warning:
            engine.renew_leases(self.context)
        self.assertIsInstance(warning.call_args[0][1],
                              exception.OrchestrationLeaseLost)

    def _children(self):
        return len(persistence.flows_of_instance(self.context, CHILD))

    def test_transactional_stage_commits_its_writes_exactly_once(self):
        spawner = SpawnChild('spawner', self.journal, crash_on=[1])
        flow_uuid = self._create(self._flow([spawner]))

        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, flow_uuid)
        # The crash rolled back the stage's write with its transaction.
        self.assertEqual(0, self._children())
        _, stages = self._stages(flow_uuid)
        self.assertEqual([('spawner', 1, 'RUNNING')], stages)

        # Nothing was committed, so it re-runs although on_crash is REVERT.
        self.assertEqual(states.SUCCESS, self._resume(flow_uuid))
        self.assertEqual(1, self._children())
        self.assertEqual([('execute', 'spawner')] * 2, self._calls())

    def test_transactional_stage_of_a_stale_owner_writes_nothing(self):
        context = self.context

        class StolenSpawn(SpawnChild):
            def execute(self, ctx, **kwargs):
                result = super().execute(ctx, **kwargs)
                helpers.expire_lease(context, flow_uuid)
                persistence.claim(context, flow_uuid, 'thief', 60)
                return result

        flow_uuid = self._create(self._flow([StolenSpawn('s',
                                                         self.journal)]))
        self.assertIsNone(engine_mod.Engine(owner='first').run(
            self.context, flow_uuid))
        self.assertEqual(0, self._children())

    def test_retried_write_after_a_lost_ack_runs_no_stage_twice(self):
        a = Recorder('a', self.journal)
        b = Recorder('b', self.journal)
        c = SpawnChild('c', self.journal)
        flow_uuid = self._create(self._flow([a, b, c]))
        real_transition = persistence.transition

        def transition(*args, **kwargs):
            # The first attempt commits but its acknowledgement is lost, so
            # oslo.db's retry runs the transaction again.
            real_transition(*args, **kwargs)
            return real_transition(*args, **kwargs)

        def retry_whole_transaction(func):
            def retried(*args, **kwargs):
                func(*args, **kwargs)
                return func(*args, **kwargs)
            return retried

        with mock.patch.object(persistence, 'transition', transition), \
                mock.patch.object(persistence, 'retry_on_disconnect',
                                  retry_whole_transaction):
            state = engine_mod.Engine().run(self.context, flow_uuid)

        self.assertEqual(states.SUCCESS, state)
        # The retried transaction of c ran c again, but rolled back: its
        # write committed once.
        self.assertEqual([('execute', 'a'), ('execute', 'b'),
                          ('execute', 'c'), ('execute', 'c')], self._calls())
        self.assertEqual(1, self._children())
        _, stages = self._stages(flow_uuid)
        self.assertEqual([('a', 1, 'SUCCESS'), ('b', 1, 'SUCCESS'),
                          ('c', 1, 'SUCCESS')], stages)


class Aborter(Recorder):
    """A task during whose execution an operator aborts its flow."""

    def __init__(self, name, journal, flow_uuid, **kwargs):
        super().__init__(name, journal, **kwargs)
        self.flow_uuid = flow_uuid

    def execute(self, context, **kwargs):
        # The operator's tool writes in a transaction of its own.
        persistence.abort(nova_context.get_admin_context(),
                          self.flow_uuid())
        return super().execute(context, **kwargs)


class AbortTestCase(EngineTestCase):
    """An operator asks for a flow to be reverted."""

    def _aborted_by_operator(self, flow_uuid):
        row, _ = persistence.load(self.context, flow_uuid)
        self.assertEqual(states.REVERTED, row.state)
        self.assertEqual(persistence.ABORTED,
                         persistence.decode(row.failure))

    def test_running_flow_reverts_after_its_current_stage(self):
        uuids = []
        a = Recorder('a', self.journal, provides='ra')
        b = Aborter('b', self.journal, lambda: uuids[0])
        c = Recorder('c', self.journal)
        uuids.append(self._create(self._flow([a, b, c])))

        state = engine_mod.Engine().run(self.context, uuids[0])

        self.assertEqual(states.REVERTED, state)
        # b finished and its result was kept for its revert; c never ran.
        self.assertEqual([('execute', 'a', {}), ('execute', 'b', {}),
                          ('revert', 'b', 'b-result'),
                          ('revert', 'a', 'a-result')], self.journal)
        _, stages = self._stages(uuids[0])
        self.assertEqual([('a', 1, 'REVERTED'), ('b', 1, 'REVERTED')],
                         stages)
        self._aborted_by_operator(uuids[0])

    def test_abort_during_a_failing_stage_keeps_the_abort_reason(self):
        uuids = []
        a = Recorder('a', self.journal)
        b = Aborter('b', self.journal, lambda: uuids[0], fail_on=[1])
        uuids.append(self._create(self._flow([a, b])))

        self.assertEqual(states.REVERTED,
                         engine_mod.Engine().run(self.context, uuids[0]))
        self.assertEqual([('execute', 'a'), ('execute', 'b'),
                          ('revert', 'b'), ('revert', 'a')], self._calls())
        self._aborted_by_operator(uuids[0])

    def test_abort_before_a_retry_reverts_instead(self):
        uuids = []
        spawn = Aborter('spawn', self.journal, lambda: uuids[0],
                        requires=('host',), fail_on=[1])
        flow = self._flow([task.RetryBlock(Hosts(self.journal), [spawn])],
                          inputs=('hosts',))
        uuids.append(self._create(flow, {'hosts': ['h1', 'h2']}))

        self.assertEqual(states.REVERTED,
                         engine_mod.Engine().run(self.context, uuids[0]))
        # The controller was asked for another host, but the new attempt
        # was refused.
        self.assertEqual([('first', 'pick-host'), ('execute', 'spawn'),
                          ('revert', 'spawn'), ('next', 'pick-host')],
                         self._calls())
        _, stages = self._stages(uuids[0])
        self.assertEqual([('pick-host', 1, 'REVERTED'),
                          ('spawn', 1, 'REVERTED')], stages)
        self._aborted_by_operator(uuids[0])

    def test_pending_flow_reverts_without_running_a_stage(self):
        flow_uuid = self._create(self._flow([Recorder('a', self.journal)]))
        persistence.abort(self.context, flow_uuid)

        self.assertEqual(states.REVERTED,
                         engine_mod.Engine().run(self.context, flow_uuid))
        self.assertEqual([], self.journal)
        self._aborted_by_operator(flow_uuid)

    def test_flow_of_a_dead_owner_is_reverted_by_the_next_claimer(self):
        a = Recorder('a', self.journal)
        b = Recorder('b', self.journal, on_crash=task.RERUN, crash_on=[1])
        flow_uuid = self._create(self._flow([a, b]))
        self.assertRaises(Crash, engine_mod.Engine(owner='first').run,
                          self.context, flow_uuid)
        persistence.abort(self.context, flow_uuid)

        self.assertEqual(states.REVERTED, self._resume(flow_uuid))
        # b's outcome is unknown: it is reverted without a result, not
        # re-run although it is idempotent.
        self.assertEqual([('execute', 'a', {}), ('execute', 'b', {}),
                          ('revert', 'b', None),
                          ('revert', 'a', 'a-result')], self.journal)
        self._aborted_by_operator(flow_uuid)

    def test_transactional_stage_seeing_the_abort_rolls_back(self):
        uuids = []

        class AbortedSpawn(SpawnChild):
            def execute(self, context, **kwargs):
                # The operator's abort commits in a transaction of its own.
                persistence.abort(nova_context.get_admin_context(),
                                  uuids[0])
                return super().execute(context, **kwargs)

        a = Recorder('a', self.journal)
        spawner = AbortedSpawn('spawner', self.journal)
        uuids.append(self._create(self._flow([a, spawner])))

        self.assertEqual(states.REVERTED,
                         engine_mod.Engine().run(self.context, uuids[0]))
        # The stage's write was rolled back with the transaction that found
        # the abort; it is reverted as a stage of unknown outcome.
        self.assertEqual(0, self._children())
        self.assertEqual([('execute', 'a'), ('execute', 'spawner'),
                          ('revert', 'spawner'), ('revert', 'a')],
                         self._calls())
        self._aborted_by_operator(uuids[0])
