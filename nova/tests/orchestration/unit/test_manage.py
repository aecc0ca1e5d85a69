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

"""nova-manage orchestration, on the real API database."""

import argparse
import datetime
from io import StringIO

import fixtures
from oslo_utils.fixture import uuidsentinel as uuids
from oslo_utils import timeutils

from nova.cmd import common as cmd_common
from nova.cmd import manage
from nova import context as nova_context
from nova.db.api import models as api_models
from nova import exception
from nova.orchestration import engine as engine_mod
from nova.orchestration.flows import boot as build_flows
from nova.orchestration import persistence
from nova.orchestration import states
from nova.orchestration import task
from nova import test
from nova.tests.orchestration.unit import helpers


class Step(task.Task):
    """Journals its calls; fails its first execute or revert on demand."""

    def __init__(self, name, journal, fail=False, fail_revert=False):
        self.name = name
        self.journal = journal
        self.fail = fail
        self.fail_revert = fail_revert

    def execute(self, context):
        self.journal.append(('execute', self.name))
        if self.fail:
            raise ValueError('%s broke' % self.name)
        return self.name

    def revert(self, context, result, failure):
        self.journal.append(('revert', self.name))
        if self.fail_revert:
            self.fail_revert = False
            raise ValueError('revert of %s broke' % self.name)


