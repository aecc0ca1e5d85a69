"""Self-tests of the harness logic that decides what passed."""

import contextlib
import io
import json
import pathlib
import tempfile
import unittest
from unittest import mock

from harness import chaos_points
from harness import suites
from harness import toxini
from harness import tree

TOX_INI = """
[testenv]
setenv =
  A=1
  # a comment
  B=2
commands =
  stestr run {posargs}
  stestr --test-path=./x run --combine
  stestr slowest

[testenv:{unit,py3}]
setenv =
  {[testenv]setenv}
  C=3

[testenv:functional{,-py311}]
commands =
  stestr --test-path=./nova/tests/functional run {posargs}
"""


class ToxIniTest(unittest.TestCase):

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.path = pathlib.Path(tmp.name) / 'tox.ini'
        self.path.write_text(TOX_INI)

    def test_factor_names_and_inherited_setenv(self):
        env = toxini.ToxEnv(self.path, 'py3')
        self.assertEqual({'A': '1', 'B': '2', 'C': '3'}, env.setenv())
        # commands come from [testenv] when the env has none
        self.assertEqual(
            [['stestr', 'run', 'f1', 'f2'],
             ['stestr', '--test-path=./x', 'run', '--combine'],
             ['stestr', 'slowest']], env.commands(['f1', 'f2']))

    def test_empty_factor(self):
        env = toxini.ToxEnv(self.path, 'functional')
        self.assertEqual([['stestr', '--test-path=./nova/tests/functional',
                           'run']], env.commands([]))
        self.assertEqual(
            'testenv:functional{,-py311}',
            toxini.ToxEnv(self.path, 'functional-py311').section)

    def test_unknown_env(self):
        self.assertRaises(KeyError, toxini.ToxEnv, self.path, 'pep8')


class ReportTest(unittest.TestCase):

    def _suite(self, results, baseline=None, known=None, error=None):
        report = suites.Report()
        with contextlib.redirect_stdout(io.StringIO()):
            report.suite(suites.Suite('unit', 'py3', ()), results, error,
                         1.0, baseline or {}, known or {})
        return report

    def test_statuses(self):
        report = self._suite({'a': 'success', 'b': 'xfail', 'c': 'skip',
                              'd': 'failure', 'e': 'uxsuccess',
                              'f': 'fail'})
        self.assertEqual((2, 3, 1),
                         (report.passed, report.failed, report.skipped))

    def test_regression_and_known_failure(self):
        report = self._suite({'a': 'failure', 'b': 'failure'},
                             baseline={'a': 'success', 'b': 'failure'},
                             known={'b': 'flaky here'})
        self.assertEqual(1, report.failed)
        self.assertIn('REGRESSION', report.problems[0])
        self.assertEqual(['b (flaky here)'], report.known)

    def test_command_error_without_failed_test_fails(self):
        report = self._suite({'a': 'success'}, error='stestr exited 1')
        self.assertEqual(1, report.failed)

    def test_summary_line(self):
        report = self._suite({'a': 'success', 'c': 'skip'})
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(0, report.summary())
        self.assertEqual('1 passed, 0 failed, 1 skipped',
                         out.getvalue().splitlines()[-1])

    def test_db_server_counts(self):
        rows = suites.db_server_counts({
            'm.TestWalkMySQL.test_a': 'success',
            'm.TestWalkPostgreSQL.test_a': 'skip',
            'm.TestWalkSQLite.test_a': 'success'})
        self.assertEqual([('MySQL', 1, 0), ('PostgreSQL', 0, 1)], rows)


DOCS_TOX_INI = """
[testenv:docs]
setenv =
  DOCS_VAR=1
commands =
  python3 -c "import os, sys; sys.exit(os.environ['DOCS_VAR'] != '1')"
  python3 -c "open('doc/source/_static/nova.conf.sample', 'w')"
  python3 -c "print('doc/source/a.rst:3: WARNING: {}'); exit({})"
  python3 -c "open('after', 'w')"
"""


