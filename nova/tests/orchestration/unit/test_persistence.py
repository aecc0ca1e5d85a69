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

import datetime

from oslo_utils import timeutils
import sqlalchemy as sa

from nova import context as nova_context
from nova.db.api import api as api_db_api
from nova.db.api import models as api_models
from nova import exception
from nova.orchestration import persistence
from nova.orchestration import states
from nova import test
from nova.tests.orchestration.unit import helpers


class _SQLCounter(object):
    """Counts statements and commits on the API database engine."""

    def __init__(self):
        self.statements = []
        self.commits = 0

    def _statement(self, conn, cursor, statement, *args):
        verb = statement.split()[0].upper()
        # oslo.db emits BEGIN itself on SQLite; other drivers begin
        # implicitly. Transaction control is counted by commits.
        if verb != 'BEGIN':
            self.statements.append(verb)

    def _commit(self, conn):
        self.commits += 1

    def __enter__(self):
        engine = api_db_api.get_engine()
        sa.event.listen(engine, 'before_cursor_execute', self._statement)
        sa.event.listen(engine, 'commit', self._commit)
        return self

    def __exit__(self, *exc):
        engine = api_db_api.get_engine()
        sa.event.remove(engine, 'before_cursor_execute', self._statement)
        sa.event.remove(engine, 'commit', self._commit)


