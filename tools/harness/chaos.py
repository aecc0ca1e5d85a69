"""tools/chaos: SIGKILL the cloud's services at every point of a build.

Run by ``tools/chaos`` with the python of .work/venv, on the multi-process
cloud of ``tools/cloud --real`` (cloud_real.py): placement, nova-api, the
scheduler, two conductors and two computes, each a process of its own, on
PostgreSQL (or MariaDB) and RabbitMQ.

Each trial boots one server and arms one kill point (chaos_points.py): a
conductor dies before, inside or at the end of one stage of its flows or
of one stage's revert, or a compute dies at one step of the host build or
of its clean-up. The point is reached in one of five scenarios: a build
that succeeds (``ok``), one whose first host fails the spawn and which is
rescheduled (``reschedule``), one whose every host fails (``fail``), one
that no host fits (``novalidhost``), one whose server is deleted while
it spawns (``delete``), one whose build-instance flow an operator
aborts while it spawns (``abort``, with ``nova-manage orchestration
abort``) and one whose host dies before it starts the build and stays
down until the build went to the other host (``nooutcome``). The process
that reaches the point SIGKILLs its own process group there; tools/chaos
starts the service again at once, or for ``nooutcome`` once the server
is ACTIVE: the restarted host then takes the build calls that waited in
its queue, which must build nothing (counted as ``fenced``).

After each trial it waits for the server to settle and counts, against
the databases, placement and the computes' guests:

- stuck: the server still BUILD, or a flow not ended, after the deadline;
- leaked: allocations of an ACTIVE server elsewhere than on its host,
  allocations, guests or ports of an aborted server, and once the server is deleted any allocation, guest, BuildRequest,
  RequestSpec or InstanceMapping left without an instance;
- duplicated: more than one BDM row, instance row or allocated provider
  for the server;
- double_spawn: guests of the server on more than one host, or a spawn
  while a guest of it already ran (a build done again after its host
  restarted destroys the guest of the interrupted build first: that is
  a respawn, counted apart);
- unexpected: an outcome other than the scenario's (ACTIVE, ERROR or
  deleted), except the ERROR that nova itself gives in those cases
  (PARITY, and FAULT_PARITY by the server's fault), counted as parity
  with its reason.

The last output line is one JSON object: trials, kill_points (distinct
service x stage x phase points hit), missed (armed points no process
reached), stuck, leaked, duplicated, double_spawn, unexpected, and the
same per scenario. Exit status 0 only if every count but missed is 0.
"""

import argparse
import json
import os
import random
import signal
import sys
import time
import urllib.request

import sqlalchemy as sa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cloud_client  # noqa: E402
import cloud_neutron  # noqa: E402
import cloud_real  # noqa: E402
import cloud_stubs  # noqa: E402

say = cloud_real.say
# In the workspace of the run (main).
CHAOS = None
FORWARD_STAGES = ('schedule', 'start-instance-flows', 'create-instance',
                  'record-instance', 'delete-build-request', 'choose-host',
                  'accelerators', 'build-on-host')
# The stages a failed build-instance flow reverts, last first.
INSTANCE_REVERTS = ('build-on-host', 'accelerators', 'choose-host',
                    'delete-build-request', 'record-instance',
                    'create-instance')
# The host's undo of an aborted build (compute abort_build).
ABORT_STEPS = ('abort-begin', 'cleanup-networks', 'abort-claim')
COMPUTE_STEPS = ('before-claim', 'claimed', 'networks-begin', 'networks',
                 'block-devices-begin', 'block-devices', 'spawned')
EXPECTED = {'ok': {'ACTIVE'}, 'reschedule': {'ACTIVE'}, 'fail': {'ERROR'},
            'novalidhost': {'ERROR'}, 'delete': {'DELETED'},
            'abort': {'ERROR'}, 'nooutcome': {'ACTIVE'}}
# [orchestration]host_restart_timeout of the chaos cloud: long enough for
# a compute restarted at once, short enough for nooutcome to settle.
HOST_RESTART_TIMEOUT = 60
# What a restarted host logs for a build call moved to another host.
FENCED = 'Not building: the build was moved to another host'
# Outcomes that are nova's own (the same without build flows), accepted
# in place of the scenario's and counted apart, with the reason.
PARITY = {
    ('ok', 'compute', 'mid'):
        'the kill may land after the host started the build but before '
        'its claim; nova sets such builds ERROR at restart (bug 1833581, '
        'test_init_host requires it)',
}
for _stage_phase in ('revert-before', 'revert-after'):
    PARITY[('delete', 'conductor', _stage_phase)] = (
        "the killed conductor served the compute's calls of the delete, "
        'which fails and sets the server ERROR as in nova; deleting it '
        'again removes it')
