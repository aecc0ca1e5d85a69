"""The README test command and its slow modes."""

import shutil
import subprocess
import sys
import time

from harness import cloud
from harness import env
from harness import suites
from harness import tree

BASE_TREE = tree.WORK / 'nova-base'
BASE_VENV = tree.WORK / 'venv-base'
FULL_SUITES = (
    suites.Suite('full-unit', 'py3', ()),
    suites.Suite('full-functional', 'functional', ()),
)


def _setup(report):
    _, seconds = suites.timed(env.setup)
    report.timings.append(('setup (packages, databases, venv)', seconds))


def _run_suites(report, selection, nova_tree=tree.TREE, venv=env.VENV):
    known = suites.known_failures()
    all_results = {}
    for suite in selection:
        print('...  %s (tox -e %s)' % (suite.name, suite.tox_env),
              flush=True)
        (results, error), seconds = suites.timed(
            suites.run_suite, suite, nova_tree, venv)
        report.suite(suite, results, error, seconds,
                     suites.load_baseline(suite.name), known)
        all_results.update(results)
    return all_results


def _self_test():
    """Run the harness's own tests; return their output if they fail."""
    proc = subprocess.run(
        [sys.executable, '-m', 'unittest', '-q', 'harness.tests.test_harness'],
        cwd=tree.REPO / 'tools', stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    return proc.stdout if proc.returncode else None


CLOUD_REAL_COUNT = 4


def _cloud_real():
    """tools/cloud --real on a small batch.

    Returns the end of its output if it fails (all of it is in
    .work/logs/cloud-real.log).
    """
    log = tree.WORK / 'logs' / 'cloud-real.log'
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cloud.command(True, CLOUD_REAL_COUNT),
                          cwd=tree.TREE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    log.write_text(proc.stdout)
    if proc.returncode == 0:
        return None
    return '\n'.join(proc.stdout.splitlines()[-15:] + ['(see %s)' % log])


def _chaos_quick():
    """tools/chaos --quick: one trial per point of chaos.QUICK.

    Returns the end of its output if it fails (all of it is in
    .work/logs/chaos-quick.log).
    """
    log = tree.WORK / 'logs' / 'chaos-quick.log'
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cloud.chaos_command(quick=True), cwd=tree.TREE,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    log.write_text(proc.stdout)
    lines = proc.stdout.splitlines()
    print('     %s' % (lines[-1] if lines else '(no output)'), flush=True)
    if proc.returncode == 0:
        return None
    return '\n'.join(lines[-15:] + ['(see %s)' % log])


def default():
    """Everything the README test command promises, in CI's time box."""
    report = suites.Report()
    report.check('harness self-tests', _self_test())
    _setup(report)
    checks, seconds = suites.timed(tree.check_series)
    report.timings.append(('series checks', seconds))
    for name, problem in checks:
        report.check(name, problem)
    problem, seconds = suites.timed(suites.flake8)
    report.check('flake8 + hacking on the files the series touches',
                 problem, seconds)
    problem, seconds = suites.timed(suites.docs)
    report.check('docs: sphinx-build -W, whereto (tox -e docs)', problem,
                 seconds)
    results = _run_suites(report, suites.SUITES)
    report.check('tox unit/functional environments run every '
                 'orchestration test module',
                 suites.gate_coverage(tree.TREE, results))
    for server, ran, skipped in suites.db_server_counts(results):
        print('     %s opportunistic DB tests: %d ran, %d skipped' % (
            server, ran, skipped))
        report.check('DB tests ran on a real %s server' % server,
                     ('%d skipped' % skipped) if skipped or not ran
                     else None)
    problem, seconds = suites.timed(_cloud_real)
    report.check('tools/cloud --real: %d servers, a conductor SIGKILLed '
                 'mid-batch, a compute restarted mid-build, no leak' %
                 CLOUD_REAL_COUNT, problem, seconds)
    problem, seconds = suites.timed(_chaos_quick)
    report.check('tools/chaos --quick: conductors and computes SIGKILLed '
                 'in stages and reverts, nothing stuck, leaked, duplicated '
                 'or spawned twice', problem, seconds)
    return report.summary()


def _base_env():
    tree.materialise(BASE_TREE, patches=[])
    env.ensure_venv(BASE_TREE, BASE_VENV)


def baseline(full=False):
    """Run the selection on the unpatched base and record the results."""
    env.ensure_system_packages()
    env.provision_databases()
    _base_env()
    report = suites.Report()
    selection = FULL_SUITES if full else suites.SUITES
    for suite in selection:
        print('...  %s on the base' % suite.name, flush=True)
        (results, error), seconds = suites.timed(
            suites.run_suite, suite, BASE_TREE, BASE_VENV)
        suites.write_baseline(suite.name, results)
        report.suite(suite, results, error, seconds, {}, {})
    report.summary()
    return 0


def full():
    """Slow mode: nova's entire unit and functional suites."""
    report = suites.Report()
    _setup(report)
    _run_suites(report, FULL_SUITES)
    return report.summary()


def _touched_test_modules(nova_tree, commit):
    files = tree.git(nova_tree, 'diff-tree', '--no-commit-id', '--name-only',
                     '-r', '--diff-filter=d', commit).stdout.split()
    modules = set()
    for path in files:
        if not path.endswith('.py') or not path.startswith('nova/'):
            continue
        parts = path[:-3].split('/')
        if parts[1] == 'tests':
            if parts[-1].startswith('test_'):
                modules.add('.'.join(parts))
            continue
        unit = ['nova', 'tests', 'unit'] + parts[1:-1] + ['test_' + parts[-1]]
        if (nova_tree / ('/'.join(unit) + '.py')).exists():
            modules.add('.'.join(unit))
    return sorted(modules), [f for f in files if f.endswith('.py')]


def _functional(module):
    return '.functional.' in module + '.'


def per_commit(first=1):
    """Slow mode: what nova's gate would vote on, for each commit alone.

    For each commit from patch first on: flake8 with nova's hacking checks
    on the Python files it touches, the unit and functional test modules
    of the code it touches (and the test modules it touches), and every
    test under nova/tests/orchestration/ as the tree has them then.
    """
    report = suites.Report()
    _setup(report)
    scratch = tree.WORK / 'per-commit'
    tree.materialise(scratch)
    commits = tree.git(scratch, 'rev-list', '--reverse',
                       '%s..HEAD' % tree.BASE_TAG).stdout.split()
    for number, commit in enumerate(commits[first - 1:], first):
        subject = '%02d %s' % (number, tree.git(
            scratch, 'log', '-1', '--format=%s', commit).stdout.strip())
        tree.git(scratch, 'checkout', '-q', commit)
        modules, files = _touched_test_modules(scratch, commit)
        if files:
            # flake8 without file arguments would lint the whole tree.
            start = time.time()
            lint = subprocess.run(
                [str(env.VENV / 'bin' / 'flake8')] + files, cwd=scratch,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            report.check('%s: flake8' % subject,
                         lint.stdout.strip() or None, time.time() - start)
        # The orchestration directories run whole below.
        modules = [m for m in modules
                   if not m.startswith('nova.tests.orchestration.')]
        # Functional modules get their tox environment and a process of
        # their own: nova's functional fixtures leave state behind that
        # unit tests of the same process trip over.
        for kind, tox_env, group in (
                ('unit', 'py3', [m for m in modules if not _functional(m)]),
                ('functional', 'functional',
                 [m for m in modules if _functional(m)])):
            if not group:
                continue
            start = time.time()
            proc = _tests(scratch, tox_env, ['-m', 'testtools.run'] + group)
            report.check('%s: %s tests of %d touched modules' % (
                subject, kind, len(group)),
                None if proc.returncode == 0 else proc.stdout[-4000:],
                time.time() - start)
        for kind, tox_env in (('unit', 'py3'), ('functional', 'functional')):
            if not (scratch / 'nova' / 'tests' / 'orchestration' /
                    kind).exists():
                continue
            start = time.time()
            proc = _tests(scratch, tox_env, [
                '-m', 'stestr', '--test-path',
                './nova/tests/orchestration/' + kind, 'run',
                '--concurrency', '2'])
            report.check('%s: nova/tests/orchestration/%s' % (subject, kind),
                         None if proc.returncode == 0 else
                         proc.stdout[-4000:], time.time() - start)
    shutil.rmtree(scratch)
    return report.summary()


def _tests(scratch, tox_env, args):
    """Run python args in scratch with tox_env's setenv, scratch first."""
    environ = suites.tox_environ(scratch, env.VENV, tox_env)
    environ['PYTHONPATH'] = str(scratch)
    return subprocess.run([str(env.VENV / 'bin' / 'python')] + args,
                          cwd=scratch, env=environ, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
