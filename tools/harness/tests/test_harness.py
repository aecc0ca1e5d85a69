"""Self-tests of the harness logic that decides what passed."""

import contextlib
import io
import pathlib
import tempfile
import unittest
from unittest import mock

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


if __name__ == '__main__':
    unittest.main()