class CommitMessageTest(unittest.TestCase):

    def test_good_message(self):
        self.assertEqual([], tree.message_problems(
            'compute: Do a thing', 'Because.\n\nGenerated-By: tool\n'))
        self.assertEqual([], tree.message_problems(
            'db: Add x', 'Why.\n\nImplements: blueprint a-b\n'
            'Assisted-By: tool model-1.2\n'
            'Signed-off-by: Jane Smith <jane@example.com>\n',
            signed_off=True))

    def test_long_summary_line(self):
        self.assertEqual(['summary line of 73 characters (at most 72)'],
                         tree.message_problems('a: S' + 's' * 69,
                                               'Why.\n\nGenerated-By: t'))
        self.assertEqual([], tree.message_problems(
            'a: S' + 's' * 68, 'Why.\n\nGenerated-By: t'))

    def test_area_prefix_and_period(self):
        self.assertEqual(['summary without an "area: Summary" prefix'],
                         tree.message_problems('Do a thing',
                                               'Why.\n\nGenerated-By: t'))
        self.assertEqual(['summary ends with a period'],
                         tree.message_problems('a: Do a thing.',
                                               'Why.\n\nGenerated-By: t'))

    def test_no_body_and_no_trailer(self):
        self.assertEqual(['no body saying why'],
                         tree.message_problems('a: S', 'Generated-By: t\n'))
        self.assertEqual(['no Generated-By: or Assisted-By: trailer'],
                         tree.message_problems('a: S', 'Why.\n'))

    def test_malformed_trailers(self):
        self.assertEqual(
            ["malformed trailer Signed-off-by: 'Jane'",
             "malformed trailer Implements: 'bp x'"],
            tree.message_problems(
                'a: S', 'Why.\n\nGenerated-By: t m\n'
                'Signed-off-by: Jane\nImplements: bp x\n'))
        self.assertEqual(["malformed trailer Generated-By: 'a b c'"],
                         tree.message_problems('a: S', 'Why.\n\n'
                                               'Generated-By: a b c\n'))

    def test_signed_off_required_when_asked(self):
        self.assertEqual(['no Signed-off-by trailer'], tree.message_problems(
            'a: S', 'Why.\n\nGenerated-By: t\n', signed_off=True))

    def test_body_width_ascii_and_trailer_placement(self):
        self.assertEqual(['body line of 73 characters (wrap at 72)'],
                         tree.message_problems(
                             'a: S', 'word ' * 14 + 'wor\n\nGenerated-By: t'))
        # An identifier too long to wrap may stand on a long line.
        self.assertEqual([], tree.message_problems(
            'a: S', 'see ' + 'x' * 70 + '\n\nGenerated-By: t'))
        self.assertEqual(['non-ASCII characters'], tree.message_problems(
            'a: S', 'Why \u2014 because.\n\nGenerated-By: t'))
        self.assertEqual(['trailer Generated-By outside the footer'],
                         tree.message_problems(
                             'a: S', 'Generated-By: t\n\nWhy.\n\n'
                             'Generated-By: t'))

    def test_series_in_a_tree(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp)
            tree.git(path, 'init', '-q')
            tree.git(path, 'commit', '-q', '--allow-empty', '-m', 'base')
            tree.git(path, 'tag', tree.BASE_TAG)
            tree.git(path, 'commit', '-q', '--allow-empty', '-m', 'a: Good',
                     '-m', 'Why.', '-m', 'Generated-By: t')
            tree.git(path, 'commit', '-q', '--allow-empty', '-m', 'a: Bad')
            self.assertEqual(
                ['patch 2 (a: Bad): no body saying why',
                 'patch 2 (a: Bad): no Generated-By: or Assisted-By: trailer'],
                tree.series_message_problems(path))


