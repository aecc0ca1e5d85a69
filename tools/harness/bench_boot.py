"""Boot benchmark: servers booted on the unpatched base and the series.

Run by ``tools/bench boot`` with the python of .work/venv. Each round runs
one child process per nova tree (the base, then the patched tree, then
the other way round in the next round), with the tree first on sys.path.
A child boots servers through the REST API in nova's functional harness
(in-memory databases, fake RPC, placement, the fake virt driver, three
compute hosts): first one at a time, then batches of 50 posted at once,
and prints one line ``BENCH-RESULT {json}``. The parent prints a table
and, last, one JSON line with the ratios patched/base.

Nothing here asserts timings: the targets are printed as met or missed.

oslo.messaging's fake driver, which nova's functional harness uses, has
its listeners poll for messages every 50 ms, so every RPC hop of a boot
would wait 0-50 ms at random. The children wake the listeners as soon as a
message is delivered instead, as a real broker delivers at once;
``--rpc-poll-ms MS`` makes them poll every MS ms as earlier runs did.

``--instructions`` counts CPU instructions instead, which do not depend
on the machine's speed: each tree's child runs under valgrind's callgrind
(both at once, one per core), which counts only while ``--boots`` boots
(8 by default) run one at a time after the warm-up, and the parent reads
the totals. They still depend on timing: under callgrind a
boot takes about 50 times as long, and what runs on timers (heartbeats,
listeners woken by every message) runs more often per boot than it
would.

Each child also reports the CPU time its process spends per sequential
boot (``time.process_time``: API, conductor, scheduler, placement and
computes all run in it). Equal to the latency, it says that a boot waits
for nothing: the figures measure work. It is no steadier than the latency
on a virtual machine whose host lends its CPU to others: a paused vCPU
still counts as time running.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

RESULT_PREFIX = 'BENCH-RESULT '
SEQUENTIAL = 20      # boots one at a time, after WARMUP
WARMUP = 3
BATCH = 50           # boots posted at once
BATCHES = 2
ROUNDS = 5           # a child's figures move by 10% between processes
INSTRUMENTED = 8     # boots counted under callgrind (default of --boots)
TARGETS = {'latency_ratio': 1.05, 'throughput_ratio': 0.95}


def progress(msg):
    print('bench: %s' % msg, file=sys.stderr, flush=True)


# -- child: one tree ---------------------------------------------------------

def _poll_rpc_every(seconds):
    """Make the fake RPC driver's listeners poll every ``seconds``."""
    import time as real_time

    from oslo_messaging._drivers import impl_fake

    class Time(object):
        time = staticmethod(real_time.time)

        @staticmethod
        def sleep(pause):
            real_time.sleep(min(pause, seconds))

    impl_fake.time = Time


def _deliver_rpc_at_once():
    """Wake the fake RPC driver's listeners as soon as a message arrives.

    A listener checks its queues, then sleeps for 50 ms; here the sleep
    ends when any message is delivered after the listener's last check.
    Every delivery bumps a generation counter; a listener's sleep returns
    once the counter moved past the value it saw before its checks, so a
    message delivered between a check and the sleep is not missed.
    """
    import threading
    import time as real_time

    from oslo_messaging._drivers import impl_fake

    arrived = threading.Condition()
    state = {'generation': 0}
    seen = threading.local()
    deliver = impl_fake.FakeExchange.deliver_message
    poll = impl_fake.FakeExchange.poll

    def deliver_message(self, *args, **kwargs):
        deliver(self, *args, **kwargs)
        with arrived:
            state['generation'] += 1
            arrived.notify_all()

    def exchange_poll(self, target, pool):
        if not hasattr(seen, 'generation'):
            seen.generation = state['generation']
        return poll(self, target, pool)

    class Time(object):
        time = staticmethod(real_time.time)

        @staticmethod
        def sleep(pause):
            with arrived:
                arrived.wait_for(
                    lambda: state['generation'] != seen.generation, pause)
                seen.generation = state['generation']

    impl_fake.FakeExchange.deliver_message = deliver_message
    impl_fake.FakeExchange.poll = exchange_poll
    impl_fake.time = Time


