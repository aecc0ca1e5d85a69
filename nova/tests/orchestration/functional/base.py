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

"""Test cases that run the engine in worker processes on a real database.

The test process only creates the schema and the flows and reads the
records; every flow runs in ``python -m
nova.tests.orchestration.functional.worker`` processes, which is where the
crashes happen. Subclasses pick the database: a file SQLite database, or a
throwaway PostgreSQL database of oslo.db's opportunistic fixtures.
"""

import datetime
import os
import signal
import subprocess
import sys
from unittest import mock

import fixtures
from oslo_db.sqlalchemy import enginefacade
from oslo_db.sqlalchemy import test_fixtures
from oslo_serialization import jsonutils
from oslo_utils import timeutils
from oslo_utils import uuidutils
from oslotest import base
import sqlalchemy as sa

from nova.db.api import models as api_models
from nova.db import migration
from nova.tests.orchestration.functional import worker

FLOWS = api_models.OrchestrationFlow.__table__
STAGES = api_models.OrchestrationStage.__table__

# Seconds one worker process may take before the test gives up on it.
WORKER_TIMEOUT = 90


class WorkerResult(object):

    def __init__(self, returncode, output, log):
        self.returncode = returncode
        self.output = output
        self.log = log

    @property
    def killed(self):
        return self.returncode == -signal.SIGKILL


class _WorkerTestCase(base.BaseTestCase):
    """Runs workers against the database that self.url points at."""

    def setUp(self):
        super().setUp()
        self.tmp = self.useFixture(fixtures.TempDir()).path
        self.url, self.engine = self._database()
        self.addCleanup(self.engine.dispose)
        with mock.patch.object(migration, '_get_engine',
                               return_value=self.engine):
            migration.db_sync(database='api')
        worker.METADATA.create_all(self.engine)
        self._logs = 0

    def _database(self):
        raise NotImplementedError()

    # -- processes -----------------------------------------------------

    def _command(self, args, lease=60, owner=None, kill_at=None,
                 debug=False, max_stage_executions=None,
                 stage_rerun_backoff=None):
        cmd = [sys.executable, '-m', 'nova.tests.orchestration.functional.'
               'worker', '--connection', self.url, '--lease', str(lease)]
        if max_stage_executions:
            cmd += ['--max-stage-executions', str(max_stage_executions)]
        if stage_rerun_backoff is not None:
            cmd += ['--stage-rerun-backoff', str(stage_rerun_backoff)]
        if debug:
            cmd.append('--debug')
        if owner:
            cmd += ['--owner', owner]
        if kill_at:
            cmd += ['--kill-at', kill_at]
        return cmd + list(args)

    def spawn(self, args, **kwargs):
        """Start a worker; return (process, path of its log)."""
        self._logs += 1
        path = os.path.join(self.tmp, 'worker-%d.log' % self._logs)
        with open(path, 'wb') as log:
            proc = subprocess.Popen(
                self._command(args, **kwargs), stdout=subprocess.PIPE,
                stderr=log, env=dict(os.environ))
        self.addCleanup(self._reap, proc)
        return proc, path

    @staticmethod
    def _reap(proc):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def wait(self, proc, path):
        try:
            out, _ = proc.communicate(timeout=WORKER_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        with open(path, 'rb') as log:
            text = log.read().decode('utf-8', 'replace')
        lines = out.decode('utf-8', 'replace').strip().splitlines()
        output = jsonutils.loads(lines[-1]) if lines and lines[
            -1].startswith('{') else None
        return WorkerResult(proc.returncode, output, text)

    def worker(self, args, expect_kill=False, **kwargs):
        """Run a worker to its end; check that it died if it was to."""
        result = self.wait(*self.spawn(args, **kwargs))
        if expect_kill:
            self.assertTrue(result.killed, 'worker did not die by SIGKILL '
                            '(rc %s):\n%s' % (result.returncode,
                                              result.log[-6000:]))
        else:
            self.assertEqual(0, result.returncode,
                             'worker failed:\n%s' % result.log[-6000:])
        return result

    # -- records -------------------------------------------------------

    def create_flows(self, kind, count=1, fail=None, slow=()):
        now = timeutils.utcnow()
        uuids = [uuidutils.generate_uuid() for _ in range(count)]
        rows = [dict(uuid=u, kind=kind, version=1, state='PENDING',
                     inputs=jsonutils.dumps({'flow_uuid': u, 'fail': fail,
                                             'slow': list(slow)}),
                     lease_expires_at=now, lease_generation=0,
                     created_at=now) for u in uuids]
        with self.engine.begin() as conn:
            conn.execute(FLOWS.insert(), rows)
        return uuids

    def expire_lease(self, flow_uuid):
        past = timeutils.utcnow() - datetime.timedelta(days=1)
        with self.engine.begin() as conn:
            conn.execute(FLOWS.update().where(
                FLOWS.c.uuid == flow_uuid).values(lease_expires_at=past))

    def flow(self, flow_uuid):
        with self.engine.connect() as conn:
            return conn.execute(FLOWS.select().where(
                FLOWS.c.uuid == flow_uuid)).one()

    def stages(self, flow_uuid):
        """(name, attempt, state) of the flow's stage rows."""
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                sa.select(STAGES.c.name, STAGES.c.attempt,
                          STAGES.c.state).select_from(
                    STAGES.join(FLOWS)).where(
                    FLOWS.c.uuid == flow_uuid).order_by(
                    STAGES.c.position, STAGES.c.attempt))]

    def events(self, flow_uuid):
        """(call, stage, result) of every execute and revert, in order."""
        with self.engine.connect() as conn:
            return [(r.call, r.stage, jsonutils.loads(r.result))
                    for r in conn.execute(worker.EVENTS.select().where(
                        worker.EVENTS.c.flow_uuid == flow_uuid).order_by(
                        worker.EVENTS.c.id))]

    def effects(self, flow_uuid):
        """{stage: [undone, ...]} of the committed side effects."""
        found = {}
        with self.engine.connect() as conn:
            for r in conn.execute(worker.EFFECTS.select().where(
                    worker.EFFECTS.c.flow_uuid == flow_uuid).order_by(
                    worker.EFFECTS.c.id)):
                found.setdefault(r.stage, []).append(bool(r.undone))
        return found


class SQLiteMixin(object):
    """A file SQLite database in the test's temporary directory."""

    def _database(self):
        url = 'sqlite:///%s' % os.path.join(self.tmp, 'api.db')
        return url, sa.create_engine(url)


class PostgreSQLMixin(test_fixtures.OpportunisticDBTestMixin):
    """A throwaway database on the opportunistic PostgreSQL server."""

    FIXTURE = test_fixtures.PostgresqlOpportunisticFixture

    def _database(self):
        engine = enginefacade.writer.get_engine()
        return engine.url.render_as_string(hide_password=False), engine
