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

"""A conductor stand-in that the functional tests run as a real process.

Usage::

    python -m nova.tests.orchestration.functional.worker \\
        --connection URL [--lease SECONDS] [--owner NAME] [--kill-at POINT] \\
        [--max-stage-executions N] [--stage-rerun-backoff SECONDS] \\
        run FLOW_UUID
    python -m nova.tests.orchestration.functional.worker \\
        --connection URL --lease 1 sweep --seconds 60

``run`` claims one flow and runs it in the main thread; ``sweep`` claims
and runs expired flows on the orchestration pool and renews their leases
until no active flow is left (or the time is up). Either prints one JSON
object on stdout when it is done.

With ``--kill-at`` the process SIGKILLs itself at that point (see
``KILL_POINTS``), which is what a crash of a conductor looks like to the
database: open transactions are rolled back by the server and nothing of
the process survives.

Stages record what they do in two tables the test creates next to the API
tables (``METADATA``), written through a connection of their own so that a
record survives the kill: ``orchestration_test_events`` journals every call
of execute or revert, ``orchestration_test_effects`` holds the side effects
themselves. The effect of a transactional stage is written with the
engine's own session instead, so it commits or rolls back with the stage.
"""

import argparse
import os
import signal
import sys
import time

from oslo_log import log as logging
from oslo_serialization import jsonutils
import sqlalchemy as sa

import nova.conf
from nova import context as nova_context
from nova.db.api import api as api_db_api
from nova.db.api import models as api_models
from nova import objects
from nova.orchestration import engine as engine_mod
from nova.orchestration import persistence
from nova.orchestration import recorder as recorder_mod
from nova.orchestration import states
from nova.orchestration import task as task_mod

CONF = nova.conf.CONF
FLOWS = api_models.OrchestrationFlow.__table__

METADATA = sa.MetaData()

EVENTS = sa.Table(
    'orchestration_test_events', METADATA,
    sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
    sa.Column('flow_uuid', sa.String(36), nullable=False),
    sa.Column('stage', sa.String(64), nullable=False),
    sa.Column('call', sa.String(16), nullable=False),
    sa.Column('result', sa.Text, nullable=True),
    sa.Column('pid', sa.Integer, nullable=False),
)

EFFECTS = sa.Table(
    'orchestration_test_effects', METADATA,
    sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
    sa.Column('flow_uuid', sa.String(36), nullable=False),
    sa.Column('stage', sa.String(64), nullable=False),
    sa.Column('undone', sa.Boolean, nullable=False, default=False),
    sa.Column('pid', sa.Integer, nullable=False),
    # Set by keyed stages only: NULLs never conflict.
    sa.Column('key', sa.String(128), nullable=True, unique=True),
)

CRASH_KIND = 'functional-crash'
RACE_KIND = 'functional-race'
DROP_KIND = 'functional-db-drop'

#: Where --kill-at may kill the process; X is a stage name.
KILL_POINTS = """
claimed       right after the flow was claimed, before its first stage
before:X      at the start of X.execute: the transition that started X
              (and finished the stage before it) has committed, nothing of
              X has run
middle:X      inside X.execute, after its side effect
after:X       X.execute returned; X's success is not committed (for a
              transactional X: every statement of the stage's transaction
              ran, the COMMIT did not)
committed:X   the transition recording X's success has committed
failed:X      the transition recording X's failure has committed
revert:X      inside X.revert, after it undid the side effect
"""

_KILL_AT = None
_SIDE = None


def die_at(point):
    """SIGKILL this process if --kill-at names this point."""
    if point == _KILL_AT:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _journal(flow_uuid, stage, call, result=None):
    with _SIDE.begin() as conn:
        conn.execute(EVENTS.insert().values(
            flow_uuid=flow_uuid, stage=stage, call=call,
            result=jsonutils.dumps(result), pid=os.getpid()))


def _executions(flow_uuid, stage):
    with _SIDE.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).select_from(EVENTS).where(
                EVENTS.c.flow_uuid == flow_uuid, EVENTS.c.stage == stage,
                EVENTS.c.call == 'execute')).scalar()


def _generation(flow_uuid):
    with _SIDE.connect() as conn:
        return conn.execute(sa.select(FLOWS.c.lease_generation).where(
            FLOWS.c.uuid == flow_uuid)).scalar()


