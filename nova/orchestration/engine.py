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

"""The engine: claims stored flows and runs, resumes or rolls them back.

Running and resuming are the same code path: load the flow's records,
decide from each stage's stored state what to do next, and continue. Every
decision is persisted before the engine acts on it, so a crash at any point
leaves a state from which any conductor can carry on.

This module holds the ``Engine`` and what a pass does with a claimed flow;
``forward`` runs its stages, ``revert`` reverts them and ``recorder``
makes every write of the pass.
"""

import os
import threading
import time

from oslo_db import exception as db_exc
from oslo_log import log as logging
from oslo_utils import uuidutils

import nova.conf
from nova import exception
from nova.orchestration import forward
from nova.orchestration import persistence
from nova.orchestration import recorder
from nova.orchestration import revert
from nova.orchestration import states
from nova.orchestration import task as task_mod
from nova import thread_pool_factory

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)


class Engine(object):
    """Claims flows, runs them on a pool and keeps their leases alive."""

    def __init__(self, owner=None, transient=None):
        """:param transient: values every run of this engine receives for
            the transient names of its flows, never stored.
        """
        self.owner = owner or '%s:%d:%s' % (
            CONF.host, os.getpid(), uuidutils.generate_uuid()[:8])
        self.transient = dict(transient or {})
        self._lock = threading.Lock()
        # flow uuid -> [fence, monotonic deadline of the running stage]
        self._held = {}
        # Set when the service stops: stages that wait give up (raising
        # OrchestrationEngineStopped) and their flows are handed over.
        self.stopping = threading.Event()

    @property
    def lease_seconds(self):
        return CONF.orchestration.lease_duration

    def start(self, context, flow_uuid, transient=None):
        """Claim a flow if nobody holds it and run it on the pool.

        :param transient: values for the flow's transient names, for this
            run only (a run resumed elsewhere does not have them).
        :returns: the future of the run, or None if the flow is finished or
            owned by a live conductor.
        """
        claim = self._claim(context, flow_uuid)
        if claim is None:
            return None
        return thread_pool_factory.spawn_on(
            thread_pool_factory.ExecutorType.ORCHESTRATION,
            self._run_held, context, claim, transient)

    def run(self, context, flow_uuid, transient=None):
        """Claim and run a flow in the calling thread; return its state.

        Returns None if the flow could not be claimed or was lost to
        another conductor while running.
        """
        claim = self._claim(context, flow_uuid)
        if claim is None:
            return None
        return self._run_held(context, claim, transient)

    def _claim(self, context, flow_uuid):
        """Claim a flow and hold it; None if it cannot be claimed.

        A flow that has not started yet starts in the claim's transaction.
        """
        claim = persistence.claim(context, flow_uuid, self.owner,
                                  self.lease_seconds, _first_stage)
        if claim is not None:
            with self._lock:
                self._held[flow_uuid] = [claim.fence, None]
        return claim

    def stop(self):
        """Let waiting stages give up and hand their flows over.

        The stage that gave up stays running in the flow's records, as
        after a crash, and the flow's lease expires at once: the next sweep
        of any conductor resumes it under the stage's crash policy.
        """
        self.stopping.set()

    def _run_held(self, context, claim, transient=None):
        fence = claim.fence
        try:
            return _run_claimed(self, context, claim, transient)
        except exception.OrchestrationLeaseLost as e:
            LOG.warning('Stopped working on a flow: %s', e)
            return None
        except exception.OrchestrationEngineStopped:
            LOG.info('Handing flow %s over as this service stops',
                     fence.uuid)
            try:
                persistence.hand_over(context, fence)
            except (exception.OrchestrationLeaseLost, db_exc.DBError) as e:
                LOG.warning('Flow %s is resumed when its lease expires: '
                            '%s', fence.uuid, e)
            return None
        except Exception:
            # The lease will expire and another sweep will resume the flow
            # from its last committed transition.
            LOG.exception('Flow %s stopped on an unexpected error; it will '
                          'be resumed when its lease expires.', fence.uuid)
            return None
        except BaseException as e:
            # The thread was killed or the process exits: the flow is
            # resumed as after a crash. A run on the pool would otherwise
            # stop without a word, its future holding the exception.
            LOG.warning('Flow %s stopped on %r; it will be resumed when its '
                        'lease expires.', fence.uuid, e)
            raise
        finally:
            with self._lock:
                # This engine may have claimed the flow again meanwhile (a
                # stage of this run overran its timeout): leave that run's
                # entry alone.
                if self._holds(fence):
                    del self._held[fence.uuid]

    def sweep(self, context):
        """Claim and start flows whose lease expired, up to free capacity.

        :returns: the futures of the runs started.
        """
        with self._lock:
            free = CONF.orchestration.pool_size - len(self._held)
        if free <= 0:
            return []
        futures = []
        # Flows this engine does not know are left to a conductor that
        # does, rather than ended in ERROR (rolling upgrades).
        for flow_uuid in persistence.claimable(context, free,
                                               task_mod.definitions()):
            future = self.start(context, flow_uuid)
            if future is not None:
                futures.append(future)
        return futures

    def renew_leases(self, context):
        """Renew the lease of every flow this engine runs.

        A flow whose current stage overran its timeout is left to expire, so
        that the sweep hands it to a conductor which applies the stage's
        crash policy; the overrunning thread's next write is then fenced out.
        """
        with self._lock:
            held = list(self._held.values())
        now = time.monotonic()
        for fence, deadline in held:
            if deadline is not None and now > deadline:
                LOG.warning('A stage of flow %s overran its timeout; its '
                            'lease is no longer renewed.', fence.uuid)
                continue
            try:
                persistence.renew(context, fence, self.lease_seconds)
            except exception.OrchestrationLeaseLost as e:
                LOG.warning('%s', e)
            except db_exc.DBError:
                LOG.exception('Could not renew the lease of flow %s',
                              fence.uuid)

    def _holds(self, fence):
        held = self._held.get(fence.uuid)
        return held is not None and held[0] == fence

    def _set_deadline(self, fence, seconds):
        with self._lock:
            if self._holds(fence):
                self._held[fence.uuid][1] = (
                    None if seconds is None else time.monotonic() + seconds)


def _first_stage(kind, version):
    """The name of the first stage of a known flow, else None."""
    flow = task_mod.lookup(kind, version)
    return None if flow is None else flow.stages[0].item.name


def _run_claimed(engine, context, claim, transient=None):
    """Run or resume a claimed flow from the records its claim read.

    :returns: the flow's state when this pass over it stops.
    """
    fence = claim.fence
    records = recorder.Recorder(
        context, fence, lambda: engine.lease_seconds,
        dict(engine.transient, **(transient or {})))
    try:
        records.load(claim.flow, claim.stages)
    except exception.OrchestrationFlowInvalid as e:
        reason = e
    except (ValueError, TypeError) as e:
        reason = records.invalid('undecodable record: %s' % e)
    else:
        reason = None
    if reason is not None:
        LOG.error('%s', reason)
        failure = persistence.failure_record(reason)
        # The first stage, if the claim started it, cannot run.
        finish = None if claim.started is None else {
            'id': claim.started, 'state': states.STAGE_FAILURE,
            'failure': persistence.encode(failure, 'failure', fence.uuid)}
        return records.end(states.ERROR, failure, finish)
    if claim.started is not None:
        records.claimed_start(claim.started)
    if records.state in states.FINISHED:
        return records.state
    reverter = revert.Reverter(context, records)
    if records.state == states.REVERTING:
        return reverter.revert_flow()
    return forward.Forward(context, records, reverter,
                           engine._set_deadline).run()