# The same for a fault of nova's own, whatever the point (by the killed
# service and a part of the fault's message): a conductor killed while it
# served a compute's call (an object save) in that step of the host's
# build. The compute's call times out and nova ends the build as it does
# without build flows ("Build of instance <uuid> aborted: Failure
# prepping block device.").
FAULT_PARITY = {
    ('conductor', 'aborted: Failure prepping block device.'):
        "the killed conductor served the compute's call during block "
        'device preparation; the call timed out and nova aborts such a '
        'build (BuildAbortException), as without build flows',
}
SETTLE = 150
# nooutcome waits for host_restart_timeout before the build moves.
SETTLE_NO_OUTCOME = SETTLE + HOST_RESTART_TIMEOUT
HUGE_FLAVOR = {'name': 'chaos.huge', 'ram': 10 ** 7, 'vcpus': 1, 'disk': 1}


def kill_points():
    """(scenario, service, stage, phase) of every point tools/chaos arms."""
    points = []
    for stage in FORWARD_STAGES:
        for phase in ('before', 'after', 'mid'):
            points.append(('ok', 'conductor', stage, phase))
    points += [('ok', 'compute', 'build-on-host', step)
               for step in COMPUTE_STEPS]
    points.append(('ok', 'compute', 'build-on-host', 'mid'))
    for stage in ('build-on-host', 'accelerators'):
        for phase in ('revert-before', 'revert-after'):
            points.append(('reschedule', 'conductor', stage, phase))
    points.append(('reschedule', 'conductor', 'choose-host', 'retry'))
    points += [('reschedule', 'compute', 'build-on-host', step)
               for step in ('cleanup-networks', 'abort-claim')]
    for scenario in ('fail', 'delete', 'abort'):
        for stage in INSTANCE_REVERTS:
            for phase in ('revert-before', 'revert-after'):
                points.append((scenario, 'conductor', stage, phase))
    points.append(('delete', 'compute', 'build-on-host',
                   'cleanup-networks'))
    points += [('abort', 'compute', 'build-on-host', step)
               for step in ABORT_STEPS]
    for phase in ('revert-before', 'revert-after'):
        points.append(('novalidhost', 'conductor', 'schedule', phase))
    points.append(('nooutcome', 'compute', 'build-on-host', 'before-claim'))
    return points


# A short run (tools/test) covers each scenario and both services.
QUICK = (('ok', 'conductor', 'create-instance', 'after'),
         ('ok', 'conductor', 'build-on-host', 'mid'),
         ('ok', 'compute', 'build-on-host', 'networks'),
         ('ok', 'compute', 'build-on-host', 'spawned'),
         ('reschedule', 'conductor', 'build-on-host', 'revert-after'),
         ('reschedule', 'compute', 'build-on-host', 'abort-claim'),
         ('fail', 'conductor', 'create-instance', 'revert-before'),
         ('delete', 'conductor', 'build-on-host', 'revert-before'),
         ('abort', 'conductor', 'build-on-host', 'revert-before'),
         ('abort', 'compute', 'build-on-host', 'abort-begin'),
         ('novalidhost', 'conductor', 'schedule', 'revert-after'))


