"""Engine benchmark: nova's orchestration engine against TaskFlow 6.5.

Run by ``tools/bench engine`` with the python of .work/venv (it imports
nova.orchestration) and TaskFlow on PYTHONPATH; not part of nova. Each
database runs in a child process of its own, because oslo.db configures
nova's API DB context manager once per process. A child prints one line
``BENCH-RESULT {json}``; the parent prints the tables, then one JSON line.

Nothing here asserts timings: the targets are printed as met or missed.
"""

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

PG_ADMIN_URL = ('postgresql+psycopg2://openstack_citest:openstack_citest@'
                '127.0.0.1:5432/openstack_citest')
PG_DATABASES = ('bench_orchestration', 'bench_taskflow')
STAGES = (10, 100)
# Repeats per flow length; TaskFlow is slow, so it runs fewer flows.
ENGINE_REPEATS = {10: 20, 100: 10}
TASKFLOW_REPEATS = {10: 5, 100: 2}
FLOOR_LOOPS = 1000
SIZES = (1000, 10000, 100000)
CLAIM_LOOPS = 200
CLAIMABLE_ROWS = 20       # active rows with an expired lease, at each size
ACTIVE_SHARE = 0.1        # of the bulk rows: active, lease held (future)
TARGETS = {'commits_per_transition': 1, 'statements_per_transition': 3,
           'taskflow_over_engine': 20, 'engine_over_floor': 2}
_CONTROL = re.compile(r'\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE)\b',
                      re.I)
RESULT_PREFIX = 'BENCH-RESULT '


def progress(msg):
    print('bench: %s' % msg, file=sys.stderr, flush=True)


# -- child: one database ---------------------------------------------------

class Counter(object):
    """SQL traffic of one engine, split into totals and transition windows.

    Data statements and transaction control (BEGIN/COMMIT/ROLLBACK sent
    through the cursor, as oslo.db does on SQLite) are counted apart;
    ``commits`` counts SQLAlchemy commit events (the DB-API commit()).
    """

    KEYS = ('data', 'control', 'commits', 'rollbacks', 'connects')

    def __init__(self):
        self.in_transition = False
        self.capture = None
        self.reset()

    def reset(self):
        self.total = dict.fromkeys(self.KEYS, 0)
        self.window = dict.fromkeys(self.KEYS, 0)
        self.transitions = 0

    def _bump(self, key):
        self.total[key] += 1
        if self.in_transition:
            self.window[key] += 1

    def attach(self, engine):
        import sqlalchemy as sa

        def before(conn, cursor, statement, params, context, many):
            control = _CONTROL.match(statement)
            self._bump('control' if control else 'data')
            if self.capture is not None and not control:
                self.capture.append((statement, params))

        sa.event.listen(engine, 'before_cursor_execute', before)
        sa.event.listen(engine, 'commit', lambda conn: self._bump('commits'))
        sa.event.listen(engine, 'rollback',
                        lambda conn: self._bump('rollbacks'))
        sa.event.listen(engine, 'connect',
                        lambda dbapi_conn, record: self._bump('connects'))


def _per(counts, n):
    return {k: round(v / n, 2) for k, v in counts.items()}


def _setup_nova(url):
    import nova.conf
    from nova.db.api import api as api_db_api
    from nova.db import migration
    conf = nova.conf.CONF
    conf([], project='nova', default_config_files=[])
    conf.set_override('connection', url, 'api_database')
    api_db_api.context_manager.configure(connection=url)
    migration.db_sync(database='api')
    return api_db_api.get_engine()


def _register_flows():
    from nova.orchestration import task

    class Noop(task.Task):
        on_crash = task.RERUN

        def __init__(self, name):
            self.name = name

        def execute(self, context):
            return None

    for n in STAGES + (2,):
        task.register(task.Flow('bench-noop-%d' % n, 1, (),
                                [Noop('noop-%d' % i) for i in range(n)]))