class SignedExportTest(unittest.TestCase):
    """--signoff makes the submitter the author and adds their DCO."""

    def test_sign_patch(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp)
            tree.git(path, 'init', '-q')
            (path / 'f').write_text('a\n')
            tree.git(path, 'add', 'f')
            tree.git(path, 'commit', '-q', '-m', 'base')
            tree.git(path, 'tag', tree.BASE_TAG)
            (path / 'f').write_text('b\n')
            tree.git(path, 'commit', '-q', '-am', 'a: Change f', '-m',
                     'Why.', '-m', 'Generated-By: t m')
            out = path / 'out'
            tree.format_patches(path, out)
            patch = out / tree.series_names(out)[0]
            tree._sign_patch(patch, 'Jane Smith <jane@example.com>')
            text = patch.read_text()
            self.assertIn('From: Jane Smith <jane@example.com>\n', text)
            self.assertIn('Generated-By: t m\n'
                          'Signed-off-by: Jane Smith <jane@example.com>\n'
                          '---\n', text)
            # The signed patch still applies with its message intact.
            tree.git(path, 'checkout', '-q', tree.BASE_TAG)
            tree.git(path, 'am', '-q', str(patch))
            self.assertEqual('Jane Smith', tree.git(
                path, 'log', '-1', '--format=%an').stdout.strip())
            body = tree.git(path, 'log', '-1', '--format=%b').stdout
            self.assertEqual([], tree.message_problems(
                'a: Change f', body, signed_off=True))

    def test_identity_is_checked(self):
        self.assertRaises(tree.HarnessError, tree.signed_export, 'Jane')


class DocsTest(unittest.TestCase):
    """The docs step runs tox -e docs and fails on the first failure."""

    def _docs(self, warning, rc):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        nova_tree = pathlib.Path(tmp.name) / 'nova'
        (nova_tree / 'doc' / 'source' / '_static').mkdir(parents=True)
        (nova_tree / 'tox.ini').write_text(
            DOCS_TOX_INI.replace('{}', warning, 1).replace('{}', str(rc)))
        tree.git(nova_tree, 'init', '-q')
        with mock.patch.object(suites, 'LOGS', pathlib.Path(tmp.name)):
            problem = suites.docs(nova_tree, pathlib.Path(tmp.name) / 'venv')
        return nova_tree, problem

    def test_success_leaves_the_tree_clean(self):
        nova_tree, problem = self._docs('', 0)
        self.assertIsNone(problem)
        self.assertTrue((nova_tree / 'after').exists())
        self.assertTrue(
            (nova_tree / 'doc/source/_static/nova.conf.sample').exists())
        # The samples the build writes are ignored.
        self.assertEqual(['?? after', '?? tox.ini'], tree.git(
            nova_tree, 'status', '--porcelain').stdout.split('\n')[:-1])

    def test_warning_fails_and_stops(self):
        nova_tree, problem = self._docs('undefined label', 1)
        lines = problem.splitlines()
        self.assertIn('exited 1', lines[0])
        self.assertEqual(['doc/source/a.rst:3: WARNING: undefined label'],
                         lines[1:])
        self.assertFalse((nova_tree / 'after').exists())