class ChaosCloud(cloud_real.Cloud):
    """The cloud of tools/cloud --real, with kill points in its services."""

    # Only these points ('scenario/service/stage/phase'), if set.
    only = None
    # Boot every server with a port on the network of cloud_neutron.py.
    with_ports = False

    def start(self, name, cmd, env=None):
        if name == 'stubs' and self.with_ports:
            # glance from cloud_stubs.py, neutron from cloud_neutron.py.
            super().start(name, cmd[:-1] + [str(cloud_real.free_port())],
                          env)
            name, cmd = 'neutron', [cmd[0], str(
                cloud_real.HERE / 'cloud_neutron.py'),
                str(self.ports['neutron'])]
        super().start(name, cmd, env)

    def neutron_ports(self):
        url = 'http://127.0.0.1:%d/v2.0/ports' % self.ports['neutron']
        with urllib.request.urlopen(url, timeout=10) as reply:
            return json.load(reply)['ports']

    def write_config(self):
        super().write_config()
        # [orchestration] is the last section of nova.conf.
        with open(cloud_real.CLOUD / 'nova.conf', 'a') as conf:
            conf.write('host_restart_timeout = %d\n' % HOST_RESTART_TIMEOUT)
        CHAOS.mkdir()

    def nova_service(self, binary, host):
        env = {'CLOUD_SLOW_SPAWN': str(cloud_real.SLOW_SPAWN),
               'CHAOS_DIR': str(CHAOS), 'CHAOS_HOST': host}
        if binary == 'nova-conductor':
            cmd = [str(cloud_real.BIN / 'python'),
                   str(cloud_real.HERE / 'cloud_conductor.py')]
        elif binary == 'nova-compute':
            cmd = [str(cloud_real.BIN / 'python'),
                   str(cloud_real.HERE / 'cloud_compute.py')]
        else:
            cmd = [str(cloud_real.BIN / binary)]
        self.start(host, cmd + [
            '--config-file', str(cloud_real.CLOUD / 'nova.conf'),
            '--config-file', str(cloud_real.CLOUD / ('%s.conf' % host))],
            env=env)

    # -- the run -------------------------------------------------------------

    def run(self, trials, quick, seed):
        started = time.monotonic()
        self.provision()
        self.start_services()
        self.client = client = cloud_client.Client(
            'http://127.0.0.1:%d' % self.ports['api'],
            'http://127.0.0.1:%d' % self.ports['placement'])
        self.wait_services(client)
        client.setup(cloud_stubs.IMAGE_ID)
        huge = client.conn.compute.find_flavor(HUGE_FLAVOR['name'])
        self.huge_flavor_id = (huge or client.conn.compute.create_flavor(
            **HUGE_FLAVOR)).id
        self.provider_names = {
            rp['uuid']: rp['name'] for rp in client._placement(
                '/resource_providers')['resource_providers']}
        say('cloud up in %.0f s' % (time.monotonic() - started))
        self.engines = {db: sa.create_engine(self.dbs.url(db))
                        for db in ('nova_api', 'nova_cell0', 'nova_cell1')}
        try:
            return self._trials(trials, quick, seed, started)
        finally:
            for engine in self.engines.values():
                engine.dispose()

    def _trials(self, trials, quick, seed, started):
        points = list(QUICK if quick else kill_points())
        if self.only:
            points = [p for p in points if '/'.join(p) in self.only]
            if not points:
                raise cloud_real.CloudError('no such point: %s' % ', '.join(
                    sorted(self.only)))
        rng = random.Random(seed)
        if not quick:
            rng.shuffle(points)
        trials = trials or (len(points) if quick or self.only else 300)
        plan = [points[i % len(points)] for i in range(trials)]
        totals = {key: 0 for key in EXPECTED_KEYS + ('parity',)}
        by_scenario = {}
        hit_points, missed, respawns, fenced = set(), [], 0, 0
        for number, point in enumerate(plan, 1):
            delay = round(rng.uniform(0.0, 0.6), 3)
            result = self.trial(number, point, delay)
            scenario = by_scenario.setdefault(point[0], dict(
                {key: 0 for key in totals}, trials=0, kill_points=set()))
            scenario['trials'] += 1
            respawns += result['respawns']
            fenced += result['fenced']
            if result['hit']:
                hit_points.add(point[1:])
                scenario['kill_points'].add(point[1:])
            else:
                missed.append('%s/%s/%s/%s' % point)
            for key in totals:
                totals[key] += len(result[key])
                scenario[key] += len(result[key])
                for problem in result[key]:
                    say('  %s: %s' % (key.upper(), problem))
        summary = dict(
            trials=len(plan), kill_points=len(hit_points),
            kill_points_by_service={
                service: len([p for p in hit_points if p[0] == service])
                for service in ('conductor', 'compute')},
            missed=len(missed), missed_points=sorted(set(missed)),
            respawns=respawns, fenced=fenced,
            seconds=round(time.monotonic() - started),
            scenarios={name: dict(s, kill_points=len(s['kill_points']))
                       for name, s in sorted(by_scenario.items())},
            **totals)
        return summary

    # -- one trial -----------------------------------------------------------

    def trial(self, number, point, delay):
        scenario, service, stage, phase = point
        t0 = time.monotonic()
        for stale in CHAOS.glob('fail-spawn-*'):
            stale.unlink()
        hits = self._hits()
        arm = {'service': service, 'stage': stage, 'phase': phase,
               'delay': delay}
        (CHAOS / 'arm.tmp').write_text(json.dumps(arm))
        os.replace(CHAOS / 'arm.tmp', CHAOS / 'arm.json')
        if scenario in ('delete', 'abort'):
            cloud_real.SLOW_SPAWN.touch()
        flavor = self.huge_flavor_id if scenario == 'novalidhost' else None
        server = self.client.create_server(
            'chaos-%d' % number, flavor_id=flavor,
            networks=([{'uuid': cloud_neutron.NETWORK_ID}]
                      if self.with_ports else 'none'))
        uuid = server['id']
        if scenario in ('reschedule', 'fail'):
            (CHAOS / ('fail-spawn-%s' % uuid)).write_text(
                'always' if scenario == 'fail' else '')
        victim = None
        # The host that died before its build stays down until then.
        hold = scenario == 'nooutcome'
        deadline = time.monotonic() + (SETTLE_NO_OUTCOME if hold
                                       else SETTLE)
        deleted = False
        while time.monotonic() < deadline:
            if hold:
                victim = victim or self._victim(hits)
            else:
                victim = victim or self._restart_victim(hits)
            if (scenario in ('delete', 'abort') and not deleted and
                    self._spawning(uuid)):
                if scenario == 'delete':
                    self.client.conn.compute.delete_server(uuid)
                else:
                    self._abort(uuid)
                deleted = True
                cloud_real.SLOW_SPAWN.unlink()
            status = self._status(uuid)
            if (status not in ('BUILD', None) or
                    status is None and scenario == 'delete') and (
                    self._all_flows_done(self.engines['nova_api'])):
                break
            time.sleep(0.3)
        else:
            status = self._status(uuid) or 'DELETED'
        if cloud_real.SLOW_SPAWN.exists():
            cloud_real.SLOW_SPAWN.unlink()
        fenced = 0
        if hold and victim:
            self._restart(victim)
            fenced = self._fenced(victim, uuid)
            # The next trial's scheduler must see both computes.
            self._wait_up(victim)
        victim = victim or self._restart_victim(hits)
        if (CHAOS / 'arm.json').exists():
            (CHAOS / 'arm.json').unlink()
        status = status or 'DELETED'
        result = {key: [] for key in EXPECTED_KEYS + ('parity',)}
        result['hit'] = victim is not None
        self._check_settled(uuid, status, scenario, point, result)
        self._check_deleted(uuid, status, result)
        result['respawns'] = max(0, len(self._spawns(uuid)) - 1)
        result['fenced'] = fenced
        say('trial %d: %s, %s killed at %s/%s%s -> %s in %.0f s, %d '
            'spawn(s)%s%s' % (
                number, scenario, victim or 'nobody', stage, phase,
                ' (+%.2f s)' % delay if phase == 'mid' else '', status,
                time.monotonic() - t0, len(self._spawns(uuid)),
                ', %d late call(s) fenced' % fenced if hold else '',
                '' if any(result[k] for k in EXPECTED_KEYS) else ', clean'))
        return result

    def _hits(self):
        path = CHAOS / 'hits.jsonl'
        return len(path.read_text().splitlines()) if path.exists() else 0

    def _restart_victim(self, seen):
        """The host the armed point killed, started again; or None."""
        host = self._victim(seen)
        if host:
            self._restart(host)
        return host

    def _victim(self, seen):
        """The host the armed point killed, left down; or None."""
        path = CHAOS / 'hits.jsonl'
        if not path.exists():
            return None
        lines = path.read_text().splitlines()
        if len(lines) <= seen:
            return None
        self.killed = json.loads(lines[-1])['host']
        return self.killed

    def _fenced(self, host, uuid, wait=60):
        """Build calls of the server a restarted host found moved.

        Waits until the host took at least one from its queue, or gives up
        after wait seconds.
        """
        log = cloud_real.LOGS / ('%s.log' % host)
        deadline = time.monotonic() + wait
        while True:
            count = sum(1 for line in log.read_text(
                errors='replace').splitlines()
                if FENCED in line and uuid in line)
            if count or time.monotonic() >= deadline:
                return count
            time.sleep(1)

    def _wait_up(self, host, wait=60):
        """Wait until the host's compute service is reported up."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if any(service.host == host and service.state == 'up'
                   for service in self.client.conn.compute.services(
                       binary='nova-compute')):
                return
            time.sleep(1)

    def _restart(self, host):
        """Start the killed host's service again."""
        proc = self.procs[host]
        try:
            proc.wait(30)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        binary = ('nova-conductor' if host in cloud_real.CONDUCTORS
                  else 'nova-compute')
        self.nova_service(binary, host)
        self.killed = None

    def _abort(self, uuid):
        """Abort the server's build-instance flow with nova-manage."""
        with self.engines['nova_api'].connect() as conn:
            flow = conn.execute(sa.text(
                "SELECT uuid FROM orchestration_flows WHERE instance_uuid = "
                ":u AND kind = 'build-instance'"), {'u': uuid}).scalar()
        self.manage('orchestration', 'abort', flow)

    def _spawning(self, uuid):
        with self.engines['nova_cell1'].connect() as conn:
            row = conn.execute(sa.text(
                'SELECT task_state FROM instances WHERE uuid = :u'),
                {'u': uuid}).first()
        return bool(row) and row.task_state == 'spawning'

    def _status(self, uuid):
        server = self.client.conn.compute.find_server(uuid,
                                                      ignore_missing=True)
        if server is None:
            return None
        if server.status == 'DELETED':
            return None
        return server.status

    def _fault(self, uuid):
        """The message of the server's fault, or None."""
        server = self.client.conn.compute.find_server(uuid,
                                                      ignore_missing=True)
        return ((server and server.fault) or {}).get('message')

    # -- counting ------------------------------------------------------------

    def _guests(self, uuid):
        """[host] of every guest of the server in the fake hypervisors."""
        hosts = []
        for path in CHAOS.glob('guests-*.json'):
            try:
                guests = json.loads(path.read_text())
            except ValueError:
                continue
            if uuid in guests:
                hosts.append(path.stem[len('guests-'):])
        return hosts

    def _spawns(self, uuid):
        path = CHAOS / 'spawns.jsonl'
        if not path.exists():
            return []
        return [s for s in map(json.loads, path.read_text().splitlines())
                if s['uuid'] == uuid]

    def _count(self, db, sql, uuid):
        with self.engines[db].connect() as conn:
            return conn.execute(sa.text(sql), {'u': uuid}).scalar()

    def _check_settled(self, uuid, status, scenario, point, result):
        label = '%s (%s/%s/%s/%s)' % ((uuid,) + point)
        if status == 'BUILD' or not self._all_flows_done(
                self.engines['nova_api']):
            result['stuck'].append('%s is %s after %d s, flows: %s' % (
                label, status, SETTLE, self._open_flows()))
            return
        reason = PARITY.get((scenario, point[1], point[3]))
        if status == 'ERROR' and not reason:
            fault = self._fault(uuid) or ''
            reason = next((why for (service, text), why in
                           FAULT_PARITY.items()
                           if service == point[1] and text in fault), None)
        if status not in EXPECTED[scenario]:
            if reason and status == 'ERROR':
                result['parity'].append('%s ended ERROR: %s' % (label,
                                                                reason))
            else:
                result['unexpected'].append('%s ended %s, expected %s' % (
                    label, status, '/'.join(sorted(EXPECTED[scenario]))))
        server = self.client.conn.compute.find_server(uuid,
                                                      ignore_missing=True)
        host = server.compute_host if server else None
        providers = self.client.placement_consumers().get(uuid, [])
        guests = self._guests(uuid)
        spawns = self._spawns(uuid)
        if len(guests) > 1 or any(s['existing'] for s in spawns):
            result['double_spawn'].append(
                '%s has guests on %s; spawns: %s' % (label, guests, spawns))
        if len(providers) > 1:
            result['duplicated'].append(
                '%s holds allocations on %d providers' % (
                    label, len(providers)))
        if status == 'ACTIVE':
            if [self.provider_names.get(p) for p in providers] != [host]:
                result['leaked'].append(
                    '%s is ACTIVE on %s with allocations on %s' % (
                        label, host, providers))
            if guests != [host]:
                result['unexpected'].append(
                    '%s is ACTIVE on %s with guests on %s' % (
                        label, host, guests))
        elif guests and status != 'ERROR':
            result['leaked'].append('%s is %s with guests on %s' % (
                label, status, guests))
        elif scenario == 'abort' and (guests or providers):
            result['leaked'].append(
                '%s was aborted; left: guests on %s, allocations on %s' % (
                    label, guests, providers))
        if self.with_ports:
            ports = [p['id'] for p in self.neutron_ports()
                     if p['device_id'] == uuid]
            if status == 'ACTIVE' and len(ports) != 1:
                result['duplicated' if ports else 'unexpected'].append(
                    '%s is ACTIVE with %d ports' % (label, len(ports)))
            if scenario == 'abort' and ports:
                result['leaked'].append('%s was aborted; left: ports %s' % (
                    label, ports))
        bdms = sum(self._count(db, 'SELECT count(*) FROM block_device_mapping'
                               ' WHERE instance_uuid = :u AND deleted = 0',
                               uuid) for db in ('nova_cell0', 'nova_cell1'))
        if bdms > 1:
            result['duplicated'].append('%s has %d BDM rows' % (label, bdms))
        rows = sum(self._count(db, 'SELECT count(*) FROM instances WHERE '
                               'uuid = :u AND deleted = 0', uuid)
                   for db in ('nova_cell0', 'nova_cell1'))
        if rows > 1:
            result['duplicated'].append('%s has %d instance rows' % (
                label, rows))

    def _check_deleted(self, uuid, status, result):
        if status != 'DELETED':
            self.client.delete_servers([uuid], timeout=90)
        left = []
        if self.client.placement_consumers().get(uuid):
            left.append('allocations')
        if self._guests(uuid):
            left.append('guests on %s' % self._guests(uuid))
        if self.with_ports and self.neutron_ports():
            # No other server is left: every port is this trial's.
            left.append('ports %s' % [p['id'] for p in self.neutron_ports()])
        if self._count('nova_api', 'SELECT count(*) FROM build_requests '
                       'WHERE instance_uuid = :u', uuid):
            left.append('a BuildRequest')
        mapped = self._count('nova_api', 'SELECT count(*) FROM '
                             'instance_mappings WHERE instance_uuid = :u',
                             uuid)
        instances = sum(self._count(db, 'SELECT count(*) FROM instances '
                                    'WHERE uuid = :u', uuid)
                        for db in ('nova_cell0', 'nova_cell1'))
        if mapped and not instances:
            left.append('an InstanceMapping without an instance')
        if self._count('nova_api', 'SELECT count(*) FROM request_specs '
                       'WHERE instance_uuid = :u', uuid) and not (
                           mapped and instances):
            left.append('a RequestSpec without an instance')
        if left:
            result['leaked'].append('server %s deleted, left: %s' % (
                uuid, ', '.join(left)))

    def _open_flows(self):
        with self.engines['nova_api'].connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(
                "SELECT kind, state, owner FROM orchestration_flows "
                "WHERE state IN ('PENDING', 'RUNNING', 'REVERTING')"))]


