"""The test selection, how it runs, and how it compares to the baseline."""

import collections
import csv
import io
import os
import subprocess
import time

from harness import env
from harness import toxini
from harness import tree

BASELINE = tree.REPO / 'tools' / 'baseline'
KNOWN_FAILURES = BASELINE / 'known-failures.txt'
LOGS = tree.WORK / 'logs'

NOVA_UNIT = (r'^nova\.tests\.unit\.(conductor\.|compute\.test_compute_mgr\.'
             r'|objects\.test_objects\.|db\.)')
# Functional regression tests about build, reschedule, cell0 burial and
# delete-while-booting, picked by reading each test's docstring.
BUILD_REGRESSIONS = (
    '1620248',  # build_instances no-op conductor, server stays BUILD
    '1670627',  # quota usage of an instance buried in cell0
    '1671648',  # reschedule after a build failure keeps the request spec
    '1678326',  # delete while booting commits quota once
    '1719730',  # affinity server group on reschedule
    '1741125',  # alternates: retries in build and resize
    '1781286',  # reschedule: AZ up-call from the cell conductor
    '1784353',  # reschedule with volumes attached
    '1806064',  # boot from volume buried in cell0 frees its volumes
    '1831771',  # delete during create
    '1837955',  # allocation failure on an alternate host
    '1852458',  # "create" instance action for servers buried in cell0
    '1899649',  # volume attachments after a failed schedule or build
    '1914777',  # delete-while-booting races between api and conductor
    '2088066',  # delete while scheduling with BDMs
)
BUILD_FUNCTIONAL = (r'^nova\.tests\.functional\.regressions\.test_bug_(%s)\.'
                    % '|'.join(BUILD_REGRESSIONS))
# A compute restarting during a build (bug 1833581).
INIT_HOST_FUNCTIONAL = r'^nova\.tests\.functional\.compute\.test_init_host\.'
# The REST API and versioned notifications as nova's samples pin them
# (most of these tests boot a server first).
SAMPLES_FUNCTIONAL = (r'^nova\.tests\.functional\.'
                      r'(api_sample_tests|notification_sample_tests)\.')
NOVA_FUNCTIONAL = (r'^nova\.tests\.functional\.test_servers\.',
                   BUILD_FUNCTIONAL, INIT_HOST_FUNCTIONAL,
                   # Requests of many servers with hundreds of volumes.
                   r'^nova\.tests\.functional\.test_boot_from_volume\.',
                   SAMPLES_FUNCTIONAL)
CONDUCTOR_UNIT = r'^nova\.tests\.unit\.conductor\.'

# Each suite is one tox environment run with FILTERS as its posargs. The
# series adds an unfiltered stestr run of nova/tests/orchestration/ to each
# of these environments, so every suite runs all orchestration tests too.
Suite = collections.namedtuple('Suite', 'name tox_env filters')
SUITES = (
    Suite('unit', 'py3', (NOVA_UNIT,)),
    Suite('functional', 'functional', NOVA_FUNCTIONAL),
    Suite('unit-threading', 'py313-threading', (CONDUCTOR_UNIT,)),
    Suite('functional-threading', 'functional-py313-threading',
          (BUILD_FUNCTIONAL, INIT_HOST_FUNCTIONAL)),
)
# Warnings a failed docs build quotes in the summary; the log has them all.
_MAX_QUOTED = 20
# subunit2csv statuses; any other than these (failure, uxsuccess, ...)
# counts as failed.
PASS = ('success', 'xfail')


def tox_environ(nova_tree, venv, tox_env_name):
    """The process environment tox would give tox_env_name's commands."""
    tox_env = toxini.ToxEnv(nova_tree / 'tox.ini', tox_env_name)
    environ = dict(os.environ)
    environ.update(tox_env.setenv())
    environ.update({
        'LC_ALL': 'C.UTF-8', 'LANGUAGE': 'C.UTF-8',
        'VIRTUAL_ENV': str(venv),
        'PATH': '%s:%s' % (venv / 'bin', os.environ['PATH']),
    })
    return environ