def _callgrind(state):
    """Turn callgrind's counting of this process on or off."""
    subprocess.run(['callgrind_control', '-i', state, str(os.getpid())],
                   check=True, stdout=subprocess.DEVNULL)


def child(out):
    import sqlalchemy as sa
    import testtools

    from nova.db.api import api as api_db_api
    from nova.tests.functional import integrated_helpers

    # After nova's imports, which monkey patch with eventlet.
    instructions = bool(os.environ.get('BENCH_INSTRUCTIONS'))
    poll_ms = os.environ.get('BENCH_RPC_POLL_MS')
    if poll_ms:
        _poll_rpc_every(float(poll_ms) / 1000)
    else:
        _deliver_rpc_at_once()

    class Counter(object):
        """Statements and commits on orchestration tables."""

        def __init__(self):
            self.statements = 0
            self.commits = 0
            self.touched = set()

        def execute(self, conn, cursor, statement, *args):
            if 'orchestration_' in statement:
                self.statements += 1
                self.touched.add(id(conn))

        def commit(self, conn):
            if id(conn) in self.touched:
                self.touched.discard(id(conn))
                self.commits += 1

        def rollback(self, conn):
            self.touched.discard(id(conn))

    class BootBench(integrated_helpers._IntegratedTestBase):
        api_major_version = 'v2.1'
        microversion = 'latest'
        CAST_AS_CALL = False

        def setUp(self):
            self.flags(compute_driver='fake.MediumFakeDriver')
            super().setUp()
            self.flags(instances=-1, cores=-1, ram=-1, group='quota')
            if instructions:
                # A call lasts about 50 times as long under callgrind.
                self.flags(rpc_response_timeout=900, long_rpc_timeout=900)
            self._start_compute('host2')
            self._start_compute('host3')
            self.flavor_id = self._create_flavor(memory_mb=64, vcpu=1,
                                                 disk=1)
            self.counter = Counter()
            engine = api_db_api.get_engine()
            sa.event.listen(engine, 'before_cursor_execute',
                            self.counter.execute)
            sa.event.listen(engine, 'commit', self.counter.commit)
            sa.event.listen(engine, 'rollback', self.counter.rollback)

        def _post(self):
            server = self._build_server(flavor_id=self.flavor_id,
                                        networks='none')
            return self.api.post_server({'server': server})

        def _wait_active(self, count):
            self.notifier.wait_for_versioned_notifications(
                'instance.create.end', n_events=count, timeout=600)

        def _delete_all(self, servers):
            for server in servers:
                self.api.delete_server(server['id'])
            for server in servers:
                self._wait_until_deleted(server)
            self.notifier.reset()

        def test_boot(self):
            servers = []
            for _ in range(WARMUP):
                servers.append(self._post())
                self._wait_active(1)
                self.notifier.reset()
            self._delete_all(servers)
            if instructions:
                boots = int(os.environ['BENCH_BOOTS'])
                _callgrind('on')
                for _ in range(boots):
                    servers.append(self._post())
                    self._wait_active(1)
                    self.notifier.reset()
                _callgrind('off')
                out.update(boots=boots)
                return

            latencies, cpu_times, servers = [], [], []
            statements = self.counter.statements
            commits = self.counter.commits
            for _ in range(SEQUENTIAL):
                start = time.monotonic()
                cpu_start = time.process_time()
                servers.append(self._post())
                self._wait_active(1)
                latencies.append(time.monotonic() - start)
                cpu_times.append(time.process_time() - cpu_start)
                self.notifier.reset()
            per_boot = {
                'statements': (self.counter.statements - statements) /
                SEQUENTIAL,
                'commits': (self.counter.commits - commits) / SEQUENTIAL}
            self._delete_all(servers)

            throughputs = []
            for _ in range(BATCHES):
                start = time.monotonic()
                servers = [self._post() for _ in range(BATCH)]
                self._wait_active(BATCH)
                throughputs.append(BATCH / (time.monotonic() - start))
                self._delete_all(servers)
            out.update(latency_s=statistics.median(latencies),
                       cpu_s=statistics.median(cpu_times),
                       throughput_per_s=statistics.median(throughputs),
                       orchestration_statements_per_boot=per_boot[
                           'statements'],
                       orchestration_commits_per_boot=per_boot['commits'])

    result = testtools.TestResult()
    BootBench('test_boot').run(result)
    import nova
    out.update(nova_dir=os.path.dirname(nova.__file__),
               orchestration_used='nova.orchestration.engine' in sys.modules)
    for test, error in result.errors + result.failures:
        print(error, file=sys.stderr)
    return 0 if result.wasSuccessful() else 1