def bench_engine(counter):
    from nova import context as nova_context
    from nova.orchestration import engine as engine_mod
    from nova.orchestration import persistence
    from nova.orchestration import states

    original = persistence.transition

    def counted_transition(*args, **kwargs):
        counter.in_transition = True
        counter.transitions += 1
        try:
            return original(*args, **kwargs)
        finally:
            counter.in_transition = False

    persistence.transition = counted_transition
    _register_flows()
    ctx = nova_context.get_admin_context()
    engine = engine_mod.Engine('bench-conductor')

    def one(n):
        start, cpu = time.perf_counter(), time.process_time()
        flow_uuid = persistence.create_flow(ctx, 'bench-noop-%d' % n, 1, {})
        state = engine.run(ctx, flow_uuid)
        elapsed = (time.perf_counter() - start, time.process_time() - cpu)
        if state != states.SUCCESS:
            raise RuntimeError('flow ended %s' % state)
        return elapsed

    one(2)  # warm-up: imports, first connection, statement caches
    out = {}
    for n in STAGES:
        counter.reset()
        times = [one(n) for _ in range(ENGINE_REPEATS[n])]
        flows = len(times)
        stages = n * flows
        out[n] = {
            'flows': flows,
            'ms_per_stage': round(1000 * sum(t[0] for t in times) / stages,
                                  3),
            'cpu_ms_per_stage': round(
                1000 * sum(t[1] for t in times) / stages, 3),
            'transitions_per_flow': counter.transitions / flows,
            'per_transition': _per(counter.window, counter.transitions),
            'per_stage_all': _per(counter.total, stages),
        }
        progress('engine: %d stages x %d flows: %.2f ms/stage' % (
            n, flows, out[n]['ms_per_stage']))
    return out


def bench_taskflow(url):
    from taskflow import engines
    from taskflow.patterns import linear_flow
    from taskflow.persistence import backends
    from taskflow import task
    from taskflow.utils import persistence_utils

    class TfNoop(task.Task):
        def execute(self):
            return None

    backend = backends.fetch({'connection': url})
    with contextlib.closing(backend.get_connection()) as conn:
        conn.upgrade()
    counter = Counter()
    counter.attach(backend.engine)

    def one(n):
        flow = linear_flow.Flow('bench-%d' % n).add(
            *[TfNoop('noop-%d' % i) for i in range(n)])
        start, cpu = time.perf_counter(), time.process_time()
        book, detail = persistence_utils.temporary_flow_detail(backend)
        engines.run(flow, flow_detail=detail, book=book, backend=backend,
                    engine='serial')
        return time.perf_counter() - start, time.process_time() - cpu

    one(2)
    out = {}
    for n in STAGES:
        counter.reset()
        times = [one(n) for _ in range(TASKFLOW_REPEATS[n])]
        stages = n * len(times)
        out[n] = {
            'flows': len(times),
            'ms_per_stage': round(1000 * sum(t[0] for t in times) / stages,
                                  3),
            'cpu_ms_per_stage': round(
                1000 * sum(t[1] for t in times) / stages, 3),
            'per_stage_all': _per(counter.total, stages),
        }
        progress('taskflow: %d stages x %d flows: %.2f ms/stage' % (
            n, len(times), out[n]['ms_per_stage']))
    backend.close()
    return out


