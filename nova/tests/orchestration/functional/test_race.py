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

"""Conductors racing for the same flows, with leases taken over.

Several worker processes sweep one database with one second leases. Every
sweep of every worker claims from the same list of expired flows, so their
claims collide; and in some flows a stage overruns its one second timeout
on its first execution: its worker stops renewing the lease, another one
(or a later sweep of the same one) takes the flow over and runs the stage
again, and only then does the overrunning execution go on, so that its
late writes must be fenced out.

The flow (worker.RACE_KIND) is claim (transactional), port (RERUN, effect
keyed on the flow) and commit (transactional).
"""

import collections

from oslo_log import log as logging
import sqlalchemy as sa
import testtools

from nova.tests.orchestration.functional import base
from nova.tests.orchestration.functional import worker

LOG = logging.getLogger(__name__)
STAGES = ('claim', 'port', 'commit')


class _RaceTests(object):

    #: Flows, worker processes, and one flow in SLOW_EVERY whose stage
    #: (cycling through STAGES) overruns its timeout.
    FLOWS = 1000
    WORKERS = 4
    SLOW_EVERY = 50
    LEASE = 1

    def _create(self):
        uuids = []
        slow = 0
        for index in range(self.FLOWS):
            if index % self.SLOW_EVERY == 0:
                uuids += self.create_flows(
                    worker.RACE_KIND, slow=[STAGES[slow % len(STAGES)]])
                slow += 1
            else:
                uuids += self.create_flows(worker.RACE_KIND)
        return uuids

    def _count(self, table, column):
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(
                table.c.flow_uuid, table.c.stage,
                sa.func.count()).where(column).group_by(
                table.c.flow_uuid, table.c.stage))
            return {(r[0], r[1]): r[2] for r in rows}

    def test_racing_workers_run_every_stage_once(self):
        uuids = self._create()
        self.engine.dispose()
        procs = [self.spawn(['sweep', '--seconds', '150'],
                            lease=self.LEASE, owner='worker-%d' % n)
                 for n in range(self.WORKERS)]
        results = [self.wait(*proc) for proc in procs]
        for result in results:
            self.assertEqual(0, result.returncode, result.log[-6000:])

        with self.engine.connect() as conn:
            flows = {r.uuid: r for r in conn.execute(
                sa.select(base.FLOWS.c.id, base.FLOWS.c.uuid,
                          base.FLOWS.c.state,
                          base.FLOWS.c.lease_generation))}
            stage_rows = collections.Counter(
                (r.flow_id, r.name, r.state) for r in conn.execute(
                    sa.select(base.STAGES.c.flow_id, base.STAGES.c.name,
                              base.STAGES.c.state)))
        # No flow lost: every one finished, each stage recorded once.
        self.assertEqual(self.FLOWS, len(flows))
        states = collections.Counter(f.state for f in flows.values())
        self.assertEqual({'SUCCESS': self.FLOWS}, dict(states))
        self.assertEqual(self.FLOWS * len(STAGES), sum(stage_rows.values()))
        for flow in flows.values():
            for stage in STAGES:
                self.assertEqual(1, stage_rows[(flow.id, stage, 'SUCCESS')])

        # No stage ran twice: every effect committed exactly once (for
        # transactional stages whatever the number of executions, for the
        # RERUN stage thanks to its key), and a stage only executed again
        # in a flow that was taken over.
        effects = self._count(worker.EFFECTS, worker.EFFECTS.c.undone.is_(
            False))
        executions = self._count(worker.EVENTS,
                                 worker.EVENTS.c.call == 'execute')
        for flow_uuid in uuids:
            for stage in STAGES:
                self.assertEqual(1, effects.get((flow_uuid, stage)),
                                 (flow_uuid, stage))
                if flows[flow_uuid].lease_generation == 1:
                    self.assertEqual(1, executions[(flow_uuid, stage)],
                                     (flow_uuid, stage))

        takeovers = sum(1 for f in flows.values() if f.lease_generation > 1)
        reruns = sum(n - 1 for n in executions.values())
        started = sum(r.output['started'] for r in results)
        report = ('%d flows, %d workers: %d runs started, %d flows taken '
                  'over (lease_generation > 1), %d stage re-executions' % (
                      self.FLOWS, self.WORKERS, started, takeovers, reruns))
        LOG.info(report)
        self.addDetail('race', testtools.content.text_content(report))
        # Racing really happened: flows changed hands mid-run, at least
        # every flow with an overrunning stage.
        self.assertGreater(takeovers, 0, report)
        self.assertGreaterEqual(takeovers, self.FLOWS // self.SLOW_EVERY,
                                report)


class RaceTestPostgreSQL(base.PostgreSQLMixin, _RaceTests,
                         base._WorkerTestCase):
    pass
