"""tools/cloud --real: the patched nova as separate processes on loopback.

Run by ``tools/cloud --real`` with the python of .work/venv, after the
harness made sure PostgreSQL (or MariaDB) and RabbitMQ listen on loopback.
It starts placement and nova-api (WSGI apps on loopback ports), the
scheduler, two conductors and two computes with the fake virt driver, each
a process of its own, on databases and a RabbitMQ vhost of its own; glance
and neutron are stand-ins (cloud_stubs.py). With openstacksdk it boots a
batch of servers through the REST API, SIGKILLs the conductor seen running
one of their flows, waits for the other conductor to take its flows over
and every server to become ACTIVE, and prints the timelines. It then boots
one more server with a slow spawn, SIGKILLs the compute spawning it and
starts that compute again: the conductor waiting for the build asks the
restarted compute again, which builds the server. Last, it deletes the
servers and checks that placement holds no allocation left.

Exit status 0 only if every server went ACTIVE, a conductor was killed
in the middle of the batch and the other one finished its flows, the
server whose compute was killed went ACTIVE on that compute, and nothing
leaked. Everything it started is stopped and its databases and
vhost dropped at the end, also on failure or Ctrl-C.
"""

import argparse
import base64
import concurrent.futures
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
import uuid

import sqlalchemy as sa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cloud_client  # noqa: E402
import cloud_stubs  # noqa: E402
import cloud_timeline  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
WORK = REPO / '.work'
CLOUD = WORK / 'cloud'
LOGS = WORK / 'logs' / 'cloud'
# The process ids of a run, to stop what a run killed itself left behind.
PIDS = WORK / 'cloud.pids'
NOVA_TREE = WORK / 'nova'
BIN = pathlib.Path(sys.executable).parent
HERE = pathlib.Path(__file__).resolve().parent

PREFIX = 'cloud_'
DATABASES = ('nova_api', 'nova_cell0', 'nova_cell1', 'placement')
VHOST = 'cloud_nova'
CONDUCTORS = ('cloud-conductor-1', 'cloud-conductor-2')
COMPUTES = ('cloud-compute-1', 'cloud-compute-2')
# While this file exists, the computes' spawns wait (cloud_driver.py).
SLOW_SPAWN = CLOUD / 'slow-spawn'
# How soon a conductor notices that a compute stopped answering a call.
RPC_TIMEOUT = 10
DB_URLS = {
    'postgresql': 'postgresql+psycopg2://openstack_citest:openstack_citest@'
                  '127.0.0.1:5432/%s',
    'mysql': 'mysql+pymysql://openstack_citest:openstack_citest@'
             '127.0.0.1:3306/%s?charset=utf8',
}
ADMIN_DB = {'postgresql': 'postgres', 'mysql': 'mysql'}
# Batches booted at most until a flow is seen RUNNING, to kill its owner.
BATCHES = 3
# Short leases and sweeps: the survivor takes the flows of the killed
# conductor over a few seconds after their leases expired.
LEASE = 6


def use_workspace(name):
    """Run in a workspace of its own: directory, logs, databases, vhost.

    Runs in different workspaces (tools/test's tools/chaos --quick and a
    full tools/chaos run) can then go on side by side.
    """
    global CLOUD, LOGS, PIDS, PREFIX, VHOST, SLOW_SPAWN
    CLOUD = WORK / name
    LOGS = WORK / 'logs' / name
    PIDS = WORK / ('%s.pids' % name)
    PREFIX = name.replace('-', '_') + '_'
    VHOST = PREFIX + 'nova'
    SLOW_SPAWN = CLOUD / 'slow-spawn'


def say(msg):
    print('cloud: %s' % msg, flush=True)


class CloudError(Exception):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def db_url(kind, name):
    return DB_URLS[kind] % name