def bench_floor(url, oslo_engine=None):
    """One single-row UPDATE + COMMIT per loop.

    On a plain engine, on one connection: the raw floor. With oslo_engine
    (nova's API DB engine, as enginefacade configured it), one
    ``engine.begin()`` per loop: the floor of any enginefacade writer, which
    on file SQLite pays for a new connection per transaction (oslo.db
    forces NullPool there) and SQLite's schema load on its first statement.
    """
    import sqlalchemy as sa
    engine = oslo_engine or sa.create_engine(url)
    counter = Counter()
    counter.attach(engine)
    with engine.begin() as conn:
        conn.execute(sa.text('DROP TABLE IF EXISTS bench_floor'))
        conn.execute(sa.text('CREATE TABLE bench_floor '
                             '(id INTEGER PRIMARY KEY, n INTEGER)'))
        conn.execute(sa.text('INSERT INTO bench_floor VALUES (1, 0)'))
    update = sa.text('UPDATE bench_floor SET n = n + 1 WHERE id = 1')

    def loop(count):
        if oslo_engine is not None:
            for _ in range(count):
                with engine.begin() as conn:
                    conn.execute(update)
            return
        with engine.connect() as conn:
            for _ in range(count):
                conn.execute(update)
                conn.commit()

    loop(20)
    counter.reset()
    start, cpu = time.perf_counter(), time.process_time()
    loop(FLOOR_LOOPS)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    with engine.begin() as conn:
        conn.execute(sa.text('DROP TABLE bench_floor'))
    if oslo_engine is None:
        engine.dispose()
    out = {'loops': FLOOR_LOOPS,
           'ms_per_commit': round(1000 * elapsed / FLOOR_LOOPS, 3),
           'cpu_ms_per_commit': round(1000 * cpu / FLOOR_LOOPS, 3),
           'per_loop': _per(counter.total, FLOOR_LOOPS)}
    progress('floor%s: %.2f ms per UPDATE+COMMIT' % (
        ' (enginefacade)' if oslo_engine else '', out['ms_per_commit']))
    return out


def _median_ms(values):
    return round(1000 * statistics.median(list(values)), 3)


def _explain(engine, dialect, statement, params):
    import sqlalchemy as sa  # noqa: F401
    prefix = 'EXPLAIN QUERY PLAN ' if dialect == 'sqlite' else 'EXPLAIN '
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(prefix + statement, params).fetchall()
    if dialect == 'sqlite':
        lines = [row[-1] for row in rows]
        uses_index = any('INDEX' in ln or 'PRIMARY KEY' in ln
                         for ln in lines)
        uses_index = uses_index and not any(
            re.match(r'SCAN \w+$', ln) for ln in lines)
    else:
        lines = [row[0] for row in rows]
        uses_index = (any('Index' in ln for ln in lines) and
                      not any('Seq Scan' in ln for ln in lines))
    return {'sql': ' '.join(statement.split()), 'plan': lines,
            'uses_index': uses_index}


def bench_claim(engine, dialect, counter):
    """Time claimable()+claim() with 1k, 10k, 100k flow rows."""
    import datetime

    from oslo_utils import timeutils
    from oslo_utils import uuidutils
    import sqlalchemy as sa

    from nova import context as nova_context
    from nova.orchestration import persistence
    from nova.orchestration import states

    ctx = nova_context.get_admin_context()
    flows = persistence.Flow.__table__
    with engine.begin() as conn:
        conn.execute(persistence.Stage.__table__.delete())
        conn.execute(flows.delete())
    now = timeutils.utcnow()
    past = now - datetime.timedelta(hours=1)
    future = now + datetime.timedelta(days=1)
    finished = list(states.FINISHED)

    def rows(start, count):
        out = []
        for i in range(start, start + count):
            active = (i % 100) < ACTIVE_SHARE * 100
            out.append({
                'uuid': uuidutils.generate_uuid(), 'kind': 'bench-bulk',
                'version': 1, 'inputs': '{}',
                'state': (states.RUNNING if active
                          else finished[i % len(finished)]),
                'owner': 'bench-other' if active else None,
                'lease_expires_at': future if active else past,
                'lease_generation': 1, 'created_at': past,
                'updated_at': past})
        return out

    with engine.begin() as conn:
        conn.execute(flows.insert(), [
            {'uuid': uuidutils.generate_uuid(), 'kind': 'bench-claimable',
             'version': 1, 'inputs': '{}', 'state': states.PENDING,
             'lease_expires_at': past - datetime.timedelta(seconds=i),
             'lease_generation': 0, 'created_at': past}
            for i in range(CLAIMABLE_ROWS)])
    have = CLAIMABLE_ROWS
    out = {'sizes': [], 'explain': {}}
    for size in SIZES:
        with engine.begin() as conn:
            for start in range(have, size, 10000):
                conn.execute(flows.insert(),
                             rows(start, min(10000, size - start)))
        have = size
        with engine.connect() as conn:
            conn.execute(sa.text('ANALYZE'))
            conn.commit()
        times = []
        for i in range(CLAIM_LOOPS + 20):
            capture = [] if i == 0 else None
            counter.capture = capture
            start = time.perf_counter()
            uuids = persistence.claimable(ctx, 16)
            middle = time.perf_counter()
            fence = persistence.claim(ctx, uuids[0], 'bench', 0)
            end = time.perf_counter()
            counter.capture = None
            if fence is None:
                raise RuntimeError('claim failed on a claimable flow')
            if capture is not None:
                select = next(c for c in capture
                              if 'ORDER BY' in c[0].upper())
                update = next(c for c in capture
                              if c[0].lstrip().upper().startswith('UPDATE'))
                explain = {
                    'claimable': _explain(engine, dialect, *select),
                    'claim_update': _explain(engine, dialect, *update)}
            if i >= 20:
                times.append((middle - start, end - middle, end - start))
        out['explain'][size] = explain
        out['sizes'].append({
            'rows': size,
            'ms_claimable': _median_ms(t[0] for t in times),
            'ms_claim': _median_ms(t[1] for t in times),
            'ms_median': _median_ms(t[2] for t in times),
            'ms_mean': round(1000 * statistics.mean(t[2] for t in times), 3),
            'index': all(e['uses_index'] for e in explain.values())})
        progress('claim: %d rows: %.2f ms' % (
            size, out['sizes'][-1]['ms_median']))
    first, last = out['sizes'][0], out['sizes'][-1]
    out['ratio_100k_1k'] = round(last['ms_median'] / first['ms_median'], 2)
    out['claimable_ratio_100k_1k'] = round(
        last['ms_claimable'] / first['ms_claimable'], 2)
    return out