class PersistenceTestCase(test.TestCase):

    def setUp(self):
        super().setUp()
        self.context = nova_context.get_admin_context()

    def _create(self, **kwargs):
        return persistence.create_flow(self.context, 'kind', 1, {'a': 1},
                                       **kwargs)

    def test_new_flow_is_pending_and_claimable(self):
        flow_uuid = self._create(instance_uuid=None, request_id='req-1')
        flow, stages = persistence.load(self.context, flow_uuid)
        self.assertEqual((states.PENDING, None, 0, 'req-1', []),
                         (flow.state, flow.owner, flow.lease_generation,
                          flow.request_id, stages))
        self.assertEqual([flow_uuid],
                         persistence.claimable(self.context, 10))

    def test_held_flow_is_left_to_its_starter(self):
        flow_uuid = self._create(hold_seconds=60)
        # Sweeps do not see it...
        self.assertEqual([], persistence.claimable(self.context, 10))
        # ...but whoever starts it takes it at once, and only once.
        fence = persistence.claim(self.context, flow_uuid, 'starter', 60).fence
        self.assertEqual(('starter', 1), (fence.owner, fence.generation))
        self.assertIsNone(persistence.claim(self.context, flow_uuid, 'two',
                                            60))

    def test_held_flow_is_swept_once_the_hold_expires(self):
        flow_uuid = self._create(hold_seconds=60)
        helpers.expire_lease(self.context, flow_uuid)
        self.assertEqual([flow_uuid],
                         persistence.claimable(self.context, 10))

    def test_claim_is_exclusive_while_the_lease_lives(self):
        flow_uuid = self._create()
        fence = persistence.claim(self.context, flow_uuid, 'one', 60).fence
        self.assertEqual(('one', 1), (fence.owner, fence.generation))
        self.assertIsNone(persistence.claim(self.context, flow_uuid, 'two',
                                            60))
        self.assertEqual([], persistence.claimable(self.context, 10))

    def test_claim_reads_the_records_it_took(self):
        flow_uuid = self._create()
        claim = persistence.claim(self.context, flow_uuid, 'one', 60)
        self.assertEqual((flow_uuid, states.PENDING, 'one', 1, '{"a": 1}'),
                         (claim.flow.uuid, claim.flow.state, claim.flow.owner,
                          claim.flow.lease_generation, claim.flow.inputs))
        self.assertEqual([], claim.stages)
        persistence.transition(
            self.context, claim.fence, 60,
            flow_values={'state': states.RUNNING},
            start={'position': 0, 'attempt': 1, 'name': 'a',
                   'state': states.STAGE_RUNNING})
        helpers.expire_lease(self.context, flow_uuid)

        claim = persistence.claim(self.context, flow_uuid, 'two', 60)
        self.assertEqual((states.RUNNING, 'two', 2),
                         (claim.flow.state, claim.flow.owner,
                          claim.fence.generation))
        self.assertEqual([(0, 1, 'a', states.STAGE_RUNNING, 'one')],
                         [(row.position, row.attempt, row.name, row.state,
                           row.owner) for row in claim.stages])

    def test_claim_starts_the_first_stage_of_a_pending_flow(self):
        flow_uuid = self._create()
        kinds = []

        def first_stage(kind, version):
            kinds.append((kind, version))
            return 'a'

        with _SQLCounter() as counter:
            claim = persistence.claim(self.context, flow_uuid, 'one', 60,
                                      first_stage)

        # The claim and the start of the flow in one transaction.
        self.assertEqual((['UPDATE', 'SELECT', 'UPDATE', 'INSERT'], 1),
                         (counter.statements, counter.commits))
        self.assertEqual([('kind', 1)], kinds)
        self.assertEqual(states.PENDING, claim.flow.state)
        flow, stages = persistence.load(self.context, flow_uuid)
        self.assertEqual((states.RUNNING, 'one', 1),
                         (flow.state, flow.owner, flow.lease_generation))
        self.assertEqual([(claim.started, 0, 1, 'a', states.STAGE_RUNNING,
                           'one')],
                         [(row.id, row.position, row.attempt, row.name,
                           row.state, row.owner) for row in stages])

        # A flow that has started is claimed as it is.
        helpers.expire_lease(self.context, flow_uuid)
        claim = persistence.claim(self.context, flow_uuid, 'two', 60,
                                  first_stage)
        self.assertEqual(1, len(kinds))
        self.assertIsNone(claim.started)
        self.assertEqual([(0, 1, 'a')], [(row.position, row.attempt, row.name)
                                         for row in claim.stages])

    def test_claim_starts_no_stage_of_an_unknown_flow(self):
        flow_uuid = self._create()

        claim = persistence.claim(self.context, flow_uuid, 'one', 60,
                                  lambda kind, version: None)

        self.assertIsNone(claim.started)
        flow, stages = persistence.load(self.context, flow_uuid)
        self.assertEqual((states.PENDING, []), (flow.state, stages))

    def test_expired_claim_fences_out_the_previous_owner(self):
        flow_uuid = self._create()
        old = persistence.claim(self.context, flow_uuid, 'one', 60).fence
        helpers.expire_lease(self.context, flow_uuid)
        new = persistence.claim(self.context, flow_uuid, 'two', 60).fence
        self.assertEqual(2, new.generation)

        self.assertRaises(exception.OrchestrationLeaseLost,
                          persistence.renew, self.context, old, 60)
        self.assertRaises(
            exception.OrchestrationLeaseLost, persistence.transition,
            self.context, old, 60, start={
                'position': 0, 'attempt': 1, 'name': 'a',
                'state': states.STAGE_RUNNING})
        _, stages = persistence.load(self.context, flow_uuid)
        self.assertEqual([], stages)
        persistence.renew(self.context, new, 60)

    def test_same_owner_reclaiming_gets_a_new_generation(self):
        flow_uuid = self._create()
        first = persistence.claim(self.context, flow_uuid, 'one', 60).fence
        helpers.expire_lease(self.context, flow_uuid)
        second = persistence.claim(self.context, flow_uuid, 'one', 60).fence
        self.assertEqual(first.generation + 1, second.generation)
        self.assertRaises(exception.OrchestrationLeaseLost,
                          persistence.renew, self.context, first, 60)

    def test_finished_flows_are_not_claimable(self):
        flow_uuid = self._create()
        fence = persistence.claim(self.context, flow_uuid, 'one', 60).fence
        persistence.transition(self.context, fence, 60,
                               flow_values={'state': states.SUCCESS})
        helpers.expire_lease(self.context, flow_uuid)
        self.assertEqual([], persistence.claimable(self.context, 10))
        self.assertIsNone(persistence.claim(self.context, flow_uuid, 'two',
                                            60))

    def test_claimable_honours_the_limit_oldest_lease_first(self):
        uuids = [self._create() for _ in range(3)]
        self.assertEqual(uuids[:2], persistence.claimable(self.context, 2))

    def test_claimable_only_of_the_given_definitions(self):
        known = self._create()
        unknown = persistence.create_flow(self.context, 'kind', 2, {})
        other = persistence.create_flow(self.context, 'other', 1, {})
        self.assertEqual([known], persistence.claimable(
            self.context, 10, [('kind', 1), ('nope', 2)]))
        self.assertEqual([], persistence.claimable(self.context, 10, []))
        self.assertEqual([known, unknown, other],
                         persistence.claimable(self.context, 10))

    def test_one_commit_and_three_statements_per_transition(self):
        flow_uuid = self._create()
        fence = persistence.claim(self.context, flow_uuid, 'one', 60).fence
        first = persistence.transition(self.context, fence, 60, start={
            'position': 0, 'attempt': 1, 'name': 'a',
            'state': states.STAGE_RUNNING})
        with _SQLCounter() as counter:
            second = persistence.transition(
                self.context, fence, 60,
                finish={'id': first, 'state': states.STAGE_SUCCESS,
                        'result': '1'},
                start={'position': 1, 'attempt': 1, 'name': 'b',
                       'state': states.STAGE_RUNNING})
        self.assertEqual(['UPDATE', 'UPDATE', 'INSERT'], counter.statements)
        self.assertEqual(1, counter.commits)
        _, stages = persistence.load(self.context, flow_uuid)
        self.assertEqual([(first, 'SUCCESS', '1', 'one'),
                          (second, 'RUNNING', None, 'one')],
                         [(s.id, s.state, s.result, s.owner)
                          for s in stages])

    def test_renewal_is_one_statement(self):
        flow_uuid = self._create()
        fence = persistence.claim(self.context, flow_uuid, 'one', 60).fence
        with _SQLCounter() as counter:
            persistence.renew(self.context, fence, 60)
        self.assertEqual((['UPDATE'], 1),
                         (counter.statements, counter.commits))

    def test_claim_query_uses_the_state_lease_index(self):
        with api_db_api.context_manager.reader.using(self.context) as s:
            flows = api_models.OrchestrationFlow.__table__
            query = sa.select(flows.c.uuid).where(
                flows.c.state.in_(states.ACTIVE),
                flows.c.lease_expires_at <= sa.func.now()).order_by(
                flows.c.lease_expires_at).limit(5)
            compiled = query.compile(s.bind,
                                     compile_kwargs={'literal_binds': True})
            plan = s.execute(sa.text('EXPLAIN QUERY PLAN %s' % compiled))
            details = ' '.join(row[-1] for row in plan)
        self.assertIn('orchestration_flows_state_lease_idx', details)

    def test_encode_keeps_values_and_limits_size(self):
        # Keys that look like secrets are ids here, and must survive.
        value = {'port': 'p1',
                 'encryption_secret_uuid': 'f3e4b1d2-0c1a-4f5e-9d8c'}
        self.assertEqual(value, persistence.decode(
            persistence.encode(value, 'result', 'a')))
        self.assertRaises(exception.OrchestrationRecordTooLarge,
                          persistence.encode,
                          'x' * persistence.MAX_RECORD_BYTES, 'result', 'a')

    def test_failure_record_masks_the_message(self):
        try:
            raise ValueError("boom password='hunter2'")
        except ValueError as e:
            record = persistence.failure_record(e, 'spawn')
        self.assertEqual(('ValueError', 'spawn'),
                         (record['type'], record['stage']))
        self.assertNotIn('hunter2', record['message'])
        self.assertNotIn('hunter2', record['traceback'])
        self.assertIn('test_failure_record_masks_the_message',
                      record['traceback'])

    def test_load_unknown_flow(self):
        self.assertRaises(exception.OrchestrationFlowNotFound,
                          persistence.load, self.context, 'nope')

    def _start_stage(self, flow_uuid):
        fence = persistence.claim(self.context, flow_uuid, 'one', 60).fence
        stage_id = persistence.transition(self.context, fence, 60, start={
            'position': 0, 'attempt': 1, 'name': 'a',
            'state': states.STAGE_RUNNING}, forward=True)
        return fence, stage_id

    def test_abort_marks_an_active_flow_reverting(self):
        pending = self._create()
        running = self._create()
        self._start_stage(running)
        for flow_uuid in (pending, running):
            persistence.abort(self.context, flow_uuid)
            flow, _ = persistence.load(self.context, flow_uuid)
            self.assertEqual(states.REVERTING, flow.state)
            self.assertEqual(persistence.ABORTED,
                             persistence.decode(flow.failure))
        # The lease is left to its owner, who reverts the flow itself.
        flow, _ = persistence.load(self.context, running)
        self.assertEqual(('one', 1), (flow.owner, flow.lease_generation))

    def test_abort_of_a_started_flow_only(self):
        flow_uuid = self._create()
        ex = self.assertRaises(exception.OrchestrationFlowInvalidState,
                               persistence.abort, self.context, flow_uuid,
                               started=True)
        self.assertIn('is PENDING: only a pending or running flow that '
                      'started a stage', str(ex))
        self._start_stage(flow_uuid)
        persistence.abort(self.context, flow_uuid, started=True)
        flow, _ = persistence.load(self.context, flow_uuid)
        self.assertEqual(states.REVERTING, flow.state)

    def test_abort_refuses_reverting_and_finished_flows(self):
        flow_uuid = self._create()
        persistence.abort(self.context, flow_uuid)
        ex = self.assertRaises(exception.OrchestrationFlowInvalidState,
                               persistence.abort, self.context, flow_uuid)
        self.assertIn('is REVERTING', str(ex))
        self.assertRaises(exception.OrchestrationFlowNotFound,
                          persistence.abort, self.context, 'nope')

    def test_forward_transition_of_an_aborted_flow_writes_nothing(self):
        flow_uuid = self._create()
        fence, stage_id = self._start_stage(flow_uuid)
        persistence.abort(self.context, flow_uuid)
        finish = {'id': stage_id, 'state': states.STAGE_SUCCESS,
                  'result': '1'}

        with _SQLCounter() as counter:
            self.assertRaises(
                persistence.AbortRequested, persistence.transition,
                self.context, fence, 60, finish=finish, start={
                    'position': 1, 'attempt': 1, 'name': 'b',
                    'state': states.STAGE_RUNNING}, forward=True)
        # The check added a statement only because the update matched
        # nothing.
        self.assertEqual(['UPDATE', 'SELECT'], counter.statements)
        _, stages = persistence.load(self.context, flow_uuid)
        self.assertEqual([('a', states.STAGE_RUNNING)],
                         [(s.name, s.state) for s in stages])

        # Other writes of the owner go on: it records the stage's end and
        # reverts the flow.
        persistence.transition(self.context, fence, 60, finish=finish)
        _, stages = persistence.load(self.context, flow_uuid)
        self.assertEqual(states.STAGE_SUCCESS, stages[0].state)

    def test_forward_transition_of_a_stale_owner_is_a_lost_lease(self):
        flow_uuid = self._create()
        fence, _ = self._start_stage(flow_uuid)
        persistence.abort(self.context, flow_uuid)
        helpers.expire_lease(self.context, flow_uuid)
        persistence.claim(self.context, flow_uuid, 'two', 60)
        self.assertRaises(
            exception.OrchestrationLeaseLost, persistence.transition,
            self.context, fence, 60, flow_values={'state': states.SUCCESS},
            forward=True)

    def test_rerun_counts_an_execution_of_a_running_stage_only(self):
        flow_uuid = self._create()
        fence, stage_id = self._start_stage(flow_uuid)
        helpers.expire_lease(self.context, flow_uuid)
        fence = persistence.claim(self.context, flow_uuid, 'two', 60).fence

        persistence.transition(self.context, fence, 60, start={
            'id': stage_id, 'rerun': True}, forward=True)

        # The row keeps who started it first, and when.
        _, stages = persistence.load(self.context, flow_uuid)
        self.assertEqual((states.STAGE_RUNNING, 2, 'one'),
                         (stages[0].state, stages[0].executions,
                          stages[0].owner))
        self.assertLess(stages[0].started_at, stages[0].updated_at)
        persistence.transition(self.context, fence, 60, finish={
            'id': stage_id, 'state': states.STAGE_SUCCESS, 'result': '1'})
        self.assertRaises(persistence.AlreadyRecorded,
                          persistence.transition, self.context, fence, 60,
                          start={'id': stage_id, 'rerun': True})

    def test_hand_over_expires_the_lease_and_uncounts_the_execution(self):
        flow_uuid = self._create()
        fence, _ = self._start_stage(flow_uuid)

        persistence.hand_over(self.context, fence)

        flow, stages = persistence.load(self.context, flow_uuid)
        self.assertEqual([flow_uuid], persistence.claimable(self.context, 10))
        self.assertEqual(('one', 1), (flow.owner, flow.lease_generation))
        self.assertEqual(0, stages[0].executions)
        # Only the owner hands a flow over.
        persistence.claim(self.context, flow_uuid, 'two', 60)
        self.assertRaises(exception.OrchestrationLeaseLost,
                          persistence.hand_over, self.context, fence)

    def test_release_expires_the_lease_and_fences_out_the_owner(self):
        flow_uuid = self._create()
        fence = persistence.claim(self.context, flow_uuid, 'one', 60).fence

        persistence.release(self.context, flow_uuid)

        flow, _ = persistence.load(self.context, flow_uuid)
        self.assertEqual((states.PENDING, None, 2),
                         (flow.state, flow.owner, flow.lease_generation))
        self.assertRaises(exception.OrchestrationLeaseLost,
                          persistence.renew, self.context, fence, 60)
        self.assertEqual(3, persistence.claim(self.context, flow_uuid, 'two',
                                              60).fence.generation)

    def test_purge_deletes_in_batches_of_the_limit(self):
        uuids = [self._create() for _ in range(3)]
        for flow_uuid in uuids:
            fence = persistence.claim(self.context, flow_uuid, 'one', 60).fence
            persistence.transition(self.context, fence, 60, start={
                'position': 0, 'attempt': 1, 'name': 'a',
                'state': states.STAGE_RUNNING},
                flow_values={'state': states.SUCCESS})
        later = timeutils.utcnow() + datetime.timedelta(seconds=1)

        self.assertEqual(3, persistence.count_purgeable(self.context, later))
        self.assertEqual(2, persistence.purge(self.context, later, 2))
        self.assertEqual(1, persistence.purge(self.context, later, 2))
        self.assertEqual(0, persistence.purge(self.context, later, 2))
        self.assertEqual([], persistence.list_flows(self.context))

    def test_purge_query_uses_the_state_updated_at_index(self):
        with api_db_api.context_manager.reader.using(self.context) as s:
            flows = api_models.OrchestrationFlow.__table__
            query = sa.select(flows.c.id).where(
                flows.c.state.in_(states.FINISHED),
                flows.c.updated_at < sa.func.now()).limit(5)
            compiled = query.compile(s.bind,
                                     compile_kwargs={'literal_binds': True})
            plan = s.execute(sa.text('EXPLAIN QUERY PLAN %s' % compiled))
            details = ' '.join(row[-1] for row in plan)
        self.assertIn('orchestration_flows_state_updated_at_idx', details)
