"""tools/cloud (default mode): the patched nova in one process.

Run by ``tools/cloud`` with the python of .work/venv. It uses nova's
functional test harness as a library, as bench_boot.py does: SQLite
databases (API, cell0, cell1), oslo.messaging's fake transport, the real
placement application, nova's glance and neutron fixtures, the scheduler,
two conductors and two computes with the fake virt driver, on eventlet
as nova's functional tests run by default. nova-api's WSGI application is
served on a loopback port by eventlet's WSGI server in a green thread,
and openstacksdk talks to it over HTTP: it creates a flavor, boots a
batch of servers, waits for them, and the per-server stage timelines are
read from the orchestration tables. The servers are then deleted and
placement must hold no allocation.

Exit status 0 only if every server went ACTIVE, every flow succeeded and
nothing leaked.
"""

import argparse
import datetime
import faulthandler
import logging
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cloud_timeline  # noqa: E402

CONDUCTORS = ('cloud-conductor-1', 'cloud-conductor-2')
COMPUTES = ('cloud-compute-1', 'cloud-compute-2')
# The keystone stub of nova's API fixture reads these headers.
HEADERS = {'X-Auth-User': 'admin', 'X-Auth-Project-Id': 'admin',
           'X-Roles': 'admin,member,reader'}


def say(msg):
    print('cloud: %s' % msg, flush=True)


def _naive(value):
    if value is not None and value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return value


def cloud_test(count, out):
    # First: the package applies nova's monkey_patch (or poisons eventlet).
    from nova.tests.functional import integrated_helpers

    from nova import context as nova_context
    from nova.db.api import api as api_db_api
    from nova import objects
    # After nova's monkey_patch, so that their sockets are green.
    import cloud_client  # noqa: H306
    import eventlet
    import eventlet.wsgi

    class Cloud(integrated_helpers._IntegratedTestBase):
        api_major_version = 'v2.1'
        microversion = 'latest'
        ADMIN_API = True
        CAST_AS_CALL = False

        def _setup_conductor_service(self):
            first = None
            for host in CONDUCTORS:
                service = self.start_service('conductor', host=host)
                first = first or service
            return first

        def _setup_compute_service(self):
            return self._start_compute(COMPUTES[0])

        def setUp(self):
            self.flags(compute_driver='fake.MediumFakeDriver')
            super().setUp()
            self.flags(instances=-1, cores=-1, ram=-1, group='quota')
            for host in COMPUTES[1:]:
                self._start_compute(host)
            # nova-api on a loopback port, in a green thread.
            sock = eventlet.listen(('127.0.0.1', 0))
            server = eventlet.spawn(eventlet.wsgi.server, sock,
                                    self.api_fixture.app(), log_output=False)
            self.addCleanup(server.kill)
            self.api_url = 'http://127.0.0.1:%d' % sock.getsockname()[1]

        def _builds(self, ids):
            """compute_builds() of cloud_timeline, from nova's objects."""
            builds = {uuid: [] for uuid in ids}
            ctxt = nova_context.get_admin_context()
            cell = objects.CellMapping.get_by_uuid(
                ctxt, objects.InstanceMapping.get_by_instance_uuid(
                    ctxt, ids[0]).cell_mapping.uuid)
            with nova_context.target_cell(ctxt, cell) as cctxt:
                for uuid in ids:
                    for action in objects.InstanceActionList.\
                            get_by_instance_uuid(cctxt, uuid):
                        for event in objects.InstanceActionEventList.\
                                get_by_action(cctxt, action.id):
                            if event.event != (
                                    'compute__do_build_and_run_instance'):
                                continue
                            builds[uuid].append({
                                'start_time': _naive(event.start_time),
                                'finish_time': _naive(event.finish_time),
                                'result': event.result,
                                'host': event.host})
            return builds

        def _consumers(self):
            consumers = {}
            for rp in self.placement.get(
                    '/resource_providers').body['resource_providers']:
                allocations = self.placement.get(
                    '/resource_providers/%s/allocations' % rp['uuid'],
                    version='1.28').body['allocations']
                for consumer in allocations:
                    consumers.setdefault(consumer, []).append(rp['uuid'])
            return consumers

        def test_cloud(self):
            # Runs first of the cleanups: nova's services log INFO to
            # stdout as they stop, once the harness's log capture is gone.
            self.addCleanup(logging.disable, logging.INFO)
            problems = out['problems']
            say('nova-api on %s (SQLite, fake RPC, in-process placement; '
                'conductors %s; computes %s)' % (
                    self.api_url, ', '.join(CONDUCTORS),
                    ', '.join(COMPUTES)))
            client = cloud_client.Client(self.api_url, None,
                                         headers=HEADERS)
            client.setup(self.glance.image1['id'])
            say('booting %d servers with openstacksdk' % count)
            start = time.monotonic()
            ids = [client.create_server('cloud-%d' % (i + 1))['id']
                   for i in range(count)]
            final = client.wait_servers(ids, timeout=300)
            say('batch done in %.1f s' % (time.monotonic() - start))
            flows = cloud_timeline.load(api_db_api.get_engine(), ids)
            cloud_timeline.report_and_check(final, flows,
                                            self._builds(ids), problems)
            consumers = self._consumers()
            active = {s['id'] for s in final if s['status'] == 'ACTIVE'}
            wrong = {c: rps for c, rps in consumers.items()
                     if c not in active or len(rps) != 1}
            if wrong:
                problems.append('allocations before deletion: %s' % wrong)
            say('before deletion: %d consumers in placement, one provider '
                'each: %s' % (len(consumers), 'no' if wrong else 'yes'))
            client.delete_servers(ids, timeout=120)
            left = self._consumers()
            if left:
                problems.append('allocations left after deletion: %s' %
                                left)
            say('after deletion: %d allocations left in placement' %
                len(left))

    import testtools
    result = testtools.TestResult()
    Cloud('test_cloud').run(result)
    for test, error in result.errors + result.failures:
        # The last lines: the traceback (nova's captured logs come first).
        lines = str(error).splitlines()
        start = max(i for i, line in enumerate(lines)
                    if line.startswith('Traceback'))
        print('\n'.join(lines[start:]), flush=True)
        out['problems'].append('the cloud failed (see the traceback above)')
    return not out['problems']


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--count', type=int, default=8)
    parser.add_argument('--log', default=os.devnull,
                        help="where nova's own output goes")
    args = parser.parse_args()
    out = {'problems': []}
    # nova logs to stderr at the end of the run, after the harness's
    # logging fixture is gone; keep that, and the warnings of imports, in
    # the log file.
    stderr = os.dup(2)
    with open(args.log, 'wb') as log:
        os.dup2(log.fileno(), 2)
    # kill -USR1 dumps every thread's stack to the log.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        ok = cloud_test(args.count, out)
    finally:
        sys.stderr.flush()
        os.dup2(stderr, 2)
    for problem in out['problems']:
        say('FAIL: %s' % problem)
    say('PASS' if ok else 'FAIL')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
