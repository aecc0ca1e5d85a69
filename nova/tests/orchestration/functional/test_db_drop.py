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

"""The database drops the engine's connections while a flow runs.

The flow (worker.DROP_KIND) has three stages. ``first`` and ``last``
terminate, with pg_terminate_backend from a connection of their own, every
other connection to the database: the pooled connections of the engine are
dead when it records their outcome. ``txn`` is transactional and
terminates the connection of the engine's own open transaction (on its
first execution only), so the statements recording its success hit a
dropped connection and the whole stage is retried.
"""

from nova.tests.orchestration.functional import base
from nova.tests.orchestration.functional import worker


class DBDropTestPostgreSQL(base.PostgreSQLMixin, base._WorkerTestCase):

    def test_flow_survives_dropped_connections(self):
        flow_uuid, = self.create_flows(worker.DROP_KIND)
        # Hold no connection of our own while the worker kills them all.
        self.engine.dispose()

        result = self.worker(['run', flow_uuid], owner='only', debug=True)

        self.assertEqual('SUCCESS', result.output['state'])
        flow = self.flow(flow_uuid)
        # The flow was never lost nor taken over.
        self.assertEqual(('SUCCESS', 'only', 1),
                         (flow.state, flow.owner, flow.lease_generation))
        self.assertEqual([('first', 1, 'SUCCESS'), ('txn', 1, 'SUCCESS'),
                          ('last', 1, 'SUCCESS')], self.stages(flow_uuid))
        events = self.events(flow_uuid)
        # first and last ran once; txn ran twice (its transaction was
        # retried as a whole, after it killed the connection once).
        self.assertEqual(
            [('execute', 'first'), ('execute', 'txn'), ('execute', 'txn'),
             ('execute', 'last')],
            [e[:2] for e in events if e[0] == 'execute'])
        # Connections were really terminated: the engine's pooled ones by
        # first and last, the one of its open transaction by txn.
        killed = [e[2] for e in events if e[0] == 'terminate']
        self.assertEqual(3, len(killed), events)
        self.assertTrue(all(n >= 1 for n in killed), killed)
        self.assertIn('Performing DB retry for function nova.orchestration.'
                      'recorder.Recorder.succeed_in_transaction', result.log)
        # Each effect committed once; txn's first one rolled back.
        self.assertEqual({'first': [False], 'txn': [False],
                          'last': [False]}, self.effects(flow_uuid))