class Step(task_mod.Task):
    """A stage whose side effect is one row of the effects table.

    keyed: the effect is unique per flow and stage, so that executing
    twice, even concurrently, is harmless (what an idempotent RERUN
    stage must do). fail: execute raises if the flow's input
    ``fail`` names this stage. slow_first: the first execution of this
    stage in a flow whose input ``slow`` lists the stage sleeps until
    another run claimed the flow, at most that long: it overruns its
    timeout, so that its lease expires and is taken over.
    """

    requires = ('flow_uuid', 'fail', 'slow')

    def __init__(self, name, on_crash=task_mod.REVERT,
                 transactional=False, keyed=False, timeout=None,
                 slow_first=0, hook=None):
        self.name = name
        self.provides = name
        self.on_crash = on_crash
        self.transactional = transactional
        self.keyed = keyed
        self.timeout = timeout
        self.slow_first = slow_first
        self.hook = hook

    def execute(self, context, flow_uuid, fail, slow):
        die_at('before:%s' % self.name)
        if (self.slow_first and self.name in slow and
                _executions(flow_uuid, self.name) == 0):
            generation = _generation(flow_uuid)
            _journal(flow_uuid, self.name, 'execute')
            # Overrun the timeout until another run took the flow over.
            deadline = time.monotonic() + self.slow_first
            while (_generation(flow_uuid) == generation and
                   time.monotonic() < deadline):
                time.sleep(0.1)
        else:
            _journal(flow_uuid, self.name, 'execute')
        if fail == self.name:
            raise ValueError('%s fails as asked' % self.name)
        values = dict(flow_uuid=flow_uuid, stage=self.name,
                      undone=False, pid=os.getpid())
        if self.transactional:
            # Joins the transaction the engine runs this stage in.
            with api_db_api.context_manager.writer.using(context):
                context.session.execute(EFFECTS.insert().values(
                    **values))
        elif self.keyed:
            # Idempotent even when a stale execution runs concurrently
            # with the one that took the flow over.
            try:
                with _SIDE.begin() as conn:
                    conn.execute(EFFECTS.insert().values(
                        key='%s/%s' % (flow_uuid, self.name), **values))
            except sa.exc.IntegrityError:
                pass
        else:
            with _SIDE.begin() as conn:
                conn.execute(EFFECTS.insert().values(**values))
        if self.hook is not None:
            self.hook(context, flow_uuid)
        die_at('middle:%s' % self.name)
        return '%s-result' % self.name

    def revert(self, context, result, failure, flow_uuid, fail, slow):
        _journal(flow_uuid, self.name, 'revert', result)
        with _SIDE.begin() as conn:
            conn.execute(EFFECTS.update().where(
                EFFECTS.c.flow_uuid == flow_uuid,
                EFFECTS.c.stage == self.name).values(undone=True))
        die_at('revert:%s' % self.name)


def _terminate_other_backends(context, flow_uuid):
    """Kill every other connection to this database, server side."""
    with _SIDE.begin() as conn:
        killed = conn.execute(sa.text(
            'SELECT pg_terminate_backend(pid) FROM pg_stat_activity '
            'WHERE datname = current_database() '
            'AND pid <> pg_backend_pid()')).all()
    _journal(flow_uuid, 'terminate', 'terminate', len(killed))


def _terminate_own_backend(context, flow_uuid):
    """Kill the connection of the engine's open transaction (once)."""
    if _executions(flow_uuid, 'txn') > 1:
        return
    with api_db_api.context_manager.writer.using(context):
        pid = context.session.execute(
            sa.text('SELECT pg_backend_pid()')).scalar()
    with _SIDE.begin() as conn:
        killed = conn.execute(sa.text('SELECT pg_terminate_backend(:pid)'),
                              {'pid': pid}).scalar()
    _journal(flow_uuid, 'terminate', 'terminate', int(killed))


def register_flows():
    """Register the flows of the functional tests; return them by kind."""
    inputs = ('flow_uuid', 'fail', 'slow')
    crash = task_mod.FlowDefinition(CRASH_KIND, 1, inputs, [
        Step('a', on_crash=task_mod.RERUN, keyed=True),
        Step('b', on_crash=task_mod.REVERT),
        Step('c', transactional=True),
        Step('d', on_crash=task_mod.RERUN, keyed=True),
    ])
    # Stages overrun their one second timeout (when the flow's input slow
    # names them) until another run took the flow over.
    race = task_mod.FlowDefinition(RACE_KIND, 1, inputs, [
        Step('claim', transactional=True, timeout=1, slow_first=60),
        Step('port', on_crash=task_mod.RERUN, keyed=True, timeout=1,
             slow_first=60),
        Step('commit', transactional=True, timeout=1, slow_first=60),
    ])
    drop = task_mod.FlowDefinition(DROP_KIND, 1, inputs, [
        Step('first', on_crash=task_mod.REVERT,
             hook=_terminate_other_backends),
        Step('txn', transactional=True, hook=_terminate_own_backend),
        Step('last', on_crash=task_mod.REVERT,
             hook=_terminate_other_backends),
    ])
    flows = {}
    for flow in (crash, race, drop):
        flows[flow.kind] = task_mod.register(flow)
    return flows