class CloudTimelineTest(unittest.TestCase):
    """The per-server timeline of tools/cloud, on rows as the DB has them."""

    @staticmethod
    def _flows(at):
        def stage(name, owner, start, end, state='SUCCESS'):
            return {'name': name, 'attempt': 1, 'state': state,
                    'owner': owner + ':42:abcd', 'started_at': at(start),
                    'finished_at': at(end) if end is not None else None}
        return {'s1': [
            {'kind': 'build-request', 'state': 'SUCCESS',
             'owner': 'c2:7:x', 'created_at': at(0), 'stages': [
                 stage('schedule', 'c1', 100, 6100),
                 stage('start-instance-flows', 'c2', 6100, 6300)]},
            {'kind': 'build-instance', 'state': 'SUCCESS',
             'owner': 'c2:7:x', 'created_at': at(6200), 'stages': [
                 stage('create-instance', 'c2', 6210, 6250)]},
        ]}

    def test_report(self):
        import datetime
        from harness import cloud_timeline

        t0 = datetime.datetime(2026, 1, 1)

        def at(ms):
            return t0 + datetime.timedelta(milliseconds=ms)

        servers = [{'id': 's1', 'name': 'one', 'status': 'ACTIVE',
                    'host': 'h1', 'builds': [{
                        'start_time': at(6400), 'finish_time': at(7000),
                        'result': 'Success', 'host': 'h1'}]}]
        lines = []
        totals = cloud_timeline.report(servers, self._flows(at),
                                       out=lines.append)
        text = '\n'.join(lines)
        # The stage c1 left RUNNING was re-run by c2, which wrote the
        # next stage.
        self.assertRegex(text, r'100 +6000 +schedule +SUCCESS +c1 > c2')
        self.assertRegex(text, r'6400 +600 +compute +build-and-run '
                               r'+Success +h1')
        self.assertRegex(text, r'stored -> ACTIVE +1 +7000 +7000')
        self.assertIn('taken over by another conductor: 1', text)
        self.assertEqual([('build-request', 'c1', 'c2')],
                         [(f['kind'], a, b)
                          for f, a, b in totals['takeovers']])

    def test_sqlite_text_timestamps(self):
        from harness import cloud_timeline

        def at(ms):
            return '2026-01-01 00:00:%06.3f' % (ms / 1000.0)

        lines = []
        cloud_timeline.report(
            [{'id': 's1', 'name': 'one', 'status': 'ACTIVE', 'host': 'h1'}],
            self._flows(at), out=lines.append)
        self.assertRegex('\n'.join(lines), r'6210 +40 +create-instance')


if __name__ == '__main__':
    unittest.main()


class ChaosPointsTest(unittest.TestCase):
    """The kill points fire once, where armed, in the armed service."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = pathlib.Path(tmp.name)
        for name, value in (('DIR', tmp.name), ('SERVICE', 'conductor')):
            patcher = mock.patch.object(chaos_points, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)
        patcher = mock.patch.object(chaos_points, '_kill')
        self.kill = patcher.start()
        self.addCleanup(patcher.stop)

    def arm(self, **arm):
        (self.dir / 'arm.json').write_text(json.dumps(arm))

    def hits(self):
        path = self.dir / 'hits.jsonl'
        return ([json.loads(line) for line in path.read_text().splitlines()]
                if path.exists() else [])

    def test_fires_once_at_the_armed_point(self):
        self.arm(service='conductor', stage='schedule', phase='after')
        chaos_points.point('schedule', 'before')
        chaos_points.point('choose-host', 'after')
        self.assertEqual([], self.hits())
        self.kill.assert_not_called()
        chaos_points.point('schedule', 'after')
        chaos_points.point('schedule', 'after')
        self.assertEqual(1, self.kill.call_count)
        self.assertEqual([('schedule', 'after')],
                         [(h['stage'], h['phase']) for h in self.hits()])
        self.assertFalse((self.dir / 'arm.json').exists())

    def test_other_service_does_not_fire(self):
        self.arm(service='compute', stage='build-on-host', phase='claimed')
        chaos_points.point('build-on-host', 'claimed')
        self.kill.assert_not_called()
        self.assertTrue((self.dir / 'arm.json').exists())

    def test_mid_arms_a_timer_when_the_stage_starts(self):
        self.arm(service='conductor', stage='schedule', phase='mid',
                 delay=0.25)
        with mock.patch('threading.Timer') as timer:
            chaos_points.point('schedule', 'after')
            timer.assert_not_called()
            chaos_points.point('schedule', 'before')
        timer.assert_called_once_with(0.25, chaos_points._kill)
        timer.return_value.start.assert_called_once_with()
        self.kill.assert_not_called()
        self.assertEqual(0.25, self.hits()[0]['delay'])

    def test_unarmed_or_unreadable_arm_does_nothing(self):
        chaos_points.point('schedule', 'before')
        (self.dir / 'arm.json').write_text('{not json')
        chaos_points.point('schedule', 'before')
        self.kill.assert_not_called()