# -- parent ------------------------------------------------------------------

def run_child(tree, rpc_poll_ms=None, runs=2):
    """One child's result; a failed child is run again, once.

    nova's functional harness can fail one of 50 concurrent builds or
    deletes with "Can't upgrade a READER transaction to a WRITER
    mid-transaction" (the resource tracker's compute node save), on the
    unpatched base as on the series; the child's test then fails. Its
    output above says why.
    """
    env = dict(os.environ, PYTHONPATH=tree,
               OS_NOVA_DISABLE_EVENTLET_PATCHING='False')
    if rpc_poll_ms is not None:
        env['BENCH_RPC_POLL_MS'] = str(rpc_poll_ms)
    for run in range(1, runs + 1):
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), '--child'],
            cwd=tree, env=env, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
        progress('the run in %s failed (exit %d, run %d of %d)' %
                 (tree, proc.returncode, run, runs))
    raise SystemExit('the benchmark failed in %s' % tree)


def _callgrind_total(path):
    with open(path) as f:
        for line in f:
            if line.startswith('totals:'):
                return int(line.split()[1])
    raise SystemExit('no totals in %s' % path)


def instructions(base, patched, boots=INSTRUMENTED):
    """Instructions per boot of both trees, counted by callgrind."""
    trees = [('base', base), ('patched', patched)]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for name, tree in trees:
            progress('%s: booting %d servers under callgrind' % (
                name, boots))
            env = dict(os.environ, PYTHONPATH=tree, BENCH_INSTRUCTIONS='1',
                       BENCH_BOOTS=str(boots),
                       OS_NOVA_DISABLE_EVENTLET_PATCHING='False')
            out = os.path.join(tmp, name + '.callgrind')
            procs.append((name, tree, out, subprocess.Popen(
                ['valgrind', '--tool=callgrind', '--instr-atstart=no',
                 '--callgrind-out-file=' + out, sys.executable,
                 os.path.abspath(__file__), '--child'],
                cwd=tree, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True)))
        summary = {}
        for name, tree, out, proc in procs:
            stdout, _ = proc.communicate()
            results = [json.loads(line[len(RESULT_PREFIX):])
                       for line in stdout.splitlines()
                       if line.startswith(RESULT_PREFIX)]
            if proc.returncode or not results:
                raise SystemExit('the %s child failed under callgrind '
                                 '(exit %d)' % (name, proc.returncode))
            _check_tree(name, tree, results[0])
            summary[name] = {'instructions_per_boot': _callgrind_total(out) /
                             results[0]['boots']}
    summary['instructions_ratio'] = (
        summary['patched']['instructions_per_boot'] /
        summary['base']['instructions_per_boot'])
    print('Boot benchmark: CPU instructions per boot (callgrind, the whole '
          'process, %d boots one at a time after %d warm-up boots)' % (
              boots, WARMUP))
    for name, _ in trees:
        print('%-10s %18.3f G' % (
            name, summary[name]['instructions_per_boot'] / 1e9))
    print('instructions ratio %.3f' % summary['instructions_ratio'])
    print(json.dumps(summary, sort_keys=True))
    return 0


def _check_tree(name, tree, result):
    """Each child must have run the nova it was given."""
    expected = os.path.join(os.path.realpath(tree), 'nova')
    used = result['orchestration_used']
    if (os.path.realpath(result['nova_dir']) != expected or
            used != (name == 'patched')):
        raise SystemExit('the %s run used %s (orchestration used: %s)' %
                         (name, result['nova_dir'], used))


