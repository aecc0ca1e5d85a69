"""The virt driver of the tools/cloud --real computes.

nova's fake driver with a stable node identity, whose spawn waits while
the file named by CLOUD_SLOW_SPAWN exists, so that a compute can be
killed in the middle of a build.

For tools/chaos (CHAOS_DIR set), its guests outlive the compute process
as a hypervisor's do: they are kept in ``guests-HOST.json`` in CHAOS_DIR,
which a restarted service reads again, and every spawn is appended to
``spawns.jsonl``, saying whether a guest of that instance already ran.
A spawn fails (a host failure: nova reschedules) while
``fail-spawn-UUID`` names that instance: once if the file is empty,
always if it holds ``always``.
"""

import json
import os
import threading
import time

from nova import exception
from nova.virt import fake

import chaos_points

CHAOS_DIR = os.environ.get('CHAOS_DIR')
_LOCK = threading.Lock()


class SlowFakeDriver(fake.FakeDriverWithoutFakeNodes):

    def init_host(self, host):
        super().init_host(host)
        for uuid, name in self._guests().items():
            self.instances[uuid] = fake.FakeInstance(
                name, fake.power_state.RUNNING, uuid)

    def _guests_file(self):
        return os.path.join(CHAOS_DIR, 'guests-%s.json' % self._host)

    def _guests(self):
        if not CHAOS_DIR:
            return {}
        try:
            with open(self._guests_file()) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _save_guests(self):
        if not CHAOS_DIR:
            return
        path = self._guests_file()
        with open(path + '.tmp', 'w') as f:
            json.dump({uuid: guest.name
                       for uuid, guest in self.instances.items()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + '.tmp', path)

    def _fail_spawn(self, instance):
        if not CHAOS_DIR:
            return
        flag = os.path.join(CHAOS_DIR, 'fail-spawn-%s' % instance.uuid)
        try:
            with open(flag) as f:
                always = f.read().strip() == 'always'
        except OSError:
            return
        if not always:
            os.unlink(flag)
        raise exception.RescheduledException(
            instance_uuid=instance.uuid,
            reason='tools/chaos: induced spawn failure on %s' % self._host)

    def spawn(self, context, instance, *args, **kwargs):
        flag = os.environ.get('CLOUD_SLOW_SPAWN')
        deadline = time.monotonic() + 60
        while flag and os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.2)
        self._fail_spawn(instance)
        with _LOCK:
            # A hypervisor's guest of that instance already runs: a
            # second guest of the same server (the fake driver would
            # replace the first one silently).
            existing = instance.uuid in self.instances
            super().spawn(context, instance, *args, **kwargs)
            self._save_guests()
            if CHAOS_DIR:
                with open(os.path.join(CHAOS_DIR, 'spawns.jsonl'), 'a') as f:
                    f.write(json.dumps({'uuid': instance.uuid,
                                        'host': self._host,
                                        'pid': os.getpid(),
                                        'existing': existing}) + '\n')
        chaos_points.point('build-on-host', 'spawned')

    def destroy(self, context, instance, *args, **kwargs):
        with _LOCK:
            super().destroy(context, instance, *args, **kwargs)
            self._save_guests()
