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


from nova import context as nova_context
from nova import exception
from nova import objects
from nova.orchestration import persistence
from nova.orchestration import states
from nova import test


class ObjectsTestCase(test.TestCase):

    def setUp(self):
        super().setUp()
        self.context = nova_context.get_admin_context()

    def test_create_get_and_list(self):
        instance_uuid = '8c1d8b64-9a2c-4a6f-9f5e-3f2b2a8b9a11'
        flow = objects.OrchestrationFlow.create(
            self.context, 'build', 1, {'request_spec': 'r'},
            instance_uuid=instance_uuid, request_id='req-2')
        self.assertEqual(('build', 1, states.PENDING, 0),
                         (flow.kind, flow.version, flow.state,
                          flow.lease_generation))
        self.assertEqual({'request_spec': 'r'},
                         persistence.decode(flow.inputs))
        self.assertEqual(0, len(flow.stages))

        fence = persistence.claim(self.context, flow.uuid, 'one', 60).fence
        persistence.transition(self.context, fence, 60, start={
            'position': 0, 'attempt': 1, 'name': 'a',
            'state': states.STAGE_RUNNING})

        again = objects.OrchestrationFlow.get_by_uuid(self.context,
                                                      flow.uuid)
        self.assertEqual(('one', 1), (again.owner, again.lease_generation))
        self.assertEqual([('a', 1, 'RUNNING', 'one')],
                         [(s.name, s.attempt, s.state, s.owner)
                          for s in again.stages])

        listed = objects.OrchestrationFlowList.get_by_instance_uuid(
            self.context, instance_uuid)
        self.assertEqual([flow.uuid], [f.uuid for f in listed])
        self.assertFalse(listed[0].obj_attr_is_set('stages'))
        # Stages load lazily.
        self.assertEqual(['a'], [s.name for s in listed[0].stages])

    def test_get_unknown(self):
        self.assertRaises(exception.OrchestrationFlowNotFound,
                          objects.OrchestrationFlow.get_by_uuid,
                          self.context,
                          '0f9d6c1e-2b8a-4c3d-9e7f-1a2b3c4d5e6f')

    def test_get_all_filters(self):
        build = objects.OrchestrationFlow.create(self.context, 'build', 1, {})
        other = objects.OrchestrationFlow.create(self.context, 'other', 1, {})
        flows = objects.OrchestrationFlowList.get_all(self.context)
        self.assertEqual([build.uuid, other.uuid], [f.uuid for f in flows])
        flows = objects.OrchestrationFlowList.get_all(
            self.context, kind='other', state=states.PENDING)
        self.assertEqual([other.uuid], [f.uuid for f in flows])
