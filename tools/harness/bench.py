"""tools/bench: benchmarks of the patched nova (see README.md)."""

import hashlib
import os
import shutil
import subprocess

from harness import env
from harness import tree

BENCH_CONSTRAINTS = tree.REPO / 'tools' / 'bench-constraints.txt'
# TaskFlow and the few packages it needs beyond tools/constraints.txt,
# outside the test virtualenv so that its pins stay exactly as they are.
BENCH_SITE = tree.WORK / 'bench-site'
ENGINE_SCRIPT = tree.REPO / 'tools' / 'harness' / 'bench_engine.py'
BOOT_SCRIPT = tree.REPO / 'tools' / 'harness' / 'bench_boot.py'
# The unpatched base, for the boot benchmark.
BOOT_BASE = tree.WORK / 'bench-base'


def _python_env():
    return dict(os.environ, PYTHONPATH=str(BENCH_SITE),
                OS_NOVA_DISABLE_EVENTLET_PATCHING='True')


def ensure_bench_site():
    """Install the pinned benchmark-only packages into .work/bench-site."""
    digest = hashlib.sha256(BENCH_CONSTRAINTS.read_bytes())
    digest.update(env.venv_bin('python').encode())
    stamp = digest.hexdigest()
    stamp_file = BENCH_SITE / '.harness-stamp'
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return
    tree.log('installing %s into %s' % (BENCH_CONSTRAINTS.name,
                                        BENCH_SITE.name))
    shutil.rmtree(BENCH_SITE, ignore_errors=True)
    env.run([env.venv_bin('pip'), 'install', '-q', '--no-deps',
             '--only-binary=:all:', '--target', str(BENCH_SITE),
             '-r', str(BENCH_CONSTRAINTS)])
    check = env.run([env.venv_bin('python'), '-m', 'pip', 'check'],
                    env=_python_env(), check=False, text=True,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if check.returncode:
        raise tree.HarnessError(
            'the benchmark packages do not fit the test virtualenv:\n' +
            check.stdout)
    stamp_file.write_text(stamp)


def engine():
    """The orchestration engine benchmark; see bench_engine.py."""
    env.setup()
    ensure_bench_site()
    tree.log('running %s' % ENGINE_SCRIPT.name)
    proc = env.run([env.venv_bin('python'), str(ENGINE_SCRIPT)],
                   env=dict(_python_env(), BENCH_TMPDIR=str(tree.WORK)),
                   check=False)
    return proc.returncode


def boot(rpc_poll_ms=None, rounds=None, instructions=False, boots=None):
    """The boot benchmark, base against the series; see bench_boot.py."""
    env.setup()
    if instructions:
        env.ensure_valgrind()
    tree.build()
    if not (BOOT_BASE / '.git').exists():
        tree.log('materialising %s from the base alone' % BOOT_BASE.name)
        tree.materialise(BOOT_BASE, patches=[])
    tree.log('running %s' % BOOT_SCRIPT.name)
    extra = [] if rpc_poll_ms is None else ['--rpc-poll-ms',
                                            str(rpc_poll_ms)]
    if rounds is not None:
        extra += ['--rounds', str(rounds)]
    if instructions:
        extra.append('--instructions')
    if boots is not None:
        extra += ['--boots', str(boots)]
    proc = env.run([env.venv_bin('python'), str(BOOT_SCRIPT),
                    '--base', str(BOOT_BASE), '--patched', str(tree.TREE)] +
                   extra, check=False)
    return proc.returncode