def child(db, workdir):
    os.environ['OS_NOVA_DISABLE_EVENTLET_PATCHING'] = 'True'
    warnings.simplefilter('ignore')
    if db == 'sqlite':
        nova_url = 'sqlite:///%s' % os.path.join(workdir, 'orchestration.db')
        tf_url = 'sqlite:///%s' % os.path.join(workdir, 'taskflow.db')
    else:
        base = PG_ADMIN_URL.rsplit('/', 1)[0]
        nova_url = '%s/%s' % (base, PG_DATABASES[0])
        tf_url = '%s/%s' % (base, PG_DATABASES[1])
    progress('%s: migrating the API database' % db)
    engine = _setup_nova(nova_url)
    counter = Counter()
    counter.attach(engine)
    result = {'db': db, 'server_version': '.'.join(
        str(v) for v in engine.dialect.server_version_info or ())}
    result['engine'] = bench_engine(counter)
    result['floor'] = bench_floor(nova_url)
    result['floor_enginefacade'] = bench_floor(nova_url, engine)
    result['taskflow'] = bench_taskflow(tf_url)
    result['claim'] = bench_claim(engine, engine.dialect.name, counter)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# -- parent: both databases, tables, JSON ----------------------------------

def _pg_admin(sql_statements):
    import sqlalchemy as sa
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level='AUTOCOMMIT')
    with engine.connect() as conn:
        for sql in sql_statements:
            conn.execute(sa.text(sql))
    engine.dispose()