def _results(nova_tree, environ):
    """Map test id -> status of the last stestr run in nova_tree."""
    stream = subprocess.run(['stestr', 'last', '--subunit'], cwd=nova_tree,
                            env=environ, stdout=subprocess.PIPE).stdout
    # subunit2csv exits 1 when the stream holds a failure: that is data.
    rows = subprocess.run(['subunit2csv'], input=stream, env=environ,
                          stdout=subprocess.PIPE).stdout
    results = {}
    for row in csv.DictReader(io.StringIO(rows.decode())):
        results[row['test']] = row['status']
    return results


def _run_logged(argv, nova_tree, environ, log):
    log.write('$ %s\n' % ' '.join(argv))
    log.flush()
    return subprocess.run(argv, cwd=nova_tree, env=environ, stdout=log,
                          stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL).returncode


def run_suite(suite, nova_tree=tree.TREE, venv=env.VENV):
    """Run suite like tox would; return (results, error text or None)."""
    tox_env = toxini.ToxEnv(nova_tree / 'tox.ini', suite.tox_env)
    environ = tox_environ(nova_tree, venv, suite.tox_env)
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / ('%s-%s.log' % (nova_tree.name, suite.name))
    error = None
    with open(log_path, 'w') as log:
        for argv in tox_env.commands(list(suite.filters)):
            rc = _run_logged(argv, nova_tree, environ, log)
            if rc and error is None:
                error = '%r exited %d (log: %s)' % (
                    ' '.join(argv), rc, log_path)
    return _results(nova_tree, environ), error


def docs(nova_tree=tree.TREE, venv=env.VENV):
    """Build the docs as ``tox -e docs`` does; return a problem or None.

    nova's docs environment runs sphinx-build with -W --keep-going, so any
    warning fails the build, then checks the redirects with whereto. The
    first failing command ends the build; the problem quotes its warnings.
    """
    # Trees materialised before this step existed do not ignore yet the
    # samples the build writes into doc/source.
    tree.write_excludes(nova_tree)
    tox_env = toxini.ToxEnv(nova_tree / 'tox.ini', 'docs')
    environ = tox_environ(nova_tree, venv, 'docs')
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / ('%s-docs.log' % nova_tree.name)
    with open(log_path, 'w') as log:
        for argv in tox_env.commands([]):
            rc = _run_logged(argv, nova_tree, environ, log)
            if rc:
                break
        else:
            return None
    quoted = [line for line in log_path.read_text().splitlines()
              if ('WARNING:' in line or 'ERROR:' in line) and
              not line.startswith('$ ')]
    if len(quoted) > _MAX_QUOTED:
        quoted[_MAX_QUOTED:] = ['... %d more in the log' %
                                (len(quoted) - _MAX_QUOTED)]
    return '\n'.join(['%r exited %d (log: %s)' % (' '.join(argv), rc,
                                                  log_path)] + quoted)


def load_baseline(suite_name):
    path = BASELINE / ('%s.txt' % suite_name)
    if not path.exists():
        return {}
    results = {}
    for line in path.read_text().splitlines():
        status, _, test_id = line.partition(' ')
        results[test_id] = status
    return results


def write_baseline(suite_name, results):
    BASELINE.mkdir(parents=True, exist_ok=True)
    path = BASELINE / ('%s.txt' % suite_name)
    path.write_text(''.join('%s %s\n' % (results[t], t)
                            for t in sorted(results)))


def known_failures():
    """Test id -> reason, from tools/baseline/known-failures.txt."""
    known = {}
    if KNOWN_FAILURES.exists():
        for line in KNOWN_FAILURES.read_text().splitlines():
            if line.strip() and not line.startswith('#'):
                test_id, _, reason = line.partition(' ')
                known[test_id] = reason.strip()
    return known