class OrchestrationCommandsTestCase(test.TestCase):

    def setUp(self):
        super().setUp()
        self.context = nova_context.get_admin_context()
        self.output = StringIO()
        self.useFixture(fixtures.MonkeyPatch('sys.stdout', self.output))
        self.useFixture(fixtures.MockPatchObject(task, '_REGISTRY', {}))
        self.commands = manage.OrchestrationCommands()
        self.journal = []

    def _flow(self, *items, kind='test'):
        return task.register(task.FlowDefinition(kind, 1, (), list(items)))

    def _create(self, kind='test', instance_uuid=None):
        return persistence.create_flow(self.context, kind, 1, {},
                                       instance_uuid=instance_uuid)

    def _run(self, flow_uuid, owner='conductor-1'):
        return engine_mod.Engine(owner=owner).run(self.context, flow_uuid)

    def _load(self, flow_uuid):
        return persistence.load(self.context, flow_uuid)[0]

    def _finish(self, flow_uuid, state, days_ago):
        fence = persistence.claim(self.context, flow_uuid, 'old', 60).fence
        persistence.transition(self.context, fence, 60, start={
            'position': 0, 'attempt': 1, 'name': 'a',
            'state': states.STAGE_RUNNING}, flow_values={'state': state})
        row = self._load(flow_uuid)
        helpers.set_column(
            self.context, api_models.OrchestrationFlow, row.id,
            updated_at=timeutils.utcnow() - datetime.timedelta(
                days=days_ago))

    def _listed(self, **filters):
        self.output.truncate(0)
        self.output.seek(0)
        self.assertEqual(0, self.commands.list(**filters))
        lines = self.output.getvalue().splitlines()
        return {line.split('|')[1].strip() for line in lines[3:]
                if line.startswith('|')}

    # -- list --------------------------------------------------------------

    def test_list_shows_every_flow_with_its_lease(self):
        flow_uuid = self._create(instance_uuid=uuids.instance)
        persistence.claim(self.context, flow_uuid, 'conductor-1', 60)

        self.assertEqual({flow_uuid}, self._listed())
        output = self.output.getvalue()
        for header in ('UUID', 'Kind', 'Version', 'State', 'Instance',
                       'Owner', 'Lease Expires', 'Updated'):
            self.assertIn(header, output)
        for value in ('test', 'PENDING', uuids.instance, 'conductor-1'):
            self.assertIn(value, output)

    def test_list_filters(self):
        build = self._create(kind='build', instance_uuid=uuids.instance)
        other = self._create(kind='other')
        owned = self._create()
        persistence.claim(self.context, owned, 'conductor-2', 60)
        done = self._create()
        self._finish(done, states.SUCCESS, 0)

        self.assertEqual({build, other, owned, done}, self._listed())
        self.assertEqual({build}, self._listed(kind='build'))
        self.assertEqual({build},
                         self._listed(instance_uuid=uuids.instance))
        self.assertEqual({owned}, self._listed(owner='conductor-2'))
        self.assertEqual({done}, self._listed(state=states.SUCCESS))
        self.assertEqual(set(), self._listed(kind='build',
                                             state=states.SUCCESS))

    def test_list_stuck_flows(self):
        live = self._create()
        persistence.claim(self.context, live, 'conductor-1', 60)
        expired = self._create()
        persistence.claim(self.context, expired, 'conductor-1', 60)
        helpers.expire_lease(self.context, expired)
        done = self._create()
        self._finish(done, states.REVERTED, 0)
        helpers.expire_lease(self.context, done)

        self.assertEqual({expired}, self._listed(stuck=True))

    def test_list_limit_keeps_the_most_recent_flows(self):
        old, middle, new = [self._create() for _ in range(3)]

        self.assertEqual({middle, new}, self._listed(limit=2))
        output = self.output.getvalue()
        self.assertLess(output.index(middle), output.index(new))
        self.assertIn('Only the 2 most recent flows are listed; older ones '
                      'match too.', output)
        # Filters apply before the limit.
        self._finish(new, states.SUCCESS, 0)
        self.assertEqual({old, middle},
                         self._listed(state=states.PENDING, limit=2))
        self.assertNotIn('older ones', self.output.getvalue())
        self.assertEqual({old, middle, new}, self._listed(limit=3))
        self.assertNotIn('older ones', self.output.getvalue())

    def test_list_invalid_limit(self):
        self.assertEqual(2, self.commands.list(limit=0))
        self.assertIn('Invalid limit 0', self.output.getvalue())

    def test_list_invalid_state(self):
        self.assertEqual(2, self.commands.list(state='DONE'))
        self.assertIn('Invalid state DONE', self.output.getvalue())

    # -- show --------------------------------------------------------------

    def test_show_flow_with_its_stages_and_failures(self):
        flow = self._flow(Step('a', self.journal),
                          Step('b', self.journal, fail=True))
        flow_uuid = persistence.create_flow(self.context, flow.kind, 1, {})
        self.assertEqual(states.REVERTED, self._run(flow_uuid))

        self.assertEqual(0, self.commands.show(flow_uuid))
        output = self.output.getvalue()
        for value in (flow_uuid, 'REVERTED', 'ValueError: b broke',
                      'conductor-1', 'Position', 'Duration', 'Failure'):
            self.assertIn(value, output)
        rows = [[cell.strip() for cell in line.split('|')[1:-1]]
                for line in output.splitlines()
                if line.startswith('| 0 ') or line.startswith('| 1 ')]
        self.assertEqual(
            [['0', 'a', '1', 'REVERTED', ''], ['1', 'b', '1', 'REVERTED',
                                               'ValueError: b broke']],
            [[r[0], r[1], r[2], r[3], r[7]] for r in rows])
        # Every stage ended, so each has a duration.
        self.assertTrue(all(r[6].endswith('s') for r in rows), rows)
        self.assertNotIn('Traceback', output)

    def test_show_verbose_prints_tracebacks(self):
        flow = self._flow(Step('a', self.journal, fail=True))
        flow_uuid = persistence.create_flow(self.context, flow.kind, 1, {})
        self._run(flow_uuid)

        self.assertEqual(0, self.commands.show(flow_uuid, verbose=True))
        self.assertIn('Traceback', self.output.getvalue())

    def test_show_every_flow_of_an_instance(self):
        first = self._create(instance_uuid=uuids.instance)
        second = self._create(instance_uuid=uuids.instance)
        self._create(instance_uuid=uuids.other)

        self.assertEqual(0, self.commands.show(uuids.instance))
        output = self.output.getvalue()
        self.assertIn(first, output)
        self.assertIn(second, output)
        self.assertLess(output.index(first), output.index(second))
        self.assertNotIn(uuids.other, output)

    def test_show_unknown_uuid(self):
        self.assertEqual(2, self.commands.show(uuids.nothing))
        self.assertIn(uuids.nothing, self.output.getvalue())

    # -- resume ------------------------------------------------------------

    def test_resume_fences_out_a_live_owner(self):
        flow = self._flow(Step('a', self.journal))
        flow_uuid = persistence.create_flow(self.context, flow.kind, 1, {})
        fence = persistence.claim(self.context, flow_uuid, 'hung', 60).fence
        self.assertEqual([], persistence.claimable(self.context, 10))

        self.assertEqual(0, self.commands.resume(flow_uuid))

        self.assertIn('will be resumed', self.output.getvalue())
        self.assertEqual([flow_uuid],
                         persistence.claimable(self.context, 10))
        self.assertRaises(exception.OrchestrationLeaseLost,
                          persistence.renew, self.context, fence, 60)
        self.assertEqual(states.SUCCESS, self._run(flow_uuid))

    def test_resume_retries_the_rollback_of_an_error_flow(self):
        a = Step('a', self.journal, fail_revert=True)
        flow = self._flow(a, Step('b', self.journal, fail=True))
        flow_uuid = persistence.create_flow(self.context, flow.kind, 1, {})
        self.assertEqual(states.ERROR, self._run(flow_uuid))
        del self.journal[:]

        self.assertEqual(0, self.commands.resume(flow_uuid))

        row = self._load(flow_uuid)
        self.assertEqual((states.REVERTING, None),
                         (row.state, row.owner))
        self.assertEqual([flow_uuid],
                         persistence.claimable(self.context, 10))
        self.assertEqual(states.REVERTED, self._run(flow_uuid))
        # Only the revert that failed runs again.
        self.assertEqual([('revert', 'a')], self.journal)

    def test_resume_finished_flow(self):
        flow_uuid = self._create()
        self._finish(flow_uuid, states.SUCCESS, 0)
        self.assertEqual(3, self.commands.resume(flow_uuid))
        self.assertIn('is SUCCESS', self.output.getvalue())

    def test_resume_unknown_flow(self):
        self.assertEqual(2, self.commands.resume(uuids.nothing))
        self.assertIn('could not be found', self.output.getvalue())

    # -- abort -------------------------------------------------------------

    def test_abort_reverts_the_flow(self):
        flow = self._flow(Step('a', self.journal))
        flow_uuid = persistence.create_flow(self.context, flow.kind, 1, {})

        self.assertEqual(0, self.commands.abort(flow_uuid))

        self.assertIn('will be reverted', self.output.getvalue())
        self.assertEqual(states.REVERTED, self._run(flow_uuid))
        self.assertEqual([], self.journal)
        self.assertEqual('aborted by operator', persistence.decode(
            self._load(flow_uuid).failure)['message'])

    def test_abort_flow_not_pending_or_running(self):
        flow_uuid = self._create()
        self._finish(flow_uuid, states.ERROR, 0)
        self.assertEqual(3, self.commands.abort(flow_uuid))
        self.assertIn('is ERROR', self.output.getvalue())

    def test_abort_legacy_build_flow_is_refused(self):
        # Version 1 hands the instance to a host that cannot undo its
        # build.
        task.register(build_flows.BUILD_INSTANCE_V1)
        flow_uuid = persistence.create_flow(
            self.context, build_flows.INSTANCE_KIND, build_flows.VERSION, {})
        self.assertEqual(3, self.commands.abort(flow_uuid))
        self.assertIn('cannot be aborted', self.output.getvalue())
        self.assertEqual(states.PENDING, self._load(flow_uuid).state)

    def test_abort_build_flow_once_started(self):
        # Until its first stage starts, nothing would undo the build its
        # BuildRequest shows.
        task.register(build_flows.BUILD_INSTANCE)
        flow_uuid = persistence.create_flow(
            self.context, build_flows.INSTANCE_KIND,
            build_flows.INSTANCE_VERSION, {})
        self.assertEqual(3, self.commands.abort(flow_uuid))
        self.assertIn('abort it once it runs', self.output.getvalue())
        self.assertEqual(states.PENDING, self._load(flow_uuid).state)

        fence = persistence.claim(self.context, flow_uuid, 'one', 60).fence
        persistence.transition(self.context, fence, 60, start={
            'position': 0, 'attempt': 1, 'name': 'create-instance',
            'state': states.STAGE_RUNNING}, forward=True)
        self.assertEqual(0, self.commands.abort(flow_uuid))
        self.assertEqual(states.REVERTING, self._load(flow_uuid).state)

    def test_abort_unknown_flow(self):
        self.assertEqual(2, self.commands.abort(uuids.nothing))

    # -- purge -------------------------------------------------------------

    def test_purge_deletes_old_finished_flows_and_their_stages(self):
        old = [self._create() for _ in range(3)]
        for flow_uuid, state in zip(old, states.FINISHED):
            self._finish(flow_uuid, state, 10)
        recent = self._create()
        self._finish(recent, states.SUCCESS, 2)
        active = self._create()
        persistence.claim(self.context, active, 'conductor-1', 60)
        helpers.set_column(self.context, api_models.OrchestrationFlow,
                           self._load(active).id,
                           updated_at=timeutils.utcnow() -
                           datetime.timedelta(days=10))
        self.useFixture(fixtures.MockPatchObject(
            manage.OrchestrationCommands, '_PURGE_BATCH', 2))

        self.assertEqual(0, self.commands.purge(before='5'))

        self.assertIn('Purged 3 finished flows', self.output.getvalue())
        self.assertEqual({recent, active}, {
            f.uuid for f in persistence.list_flows(self.context)})
        self.assertEqual([1], [len(persistence.load(self.context, f)[1])
                               for f in (recent,)])
        for flow_uuid in old:
            self.assertRaises(exception.OrchestrationFlowNotFound,
                              persistence.load, self.context, flow_uuid)

    def test_purge_zero_days_purges_every_finished_flow(self):
        flow_uuid = self._create()
        self._finish(flow_uuid, states.SUCCESS, 0)
        self.assertEqual(0, self.commands.purge(before='0'))
        self.assertEqual([], persistence.list_flows(self.context))

    def test_purge_dry_run_deletes_nothing(self):
        flow_uuid = self._create()
        self._finish(flow_uuid, states.SUCCESS, 10)

        self.assertEqual(0, self.commands.purge(before='5', dry_run=True))

        self.assertIn('1 finished flows would be purged',
                      self.output.getvalue())
        self.assertEqual(states.SUCCESS, self._load(flow_uuid).state)

    def test_purge_nothing_to_purge(self):
        flow_uuid = self._create()
        self._finish(flow_uuid, states.SUCCESS, 2)
        self.assertEqual(3, self.commands.purge(before='5'))
        self.assertEqual(3, self.commands.purge(before='5', dry_run=True))

    def test_purge_invalid_before(self):
        for before in (None, '-1', 'yesterday'):
            self.assertEqual(2, self.commands.purge(before=before))
        self.assertIn('--before must be a number of days',
                      self.output.getvalue())


