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

import fixtures

from nova.orchestration import task
from nova import test


Definition = task.FlowDefinition


class _Task(task.Task):
    def __init__(self, name, requires=(), provides=None):
        self.name = name
        self.requires = requires
        self.provides = provides


class _Retry(task.Retry):
    name = 'retry'
    provides = ('host',)


class FlowTestCase(test.NoDBTestCase):

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.MockPatchObject(task, '_REGISTRY', {}))

    def test_positions_put_the_retry_before_its_block(self):
        a, b, c = _Task('a'), _Task('b', ('host',)), _Task('c')
        retry = _Retry()
        block = task.RetryBlock(retry, [b])
        flow = Definition('k', 1, (), [a, block, c])
        self.assertEqual([(0, a, None), (1, retry, block), (2, b, block),
                          (3, c, None)], flow.stages)
        self.assertEqual((1, 2), flow.block_range(block))

    def test_requires_must_be_provided_earlier(self):
        self.assertRaisesRegex(
            ValueError, r"b requires \['ra'\]", Definition, 'k', 1, (),
            [_Task('b', ('ra',)), _Task('a', provides='ra')])
        Definition('k', 1, ('x',), [_Task('a', ('x',), 'ra'),
                                   _Task('b', ('ra', 'x'))])

    def test_retry_may_require_its_own_values(self):
        retry = _Retry()
        retry.requires = ('host',)
        Definition('k', 1, (), [task.RetryBlock(retry, [_Task('b')])])
        self.assertRaisesRegex(
            ValueError, r"a requires \['host'\]", Definition, 'k', 1, (),
            [_Task('a', ('host',), 'host')])

    def test_transient_names_are_known_but_not_inputs_or_results(self):
        Definition('k', 1, ('x',), [_Task('a', ('x', 'svc'))],
                  transient=('svc',))
        self.assertRaisesRegex(
            ValueError, 'both stored inputs and transient', Definition, 'k',
            1, ('x',), [_Task('a')], transient=('x',))
        self.assertRaisesRegex(
            ValueError, 'a provides svc, a transient value', Definition, 'k',
            1, (), [_Task('a', provides='svc')], transient=('svc',))

    def test_names_are_unique(self):
        self.assertRaisesRegex(ValueError, 'unique', Definition, 'k', 1, (),
                               [_Task('a'), _Task('a')])

    def test_registry_by_kind_and_version(self):
        v1 = task.register(Definition('k', 1, (), [_Task('a')]))
        v2 = task.register(Definition('k', 2, (), [_Task('b')]))
        self.assertIs(v1, task.lookup('k', 1))
        self.assertIs(v2, task.lookup('k', 2))
        self.assertIsNone(task.lookup('k', 3))
        self.assertRaises(ValueError, task.register,
                          Definition('k', 1, (), [_Task('a')]))