EXPECTED_KEYS = ('stuck', 'leaked', 'duplicated', 'double_spawn',
                 'unexpected')


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--trials', type=int)
    parser.add_argument('--quick', action='store_true',
                        help='the short run of tools/test: %d points' %
                        len(QUICK))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--points', metavar='S/SVC/STAGE/PHASE,...',
                        help='only these points (as missed_points names '
                        'them)')
    parser.add_argument('--keep', action='store_true',
                        help='keep the databases for inspection')
    parser.add_argument('--ports', action='store_true',
                        help='boot every server with a port (neutron '
                        'stand-in of cloud_neutron.py)')
    parser.add_argument('--db', choices=sorted(cloud_real.DB_URLS),
                        default='postgresql')
    args = parser.parse_args()

    def interrupted(signum, frame):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, interrupted)
    global CHAOS
    cloud_real.use_workspace('chaos-quick' if args.quick else 'chaos' + (
        '-ports' if args.ports else ''))
    CHAOS = cloud_real.CLOUD / 'chaos'
    cloud = ChaosCloud(args.db, 1)
    cloud.only = set(args.points.split(',')) if args.points else None
    cloud.with_ports = args.ports
    summary = cloud_real.run_and_tear_down(
        cloud, lambda: cloud.run(args.trials, args.quick, args.seed),
        args.keep)
    ok = summary is not None and not any(summary[k] for k in EXPECTED_KEYS)
    say('PASS' if ok else 'FAIL')
    print(json.dumps(summary if summary is not None else {'error': True},
                     sort_keys=True))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
