"""tools/cloud: a local cloud booting servers through the build flows.

The default mode runs everything in one process on SQLite
(cloud_embedded.py); --real runs nova's services as processes of their
own on RabbitMQ and PostgreSQL or MariaDB (cloud_real.py). Both run with
the python of .work/venv once tools/setup's steps are done.
"""

import subprocess

from harness import env
from harness import tree

HERE = tree.REPO / 'tools' / 'harness'
REAL_SCRIPT = HERE / 'cloud_real.py'
EMBEDDED_SCRIPT = HERE / 'cloud_embedded.py'


def command(real, count, db=None, keep=False):
    """The command line of one cloud run (setup done)."""
    cmd = [env.venv_bin('python'),
           str(REAL_SCRIPT if real else EMBEDDED_SCRIPT),
           '--count', str(count)]
    if real:
        cmd += ['--db', db or 'postgresql'] + (['--keep'] if keep else [])
    return cmd


def run(real=False, count=None, db=None, keep=False):
    env.setup()
    count = count or (6 if real else 8)
    tree.log('running %s' % (REAL_SCRIPT if real else EMBEDDED_SCRIPT).name)
    return subprocess.run(command(real, count, db, keep)).returncode