def parent(base, patched, rpc_poll_ms=None, rounds=ROUNDS):
    runs = {'base': [], 'patched': []}
    trees = [('base', base), ('patched', patched)]
    for rnd in range(rounds):
        for name, tree in (trees if rnd % 2 == 0 else trees[::-1]):
            progress('round %d: %s' % (rnd + 1, name))
            result = run_child(tree, rpc_poll_ms)
            _check_tree(name, tree, result)
            runs[name].append(result)
            progress('round %d: %s: latency %.1f ms, CPU %.1f ms per boot, '
                     '%.2f boots/s' % (rnd + 1, name,
                                       result['latency_s'] * 1000,
                                       result['cpu_s'] * 1000,
                                       result['throughput_per_s']))

    def median(name, key):
        return statistics.median(run[key] for run in runs[name])

    summary = {}
    for name in runs:
        summary[name] = {
            'latency_ms': median(name, 'latency_s') * 1000,
            'cpu_ms_per_boot': median(name, 'cpu_s') * 1000,
            'throughput_per_s': median(name, 'throughput_per_s')}
    summary['latency_ratio'] = (summary['patched']['latency_ms'] /
                                summary['base']['latency_ms'])
    summary['cpu_ratio'] = (summary['patched']['cpu_ms_per_boot'] /
                            summary['base']['cpu_ms_per_boot'])
    summary['throughput_ratio'] = (
        summary['patched']['throughput_per_s'] /
        summary['base']['throughput_per_s'])
    summary['rpc_poll_ms'] = rpc_poll_ms
    for key in ('statements', 'commits'):
        summary['orchestration_%s_per_boot' % key] = median(
            'patched', 'orchestration_%s_per_boot' % key)

    delivery = ('delivered at once' if rpc_poll_ms is None
                else 'polled every %g ms' % rpc_poll_ms)
    print('Boot benchmark: nova functional harness (fake RPC %s), %d rounds '
          'of %d boots one at a time and %d batches of %d'
          % (delivery, rounds, SEQUENTIAL, BATCHES, BATCH))
    print('%-10s %18s %18s %22s' % ('', 'median latency ms', 'CPU ms per boot',
                                    'throughput boots/s'))
    for name in ('base', 'patched'):
        print('%-10s %18.1f %18.1f %22.2f' % (
            name, summary[name]['latency_ms'],
            summary[name]['cpu_ms_per_boot'],
            summary[name]['throughput_per_s']))
    print('latency ratio %.3f (target <= %.2f: %s)' % (
        summary['latency_ratio'], TARGETS['latency_ratio'],
        'met' if summary['latency_ratio'] <= TARGETS['latency_ratio']
        else 'missed'))
    print('throughput ratio %.3f (target >= %.2f: %s)' % (
        summary['throughput_ratio'], TARGETS['throughput_ratio'],
        'met' if summary['throughput_ratio'] >= TARGETS['throughput_ratio']
        else 'missed'))
    print('CPU time ratio %.3f (no target: the part of the latency that '
          'waits for nothing)' % summary['cpu_ratio'])
    print('orchestration per boot: %.1f SQL statements, %.1f commits' % (
        summary['orchestration_statements_per_boot'],
        summary['orchestration_commits_per_boot']))
    print(json.dumps(summary, sort_keys=True))
    return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--child', action='store_true')
    parser.add_argument('--base')
    parser.add_argument('--patched')
    parser.add_argument('--rpc-poll-ms', type=float)
    parser.add_argument('--rounds', type=int, default=ROUNDS)
    parser.add_argument('--instructions', action='store_true')
    parser.add_argument('--boots', type=int, default=INSTRUMENTED)
    args = parser.parse_args()
    if args.child:
        out = {}
        code = child(out)
        if code == 0:
            print(RESULT_PREFIX + json.dumps(out), flush=True)
        return code
    if args.instructions:
        return instructions(args.base, args.patched, args.boots)
    return parent(args.base, args.patched, args.rpc_poll_ms, args.rounds)


if __name__ == '__main__':
    sys.exit(main())