def _run_child(db, workdir):
    env = dict(os.environ, OS_NOVA_DISABLE_EVENTLET_PATCHING='True',
               PYTHONWARNINGS='ignore')
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), '--child', db,
         '--workdir', workdir], env=env, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines()
             if ln.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        sys.stdout.write(proc.stdout)
        raise SystemExit('bench: the %s run failed (status %d)' % (
            db, proc.returncode))
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def summary(r):
    """The headline figures of one database (flows of the longest N)."""
    n = str(max(STAGES))
    eng, tf = r['engine'][n], r['taskflow'][n]
    per_tr = eng['per_transition']
    out = {
        'commits_per_transition': per_tr['commits'],
        'statements_per_transition': per_tr['data'],
        'transaction_control_per_transition': per_tr['control'],
        'engine_ms_per_stage': eng['ms_per_stage'],
        'engine_cpu_ms_per_stage': eng['cpu_ms_per_stage'],
        'taskflow_cpu_ms_per_stage': tf['cpu_ms_per_stage'],
        'floor_cpu_ms_per_commit': r['floor']['cpu_ms_per_commit'],
        'taskflow_ms_per_stage': tf['ms_per_stage'],
        'floor_ms_per_commit': r['floor']['ms_per_commit'],
        'taskflow_over_engine': round(
            tf['ms_per_stage'] / eng['ms_per_stage'], 1),
        'engine_over_floor': round(
            eng['ms_per_stage'] / r['floor']['ms_per_commit'], 2),
        'enginefacade_floor_ms_per_commit': r['floor_enginefacade'][
            'ms_per_commit'],
        'engine_over_enginefacade_floor': round(
            eng['ms_per_stage'] / r['floor_enginefacade']['ms_per_commit'],
            2),
        # The best any engine writing through enginefacade could reach.
        'enginefacade_floor_over_floor': round(
            r['floor_enginefacade']['ms_per_commit'] /
            r['floor']['ms_per_commit'], 2),
        'taskflow_over_enginefacade_floor': round(
            tf['ms_per_stage'] / r['floor_enginefacade']['ms_per_commit'],
            1),
        'taskflow_statements_per_stage': tf['per_stage_all']['data'],
        'taskflow_commits_per_stage': tf['per_stage_all']['commits'],
        'claim_ms': {str(s['rows']): s['ms_median']
                     for s in r['claim']['sizes']},
        'claim_ratio_100k_1k': r['claim']['ratio_100k_1k'],
        'claimable_ratio_100k_1k': r['claim']['claimable_ratio_100k_1k'],
        'claim_uses_index': all(s['index'] for s in r['claim']['sizes']),
        'stages': int(n),
    }
    out['targets_met'] = {
        'commits_per_transition<=1': out['commits_per_transition'] <= 1,
        'statements_per_transition<=3':
            out['statements_per_transition'] <= 3,
        'taskflow_over_engine>=20': out['taskflow_over_engine'] >= 20,
        'engine_over_floor<=2': out['engine_over_floor'] <= 2,
    }
    return out


def _table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print('\n' + title)
    fmt = '  '.join('%%-%ds' % w for w in widths)
    print(fmt % tuple(header))
    print(fmt % tuple('-' * w for w in widths))
    for row in rows:
        print(fmt % tuple(row))