class OrchestrationCommandLineTestCase(test.NoDBTestCase):
    """The commands' arguments reach them under their parameter names."""

    def _parse(self, *argv):
        parser = argparse.ArgumentParser()
        cmd_common.add_command_parsers(
            parser.add_subparsers(dest='category'),
            categories={'orchestration': manage.OrchestrationCommands})
        parsed = parser.parse_args(argv)
        kwargs = {k: getattr(parsed, 'action_kwarg_' + k)
                  for k in parsed.action_kwargs}
        self.assertEqual([], cmd_common.validate_args(
            parsed.action_fn, **kwargs))
        return parsed.action_fn.__name__, kwargs

    def test_category_is_registered(self):
        self.assertIs(manage.OrchestrationCommands,
                      manage.CATEGORIES['orchestration'])

    def test_arguments(self):
        self.assertEqual(
            ('list', {'state': 'RUNNING', 'kind': 'build',
                      'instance_uuid': uuids.instance, 'owner': 'c1',
                      'stuck': True, 'limit': 20}),
            self._parse('orchestration', 'list', '--state', 'RUNNING',
                        '--kind', 'build', '--instance', uuids.instance,
                        '--owner', 'c1', '--stuck', '--limit', '20'))
        self.assertEqual(
            ('show', {'uuid': uuids.flow, 'verbose': True}),
            self._parse('orchestration', 'show', uuids.flow, '--verbose'))
        self.assertEqual(('resume', {'flow_uuid': uuids.flow}),
                         self._parse('orchestration', 'resume', uuids.flow))
        self.assertEqual(('abort', {'flow_uuid': uuids.flow}),
                         self._parse('orchestration', 'abort', uuids.flow))
        self.assertEqual(
            ('purge', {'before': '30', 'dry_run': True}),
            self._parse('orchestration', 'purge', '--before', '30',
                        '--dry-run'))
