"""Kill points of tools/chaos, inside the cloud's conductors and computes.

tools/chaos arms one point at a time by writing ``arm.json`` into the
directory named by CHAOS_DIR: ``{"service": "conductor" | "compute",
"stage": NAME, "phase": PHASE, "delay": SECONDS}``. The first process of
that service to reach the point takes the arm (an atomic rename, so one
process only), appends the hit to ``hits.jsonl`` and SIGKILLs its whole
process group: the service dies there, with no clean-up, as on a power
loss. With a delay (phase ``mid``) the kill comes that long after the
stage started (``before``, or ``before-claim`` on a compute), at
whatever point it has then reached.

Conductor points are the stages of every registered flow: ``before``
(its start is committed, nothing done yet), ``after`` (it did everything
but its end is not committed), ``revert-before`` and ``revert-after``
(the same around its revert) and ``retry`` (a retry controller choosing
the next attempt). Compute points are named after the host build's
steps (see install_compute).

Nothing here changes what nova does until a point fires.
"""

import functools
import json
import os
import signal
import threading
import time

DIR = os.environ.get('CHAOS_DIR')
SERVICE = None
# Where a stage starts: the timer of a ``mid`` point starts there.
STARTS = ('before', 'before-claim')


def _armed():
    try:
        with open(os.path.join(DIR, 'arm.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _kill():
    os.killpg(os.getpgrp(), signal.SIGKILL)


def point(stage, phase):
    """Die here if this point is armed for this service."""
    if not DIR:
        return
    arm = _armed()
    if (not arm or arm.get('service') != SERVICE or
            arm.get('stage') != stage or
            arm.get('phase') not in (phase, 'mid' if phase in STARTS
                                     else None)):
        return
    taken = os.path.join(DIR, 'taken-%d.json' % os.getpid())
    try:
        os.rename(os.path.join(DIR, 'arm.json'), taken)
    except OSError:
        return  # another process took it first
    delay = float(arm.get('delay') or 0) if arm['phase'] == 'mid' else 0
    hit = dict(arm, pid=os.getpid(), host=os.environ.get('CHAOS_HOST'),
               at=time.time())
    with open(os.path.join(DIR, 'hits.jsonl'), 'a') as f:
        f.write(json.dumps(hit) + '\n')
        f.flush()
        os.fsync(f.fileno())
    if delay:
        timer = threading.Timer(delay, _kill)
        timer.daemon = True
        timer.start()
    else:
        _kill()


def _around(func, stage, before, after):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        point(stage, before)
        result = func(*args, **kwargs)
        if after:
            point(stage, after)
        return result
    return wrapper


def install_conductor():
    """Wrap the execute and revert of every registered flow's stages."""
    global SERVICE
    SERVICE = 'conductor'
    # The flows register themselves when imported.
    from nova.orchestration.flows import boot  # noqa: F401
    from nova.orchestration import task

    for key in task.definitions():
        for stage in task.lookup(*key).stages:
            item = stage.item
            if getattr(item, '_chaos', False):
                continue
            item._chaos = True
            for method, before, after in (
                    ('execute', 'before', 'after'),
                    ('execute_again', 'before', 'after'),
                    ('first', 'before', 'after'),
                    ('next', 'retry', None),
                    ('revert', 'revert-before', 'revert-after')):
                func = getattr(item, method, None)
                if func is not None:
                    setattr(item, method,
                            _around(func, item.name, before, after))


def install_compute():
    """Points of the host build, named after what it has done so far.

    ``before-claim`` (the build starts, nothing claimed), ``claimed``
    (resources claimed on the host), ``networks`` (ports allocated and
    bound), ``block-devices`` (volumes attached), ``spawned`` (the guest
    runs, the instance is not ACTIVE yet); in the clean-up of a failed
    build, ``cleanup-networks`` (ports about to be unbound or deleted) and
    ``abort-claim`` (the claim about to be dropped); ``abort-begin`` (the
    host is asked to undo an aborted build, nothing undone yet), after
    which the undo reaches the two clean-up points.
    """
    global SERVICE
    SERVICE = 'compute'
    from nova.compute import manager
    from nova.compute import resource_tracker

    stage = 'build-on-host'
    cls = manager.ComputeManager
    cls._do_build_and_run_instance = _around(
        cls._do_build_and_run_instance, stage, 'before-claim', None)
    cls._build_resources = _around(
        cls._build_resources, stage, 'claimed', None)
    cls._build_networks_for_instance = _around(
        cls._build_networks_for_instance, stage, 'networks-begin',
        'networks')
    cls._prep_block_device = _around(
        cls._prep_block_device, stage, 'block-devices-begin',
        'block-devices')
    cls.abort_build = _around(cls.abort_build, stage, 'abort-begin', None)
    cls._cleanup_allocated_networks = _around(
        cls._cleanup_allocated_networks, stage, 'cleanup-networks', None)
    rt = resource_tracker.ResourceTracker
    rt.abort_instance_claim = _around(
        rt.abort_instance_claim, stage, 'abort-claim', None)