def report(results):
    print('\nSQL statements are counted with SQLAlchemy before_cursor_execute'
          ' events; "data" excludes transaction control (BEGIN/COMMIT/'
          'ROLLBACK sent through the cursor: oslo.db emits its own BEGIN on'
          ' SQLite), counted as "ctl". "commits" are SQLAlchemy commit '
          'events, "conn" new DB-API connections (oslo.db and TaskFlow use'
          ' NullPool on file SQLite). Times include creating the flow; '
          'ours: create_flow + Engine.run, TaskFlow: logbook/flow detail '
          '+ engines.run(engine="serial"). "cpu ms" is the process CPU '
          'time of the benchmark (python + driver; SQLite work runs '
          'in-process, PostgreSQL\'s in the server).')
    rows = []
    for r in results:
        for n in STAGES:
            n = str(n)
            for name in ('engine', 'taskflow'):
                x = r[name][n]
                tr = x.get('per_transition')
                al = x['per_stage_all']
                rows.append([
                    r['db'], 'ours' if name == 'engine' else 'TaskFlow 6.5',
                    n, x['flows'], '%.2f' % x['ms_per_stage'],
                    '%.2f' % x['cpu_ms_per_stage'],
                    '%g' % al['data'], '%g' % al['control'],
                    '%g' % al['commits'], '%g' % al['connects'],
                    '%g / %g / %g' % (tr['data'], tr['control'],
                                      tr['commits']) if tr else '-'])
        for key, label in (('floor', 'floor UPDATE+COMMIT'),
                           ('floor_enginefacade', 'floor via enginefacade')):
            f = r[key]
            rows.append([r['db'], label, '-', f['loops'],
                         '%.2f' % f['ms_per_commit'],
                         '%.2f' % f['cpu_ms_per_commit'],
                         '%g' % f['per_loop']['data'],
                         '%g' % f['per_loop']['control'],
                         '%g' % f['per_loop']['commits'],
                         '%g' % f['per_loop']['connects'], '-'])
    _table('Linear flows of no-op stages (per stage, whole run; last column:'
           ' per transition() call, data / ctl / commits)',
           ['db', 'engine', 'N', 'flows', 'ms/stage', 'cpu ms', 'data',
            'ctl', 'commits', 'conn', 'per transition'], rows)

    rows = []
    for r in results:
        for s in r['claim']['sizes']:
            rows.append([r['db'], s['rows'], '%.3f' % s['ms_claimable'],
                         '%.3f' % s['ms_claim'], '%.3f' % s['ms_median'],
                         '%.3f' % s['ms_mean'],
                         'yes' if s['index'] else 'NO'])
        rows.append([r['db'], 'ratio 100k/1k', '%.2f' % r['claim'][
            'claimable_ratio_100k_1k'], '', '%.2f' % r['claim'][
            'ratio_100k_1k'], '', ''])
    _table('claimable(limit=16) + claim() with N flow rows (%d%% active '
           'with a held lease, the rest finished, +%d claimable; ANALYZEd;'
           ' %d loops)' % (ACTIVE_SHARE * 100, CLAIMABLE_ROWS, CLAIM_LOOPS),
           ['db', 'rows', 'claimable() ms', 'claim() ms', 'both ms',
            'both mean ms', 'index used'], rows)
    print('(medians; claim() is a write transaction: its commit, i.e. the '
          'disk flush on SQLite, dominates it)')

    for r in results:
        size = str(max(SIZES))
        for name, e in sorted(r['claim']['explain'][size].items()):
            print('\n%s, %s rows, %s:\n  %s' % (
                r['db'], size, name, e['sql']))
            for line in e['plan']:
                print('    ' + line)

    rows = []
    for r in results:
        s = summary(r)
        for key, met in s['targets_met'].items():
            rows.append([r['db'], key, 'met' if met else 'MISSED'])
    _table('Targets (they apply to file SQLite; PostgreSQL for reference)',
           ['db', 'target', 'result'], rows)
    rows = []
    for r in results:
        s = summary(r)
        rows.append([r['db'], '%.2f' % s['enginefacade_floor_over_floor'],
                     '%.1f' % s['taskflow_over_enginefacade_floor'],
                     '%.2f' % s['engine_over_enginefacade_floor']])
    _table('Bounds set by enginefacade: one single-statement transaction '
           'through nova\'s API DB engine, against the raw floor and '
           'TaskFlow, and ours against it',
           ['db', 'ef floor / floor', 'TaskFlow / ef floor',
            'ours / ef floor'], rows)


def parent():
    warnings.simplefilter('ignore')
    start = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix='bench-', dir=os.environ.get(
            'BENCH_TMPDIR')) as workdir:
        progress('sqlite: file databases in %s' % workdir)
        results.append(_run_child('sqlite', workdir))
    drop = ['DROP DATABASE IF EXISTS %s' % d for d in PG_DATABASES]
    _pg_admin(drop + ['CREATE DATABASE %s' % d for d in PG_DATABASES])
    try:
        results.append(_run_child('postgresql', ''))
    finally:
        _pg_admin(drop)
    report(results)
    final = summary(results[0])
    final['postgresql'] = summary(results[1])
    final['postgresql']['server_version'] = results[1]['server_version']
    for r in results:
        r['claim'].pop('explain')
    final['raw'] = {r['db']: r for r in results}
    final['wall_s'] = round(time.time() - start, 1)
    print('\nwall time: %.0f s' % final['wall_s'])
    print(json.dumps(final, sort_keys=True))
    return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--child', choices=('sqlite', 'postgresql'))
    parser.add_argument('--workdir')
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workdir)
        return 0
    return parent()


if __name__ == '__main__':
    sys.exit(main())