class Databases(object):
    """The cloud's own databases, created empty and dropped at the end."""

    def __init__(self, kind):
        self.kind = kind
        self.names = {db: PREFIX + db for db in DATABASES}
        self.admin = sa.create_engine(db_url(kind, ADMIN_DB[kind]),
                                      isolation_level='AUTOCOMMIT')

    def url(self, db):
        return db_url(self.kind, self.names[db])

    def _drop(self, conn, name):
        if self.kind == 'postgresql':
            conn.execute(sa.text(
                'DROP DATABASE IF EXISTS %s WITH (FORCE)' % name))
        else:
            conn.execute(sa.text('DROP DATABASE IF EXISTS %s' % name))

    def create(self):
        with self.admin.connect() as conn:
            for name in self.names.values():
                self._drop(conn, name)
                conn.execute(sa.text('CREATE DATABASE %s' % name))

    def drop(self):
        with self.admin.connect() as conn:
            for name in self.names.values():
                self._drop(conn, name)
        self.admin.dispose()


def rabbitmqctl(*args, check=True):
    return subprocess.run(['rabbitmqctl', '-q'] + list(args), check=check,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


class Cloud(object):
    def __init__(self, db_kind, count):
        self.count = count
        self.dbs = Databases(db_kind)
        self.procs = {}
        self.ports = {name: free_port() for name in (
            'api', 'placement', 'glance', 'neutron')}
        self.vhost = False

    # -- configuration -------------------------------------------------------

    def write_config(self):
        shutil.rmtree(CLOUD, ignore_errors=True)
        for sub in ('placement', 'state', 'instances', 'locks'):
            (CLOUD / sub).mkdir(parents=True)
        shutil.rmtree(LOGS, ignore_errors=True)
        LOGS.mkdir(parents=True)
        port = self.ports
        token = ('auth_type = admin_token\ntoken = admin:admin\n'
                 'endpoint = http://127.0.0.1:%d\n')
        (CLOUD / 'nova.conf').write_text(
            '[DEFAULT]\n'
            'transport_url = rabbit://guest:guest@127.0.0.1:5672/%(vhost)s\n'
            'compute_driver = cloud_driver.SlowFakeDriver\n'
            'rpc_response_timeout = %(rpc_timeout)d\n'
            'state_path = %(cloud)s/state\n'
            'instances_path = %(cloud)s/instances\n'
            'periodic_fuzzy_delay = 0\n'
            'report_interval = 2\n'
            'service_down_time = 20\n'
            'debug = true\n'
            '[wsgi]\napi_paste_config = %(cloud)s/api-paste.ini\n'
            '[api_database]\nconnection = %(api)s\n'
            '[database]\nconnection = %(cell1)s\n'
            '[conductor]\nworkers = 1\n'
            '[scheduler]\nworkers = 1\n'
            'discover_hosts_in_cells_interval = -1\n'
            '[placement]\n%(placement)s'
            '[glance]\napi_servers = http://127.0.0.1:%(glance)d\n'
            'num_retries = 0\n'
            '[neutron]\n%(neutron)s'
            'endpoint_override = http://127.0.0.1:%(neutron_port)d\n'
            '[quota]\ninstances = -1\ncores = -1\nram = -1\n'
            '[oslo_concurrency]\nlock_path = %(cloud)s/locks\n'
            '[oslo_messaging_notifications]\ndriver = noop\n'
            '[orchestration]\nlease_duration = %(lease)d\n'
            'lease_renew_interval = 2\nsweep_interval = 2\n'
            'credential_keys = %(key)s\n' % dict(
                vhost=VHOST, cloud=CLOUD, api=self.dbs.url('nova_api'),
                cell1=self.dbs.url('nova_cell1'),
                placement=token % port['placement'],
                glance=port['glance'],
                neutron=token % port['neutron'],
                neutron_port=port['neutron'], lease=LEASE,
                rpc_timeout=RPC_TIMEOUT,
                key=base64.urlsafe_b64encode(os.urandom(32)).decode()))
        paste = (NOVA_TREE / 'etc' / 'nova' / 'api-paste.ini').read_text()
        if ' authtoken keystonecontext ' not in paste:
            raise CloudError('unexpected api-paste.ini: no authtoken')
        (CLOUD / 'api-paste.ini').write_text(paste.replace(
            ' authtoken keystonecontext ', ' cloudnoauth keystonecontext ') +
            '\n[filter:cloudnoauth]\n'
            'paste.filter_factory = cloud_wsgi:noauth_filter_factory\n')
        (CLOUD / 'api.conf').write_text('[DEFAULT]\nhost = cloud-api\n')
        for host in CONDUCTORS + ('cloud-scheduler',):
            (CLOUD / ('%s.conf' % host)).write_text(
                '[DEFAULT]\nhost = %s\n' % host)
        for host in COMPUTES:
            # A compute's node identity, which a restarted compute requires
            # and the fake driver does not write.
            state = CLOUD / 'state' / host
            state.mkdir()
            (state / 'compute_id').write_text(str(uuid.uuid4()))
            (CLOUD / ('%s.conf' % host)).write_text(
                '[DEFAULT]\nhost = %s\nstate_path = %s\n' % (host, state))
        (CLOUD / 'placement' / 'placement.conf').write_text(
            '[DEFAULT]\ndebug = true\n'
            '[api]\nauth_strategy = noauth2\n'
            '[placement_database]\nconnection = %s\n' %
            self.dbs.url('placement'))

    # -- processes -----------------------------------------------------------

    def start(self, name, cmd, env=None):
        log = open(LOGS / ('%s.log' % name), 'ab')
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=dict(os.environ, **(env or {})),
            start_new_session=True, cwd=str(CLOUD))
        log.close()
        self._record_pids()

    def _record_pids(self):
        PIDS.write_text(''.join('%d\n' % p.pid
                                for p in self.procs.values()))

    @staticmethod
    def stop_leftovers():
        """Stop the services of a previous run that did not tear down."""
        if not PIDS.exists():
            return
        for pid in PIDS.read_text().split():
            try:
                cmdline = pathlib.Path('/proc/%s/cmdline' % pid).read_bytes()
            except OSError:
                continue
            if str(HERE).encode() in cmdline or str(CLOUD).encode() in (
                    cmdline):
                say('stopping pid %s, left over by a previous run' % pid)
                try:
                    os.killpg(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        PIDS.unlink()

    def nova_service(self, binary, host):
        # nova-compute with the driver of cloud_driver.py.
        cmd = ([str(BIN / 'python'), str(HERE / 'cloud_compute.py')]
               if binary == 'nova-compute' else [str(BIN / binary)])
        self.start(host, cmd + ['--config-file', str(CLOUD / 'nova.conf'),
                                '--config-file',
                                str(CLOUD / ('%s.conf' % host))],
                   env={'CLOUD_SLOW_SPAWN': str(SLOW_SPAWN)})

    def manage(self, *args, tool='nova-manage', conf=None):
        conf = conf or CLOUD / 'nova.conf'
        with open(LOGS / 'manage.log', 'ab') as log:
            log.write(('$ %s %s\n' % (tool, ' '.join(args))).encode())
            log.flush()
            proc = subprocess.run(
                [str(BIN / tool), '--config-file', str(conf)] + list(args),
                stdout=subprocess.PIPE, stderr=log, cwd=str(CLOUD))
            log.write(proc.stdout)
        if proc.returncode:
            raise CloudError('%s %s failed (exit %d), see %s' % (
                tool, ' '.join(args), proc.returncode, LOGS / 'manage.log'))
        return proc.stdout.decode()

    def check_alive(self):
        for name, proc in self.procs.items():
            if name != self.killed and proc.poll() is not None:
                raise CloudError('%s exited with status %s, see %s' % (
                    name, proc.returncode, LOGS / ('%s.log' % name)))

    def stop_all(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def wait_http(self, port, what, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                urllib.request.urlopen('http://127.0.0.1:%d/' % port,
                                       timeout=2).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.3)
        raise CloudError('%s does not answer on port %d' % (what, port))

    # -- the run -------------------------------------------------------------

    killed = None

    def provision(self):
        self.stop_leftovers()
        say('databases %s on %s, RabbitMQ vhost %s' % (
            ', '.join(sorted(self.dbs.names.values())), self.dbs.kind, VHOST))
        if self.dbs.kind == 'mysql':
            say("note: nova's DateTime columns hold whole seconds on "
                'MySQL/MariaDB: the timelines are to the second')
        self.dbs.create()
        rabbitmqctl('delete_vhost', VHOST, check=False)
        rabbitmqctl('add_vhost', VHOST)
        self.vhost = True
        rabbitmqctl('set_permissions', '-p', VHOST, 'guest', '.*', '.*', '.*')
        self.write_config()
        say('config in %s, logs in %s' % (CLOUD.relative_to(REPO),
                                          LOGS.relative_to(REPO)))
        self.manage('db', 'sync', tool='placement-manage',
                    conf=CLOUD / 'placement' / 'placement.conf')
        self.manage('api_db', 'sync')
        self.manage('cell_v2', 'map_cell0', '--database_connection',
                    self.dbs.url('nova_cell0'))
        self.manage('cell_v2', 'create_cell', '--name', 'cell1')
        self.manage('db', 'sync')

    def start_services(self):
        py = str(BIN / 'python')
        self.start('stubs', [py, str(HERE / 'cloud_stubs.py'),
                             str(self.ports['glance']),
                             str(self.ports['neutron'])])
        self.start('placement', [py, str(HERE / 'cloud_wsgi.py'), 'placement',
                                 str(self.ports['placement'])],
                   env={'OS_PLACEMENT_CONFIG_DIR': str(CLOUD / 'placement')})
        self.start('nova-api', [py, str(HERE / 'cloud_wsgi.py'), 'nova',
                                str(self.ports['api'])],
                   env={'OS_NOVA_CONFIG_DIR': str(CLOUD),
                        'OS_NOVA_CONFIG_FILES':
                        'api-paste.ini;nova.conf;api.conf'})
        self.wait_http(self.ports['placement'], 'placement')
        self.nova_service('nova-scheduler', 'cloud-scheduler')
        for host in CONDUCTORS:
            self.nova_service('nova-conductor', host)
        for host in COMPUTES:
            self.nova_service('nova-compute', host)
        self.wait_http(self.ports['api'], 'nova-api')
        say('started: %s' % ', '.join(
            '%s (pid %d)' % (name, proc.pid)
            for name, proc in self.procs.items()))

    def wait_services(self, client):
        wanted = {('nova-conductor', h) for h in CONDUCTORS} | {
            ('nova-compute', h) for h in COMPUTES} | {
            ('nova-scheduler', 'cloud-scheduler')}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            self.check_alive()
            up = client.services_up()
            if wanted <= up:
                break
            time.sleep(1)
        else:
            raise CloudError('services not up after 120 s: %s' % sorted(
                wanted - up))
        while time.monotonic() < deadline:
            self.manage('cell_v2', 'discover_hosts')
            if len(client.hypervisors()) >= len(COMPUTES):
                return
            time.sleep(1)
        raise CloudError('the computes are not mapped to cell1')

    def running_flow(self, api_engine):
        """(conductor host, flow kind, stage) of a RUNNING flow, or None."""
        with api_engine.connect() as conn:
            row = conn.execute(sa.text(
                "SELECT f.owner, f.kind, s.name FROM orchestration_flows f "
                "JOIN orchestration_stages s ON s.flow_id = f.id "
                "WHERE f.state = 'RUNNING' AND s.state = 'RUNNING' "
                "AND f.owner IS NOT NULL")).first()
        return (cloud_timeline.host_of(row.owner), row.kind,
                row.name) if row else None

    def boot_and_kill(self, client, api_engine, first=0):
        """Post a batch; SIGKILL the first conductor seen running a flow."""
        say('booting %d servers (one POST /servers each, in parallel)' %
            self.count)
        victim = None
        with concurrent.futures.ThreadPoolExecutor(self.count) as pool:
            posts = [pool.submit(client.create_server,
                                 'cloud-%d' % (first + i + 1))
                     for i in range(self.count)]
            deadline = time.monotonic() + 60
            while victim is None and time.monotonic() < deadline:
                running = self.running_flow(api_engine)
                if running and running[0] in CONDUCTORS:
                    victim = running[0]
                    os.killpg(self.procs[victim].pid, signal.SIGKILL)
                    self.killed = victim
                    say('SIGKILLed %s (pid %d) while it ran stage %s of a '
                        '%s flow' % (victim, self.procs[victim].pid,
                                     running[2], running[1]))
                    break
                if all(p.done() for p in posts) and self._all_flows_done(
                        api_engine):
                    break
                time.sleep(0.005)
            servers = [p.result() for p in posts]
        return servers, victim

    def _all_flows_done(self, api_engine):
        with api_engine.connect() as conn:
            return not conn.execute(sa.text(
                "SELECT 1 FROM orchestration_flows WHERE state IN "
                "('PENDING', 'RUNNING', 'REVERTING')")).first()

    def run(self):
        started = time.monotonic()
        self.provision()
        self.start_services()
        client = cloud_client.Client(
            'http://127.0.0.1:%d' % self.ports['api'],
            'http://127.0.0.1:%d' % self.ports['placement'])
        self.wait_services(client)
        client.setup(cloud_stubs.IMAGE_ID)
        say('cloud up in %.0f s: nova-api on port %d, placement on %d' % (
            time.monotonic() - started, self.ports['api'],
            self.ports['placement']))
        api_engine = sa.create_engine(self.dbs.url('nova_api'))
        try:
            return self._batch(client, api_engine)
        finally:
            api_engine.dispose()

    def _batch(self, client, api_engine):
        t0 = time.monotonic()
        servers = []
        for _ in range(BATCHES):
            batch, victim = self.boot_and_kill(client, api_engine,
                                               first=len(servers))
            servers += batch
            if victim:
                break
            say('no flow was seen RUNNING during that batch')
        ids = [s['id'] for s in servers]
        problems = []
        if victim:
            survivor = [c for c in CONDUCTORS if c != victim][0]
            say('%s must take the flows of %s over once their leases (%d s) '
                'expire' % (survivor, victim, LEASE))
        else:
            problems.append('no flow was seen RUNNING: no conductor killed')
        final = client.wait_servers(ids, timeout=120,
                                    check=self.check_alive)
        say('batch done in %.1f s' % (time.monotonic() - t0))
        flows = cloud_timeline.load(api_engine, ids)
        cell1 = sa.create_engine(self.dbs.url('nova_cell1'))
        builds = cloud_timeline.compute_builds(cell1, ids)
        cell1.dispose()
        totals = cloud_timeline.report_and_check(final, flows, builds,
                                                 problems)
        if victim:
            taken = [f for f, first, last in totals['takeovers']
                     if first == victim and last != victim]
            if taken:
                say('%s finished %d flows %s had started' % (
                    survivor, len(taken), victim))
            else:
                problems.append('no flow of %s was taken over' % victim)
            problems += self.check_resumed_token(survivor)
        restarted, restart_problems = self.restart_a_building_compute(
            client, first=len(servers))
        problems += restart_problems
        problems += self.check_leaks(client, final + [restarted])
        for problem in problems:
            say('FAIL: %s' % problem)
        return not problems

    @staticmethod
    def check_resumed_token(survivor):
        """The survivor's resumed builds had the requester's token.

        nova-api sealed it with the cloud's [orchestration]credential_keys;
        the survivor says which requests it made with it once unsealed.
        """
        log = (LOGS / ('%s.log' % survivor)).read_text(errors='replace')
        say('%s acted for the requester with its unsealed token in %d '
            'stage executions of resumed flows' % (survivor, log.count(
                "made with the requester's token, stored sealed")))
        if "does not have the requester's token" in log:
            return ['%s resumed a build without the requester\'s token '
                    '(see %s)' % (survivor, LOGS / ('%s.log' % survivor))]
        return []

    def restart_a_building_compute(self, client, first):
        """SIGKILL the compute spawning a server, then start it again.

        The conductor's call gets no reply; it asks the host again until
        the restarted service answers and builds the server again.
        """
        SLOW_SPAWN.touch()
        server = client.create_server('cloud-%d' % (first + 1))
        say('booting %s with a slow spawn, to SIGKILL its compute while it '
            'spawns' % server['name'])
        cell1 = sa.create_engine(self.dbs.url('nova_cell1'))
        try:
            host = self._spawning_host(cell1, server['id'])
        finally:
            cell1.dispose()
        os.killpg(self.procs[host].pid, signal.SIGKILL)
        self.procs[host].wait()
        killed_at = time.monotonic()
        SLOW_SPAWN.unlink()
        say('SIGKILLed %s (pid %d) while it spawned %s; starting it again' %
            (host, self.procs[host].pid, server['name']))
        self.nova_service('nova-compute', host)
        final = client.wait_servers([server['id']], timeout=120,
                                    check=self.check_alive)[0]
        say('%s: %s on %s, %.1f s after the kill' % (
            final['name'], final['status'], final['host'],
            time.monotonic() - killed_at))
        problems = []
        if (final['status'], final['host']) != ('ACTIVE', host):
            problems.append('%s is %s on %s after its compute %s restarted' %
                            (final['name'], final['status'], final['host'],
                             host))
        return final, problems

    def _spawning_host(self, cell1, instance_uuid):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.check_alive()
            with cell1.connect() as conn:
                row = conn.execute(sa.text(
                    "SELECT host, task_state FROM instances WHERE uuid = :u"),
                    {'u': instance_uuid}).first()
            if row and row.host and row.task_state == 'spawning':
                return row.host
            time.sleep(0.1)
        raise CloudError('server %s was not seen spawning' % instance_uuid)

    def check_leaks(self, client, servers):
        problems = []
        active = [s['id'] for s in servers if s['status'] == 'ACTIVE']
        consumers = client.placement_consumers()
        extra = set(consumers) - set(active)
        if extra:
            problems.append('allocations of unknown consumers before '
                            'deletion: %s' % sorted(extra))
        for server_uuid in active:
            held = len(consumers.get(server_uuid, ()))
            if held != 1:
                problems.append('server %s holds allocations on %d '
                                'providers' % (server_uuid, held))
        say('before deletion: %d consumers in placement, one provider each: '
            '%s' % (len(consumers), 'yes' if not problems else 'no'))
        client.delete_servers([s['id'] for s in servers], timeout=90)
        left = client.placement_consumers()
        if left:
            problems.append('allocations left after deletion: %s' % left)
        with sa.create_engine(self.dbs.url('nova_api')).connect() as conn:
            for table in ('build_requests', 'orchestration_flows'):
                where = (" WHERE state IN ('PENDING', 'RUNNING', "
                         "'REVERTING')" if table == 'orchestration_flows'
                         else '')
                n = conn.execute(sa.text(
                    'SELECT count(*) FROM %s%s' % (table, where))).scalar()
                if n:
                    problems.append('%d rows left in %s' % (n, table))
        say('after deletion: %d allocations left in placement, no build '
            'request or active flow left: %s' % (
                len(left), 'yes' if not problems else 'no'))
        return problems

    def teardown(self, keep=False):
        self.stop_all()
        if PIDS.exists():
            PIDS.unlink()
        if keep:
            say('stopped every process; kept the databases (--keep)')
            return
        if self.vhost:
            rabbitmqctl('delete_vhost', VHOST, check=False)
        try:
            self.dbs.drop()
        except sa.exc.SQLAlchemyError as e:
            say('could not drop the databases: %s' % e)
        say('stopped every process, dropped the databases and the vhost')


def run_and_tear_down(cloud, run, keep):
    """run()'s result, or None if it failed; the cloud torn down."""
    try:
        return run()
    except CloudError as e:
        say('FAIL: %s' % e)
    except KeyboardInterrupt:
        say('interrupted')
    except Exception:
        traceback.print_exc()
        say('FAIL: unexpected error')
    finally:
        cloud.teardown(keep=keep)
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--count', type=int, default=6)
    parser.add_argument('--keep', action='store_true',
                        help='keep the databases for inspection')
    parser.add_argument('--db', choices=sorted(DB_URLS),
                        default='postgresql')
    args = parser.parse_args()

    def interrupted(signum, frame):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, interrupted)
    cloud = Cloud(args.db, args.count)
    ok = run_and_tear_down(cloud, cloud.run, args.keep)
    say('PASS' if ok else 'FAIL')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
