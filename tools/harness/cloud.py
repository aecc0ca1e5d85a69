"""tools/cloud: a local cloud booting servers through the build flows.

The default mode runs everything in one process on SQLite
(cloud_embedded.py); --real runs nova's services as processes of their
own on RabbitMQ and PostgreSQL or MariaDB (cloud_real.py). Both run with
the python of .work/venv once tools/setup's steps are done.
"""

import os
import subprocess

from harness import env
from harness import tree

HERE = tree.REPO / 'tools' / 'harness'
REAL_SCRIPT = HERE / 'cloud_real.py'
EMBEDDED_SCRIPT = HERE / 'cloud_embedded.py'


LOGS = tree.WORK / 'logs' / 'cloud'


def command(real, count, db=None, keep=False):
    """The command line of one cloud run (setup done)."""
    cmd = [env.venv_bin('python'),
           str(REAL_SCRIPT if real else EMBEDDED_SCRIPT),
           '--count', str(count)]
    if real:
        cmd += ['--db', db or 'postgresql'] + (['--keep'] if keep else [])
    else:
        cmd += ['--log', str(LOGS / 'embedded.log')]
    return cmd


def run(real=False, count=None, db=None, keep=False):
    if real:
        env.setup()
    else:
        # No database server needed: only the build and the virtualenv.
        env.ensure_system_packages()
        tree.build()
        env.ensure_venv()
    count = count or (6 if real else 8)
    script = REAL_SCRIPT if real else EMBEDDED_SCRIPT
    tree.log('running %s' % script.name)
    LOGS.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(command(real, count, db, keep), cwd=tree.TREE,
                            env=python_env(real))
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the child too: let it tear its cloud down.
            continue


CHAOS_SCRIPT = HERE / 'chaos.py'


def chaos_command(trials=None, quick=False, db=None, seed=None, keep=False,
                  points=None, ports=False):
    """The command line of one tools/chaos run (setup done)."""
    cmd = [env.venv_bin('python'), str(CHAOS_SCRIPT),
           '--db', db or 'postgresql']
    if quick:
        cmd.append('--quick')
    if trials:
        cmd += ['--trials', str(trials)]
    if seed is not None:
        cmd += ['--seed', str(seed)]
    if points:
        cmd += ['--points', points]
    if ports:
        cmd.append('--ports')
    return cmd + (['--keep'] if keep else [])


def chaos(trials=None, quick=False, db=None, seed=None, keep=False,
          points=None, ports=False):
    env.setup()
    tree.log('running %s' % CHAOS_SCRIPT.name)
    LOGS.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(chaos_command(trials, quick, db, seed, keep,
                                          points, ports),
                            cwd=tree.TREE)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def python_env(real):
    if real:
        return None
    # The in-process cloud runs nova on eventlet, as nova's functional
    # tests do by default: in native threading mode the harness's database
    # lock fixtures can deadlock under this load.
    return dict(os.environ, OS_NOVA_DISABLE_EVENTLET_PATCHING='False')