class Report(object):
    """Collects checks and suite results; prints the closing summary."""

    def __init__(self):
        self.passed = self.failed = self.skipped = 0
        self.known = []
        self.problems = []
        self.timings = []
        self.counts = []

    def check(self, name, problem, seconds=None):
        if seconds is not None:
            self.timings.append((name, seconds))
        if problem:
            self.failed += 1
            self.problems.append('%s: %s' % (name, problem))
            print('FAIL %s\n%s' % (name, problem), flush=True)
        else:
            self.passed += 1
            print('ok   %s' % name, flush=True)

    def suite(self, suite, results, error, seconds, baseline, known):
        self.timings.append(('suite %s' % suite.name, seconds))
        counter = collections.Counter(results.values())
        passed = sum(counter[s] for s in PASS)
        failing = sorted(t for t, s in results.items()
                         if s not in PASS and s != 'skip')
        self.counts.append((suite.name, len(results), passed,
                            counter['skip'], len(failing)))
        self.passed += passed
        self.skipped += counter['skip']
        for test_id in failing:
            if test_id in known:
                self.known.append('%s (%s)' % (test_id, known[test_id]))
                continue
            self.failed += 1
            kind = ('REGRESSION (passes on the base)'
                    if baseline.get(test_id) in PASS else 'failure')
            self.problems.append('%s: %s %s' % (suite.name, kind, test_id))
        if error and not failing:
            self.failed += 1
            self.problems.append('%s: %s' % (suite.name, error))
        print('%s %s: %d tests, %d passed, %d skipped, %d failed (%.0f s)' % (
            'ok  ' if not (failing or error) else 'FAIL', suite.name,
            len(results), passed, counter['skip'], len(failing), seconds),
            flush=True)

    def summary(self):
        print('\n== wall time')
        for name, seconds in self.timings:
            print('  %-32s %7.1f s' % (name, seconds))
        print('== tests per suite (run, passed, skipped, failed)')
        for row in self.counts:
            print('  %-32s %5d %5d %5d %5d' % row)
        if self.known:
            print('== known failures on the base (not counted as failed)')
            for line in self.known:
                print('  ' + line)
        if self.problems:
            print('== problems')
            for line in self.problems:
                print('  ' + line)
        print('%d passed, %d failed, %d skipped' % (
            self.passed, self.failed, self.skipped))
        return 1 if self.failed else 0


def db_server_counts(results):
    """(server, ran, skipped) for the opportunistic MySQL/PostgreSQL tests."""
    rows = []
    for server in ('MySQL', 'PostgreSQL'):
        ids = [t for t in results if server in t.split('.')[-2]]
        ran = sum(1 for t in ids if results[t] not in ('skip',))
        rows.append((server, ran, len(ids) - ran))
    return rows


def flake8(nova_tree=tree.TREE, venv=env.VENV):
    """Run nova's flake8 + hacking on the .py files the series touches."""
    files = tree.git(nova_tree, 'diff', '--name-only', '--diff-filter=d',
                     tree.BASE_TAG, 'HEAD', '--', '*.py').stdout.split()
    if not files:
        return None
    proc = subprocess.run([str(venv / 'bin' / 'flake8')] + files,
                          cwd=nova_tree, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    return proc.stdout.strip() or (
        'flake8 exited %d' % proc.returncode if proc.returncode else None)


def timed(func, *args, **kwargs):
    start = time.time()
    value = func(*args, **kwargs)
    return value, time.time() - start


def gate_coverage(nova_tree, ran_ids):
    """Every orchestration test module must have run in some suite."""
    missing = []
    top = nova_tree / 'nova' / 'tests' / 'orchestration'
    for path in sorted(top.rglob('test_*.py')) if top.exists() else []:
        module = '.'.join(path.relative_to(nova_tree).with_suffix('').parts)
        if not any(t.startswith(module + '.') for t in ran_ids):
            missing.append(module)
    return ('never run by the tox environments: %s' % ', '.join(missing)
            if missing else None)


def is_ci():
    return os.environ.get('CI', '').lower() in ('1', 'true', 'yes')