def _install_kill_points():
    """Wrap the engine's steps that are kill points (see KILL_POINTS)."""
    real_claim = persistence.claim

    def claim(*args, **kwargs):
        fence = real_claim(*args, **kwargs)
        if fence is not None:
            die_at('claimed')
        return fence
    persistence.claim = claim

    real_succeed = recorder_mod.Recorder.succeed

    def succeed(self, row, result, encoded, joined=False):
        if not joined:
            die_at('after:%s' % row.name)
        real_succeed(self, row, result, encoded, joined=joined)
        die_at(('after:%s' if joined else 'committed:%s') % row.name)
    recorder_mod.Recorder.succeed = succeed

    real_fail = recorder_mod.Recorder.fail

    def fail(self, row, failure):
        real_fail(self, row, failure)
        die_at('failed:%s' % row.name)
    recorder_mod.Recorder.fail = fail


def _setup(args):
    global _KILL_AT, _SIDE
    logging.register_options(CONF)
    CONF([], project='nova', default_config_files=[])
    CONF.set_override('debug', args.debug)
    # stdout carries the JSON result.
    CONF.set_override('use_stderr', True)
    logging.setup(CONF, 'nova')
    objects.register_all()
    CONF.set_override('lease_duration', args.lease, group='orchestration')
    CONF.set_override('pool_size', args.pool_size, group='orchestration')
    for name in ('max_stage_executions', 'stage_rerun_backoff'):
        if getattr(args, name) is not None:
            CONF.set_override(name, getattr(args, name),
                              group='orchestration')
    # What nova.db.api.api.configure() does with [api_database], without
    # the profiler options that only nova.config.parse_args() registers.
    api_db_api.context_manager.configure(
        connection=args.connection, max_pool_size=args.pool_size,
        max_overflow=args.pool_size)
    # Pre-ping: the database drop test terminates these connections too.
    _SIDE = sa.create_engine(args.connection, pool_size=args.pool_size,
                             max_overflow=args.pool_size, pool_pre_ping=True)
    _KILL_AT = args.kill_at
    register_flows()
    _install_kill_points()


def _run(args):
    engine = engine_mod.Engine(owner=args.owner)
    state = engine.run(nova_context.get_admin_context(), args.flow_uuid)
    return {'state': state, 'owner': engine.owner}


def _active(context):
    with api_db_api.context_manager.reader.using(context):
        return context.session.execute(
            sa.select(sa.func.count()).select_from(FLOWS).where(
                FLOWS.c.state.in_(states.ACTIVE))).scalar()


def _sweep(args):
    context = nova_context.get_admin_context()
    engine = engine_mod.Engine(owner=args.owner)
    deadline = time.monotonic() + args.seconds
    futures = []
    started = 0
    while time.monotonic() < deadline:
        engine.renew_leases(context)
        new = engine.sweep(context)
        started += len(new)
        futures = [f for f in futures + new if not f.done()]
        if not new and not futures and _active(context) == 0:
            break
        time.sleep(args.interval)
    for future in futures:
        future.result(timeout=args.seconds)
    return {'owner': engine.owner, 'started': started,
            'idle': _active(context) == 0}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='nova.tests.orchestration.functional.worker',
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='kill points:' + KILL_POINTS)
    parser.add_argument('--connection', required=True,
                        help='URL of the API database')
    parser.add_argument('--lease', type=int, default=60,
                        help='[orchestration]lease_duration')
    parser.add_argument('--pool-size', type=int, default=8,
                        help='[orchestration]pool_size')
    parser.add_argument('--max-stage-executions', type=int, default=None,
                        help='[orchestration]max_stage_executions')
    parser.add_argument('--stage-rerun-backoff', type=int, default=None,
                        help='[orchestration]stage_rerun_backoff')
    parser.add_argument('--owner', default=None)
    parser.add_argument('--kill-at', default=None,
                        help='SIGKILL this process at that point')
    parser.add_argument('--debug', action='store_true')
    sub = parser.add_subparsers(dest='command', required=True)
    run = sub.add_parser('run', help='run one flow in the main thread')
    run.add_argument('flow_uuid')
    sweep = sub.add_parser('sweep', help='sweep until no flow is active')
    sweep.add_argument('--seconds', type=float, default=60)
    sweep.add_argument('--interval', type=float, default=0.2,
                       help='seconds between sweeps and renewals')
    args = parser.parse_args(argv)

    _setup(args)
    result = _run(args) if args.command == 'run' else _sweep(args)
    print(jsonutils.dumps(result))
    sys.stdout.flush()
    return 0


if __name__ == '__main__':
    # As nova/tests/orchestration/__init__.py, imported before this module,
    # the concurrency backend follows OS_NOVA_DISABLE_EVENTLET_PATCHING.
    sys.exit(main())
