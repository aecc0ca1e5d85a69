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

"""The conductor building a server dies at every point of the build flows.

For every stage of both flows, the conductor dies once right before the
stage executes (the stage is recorded RUNNING, nothing of it is done) and
once right after it executed, before its success is recorded (everything
is done, nothing says so). From that moment on, every stage that conductor
would execute dies too, as its process is gone. Its service is stopped,
the leases of the flows it held are expired and a second conductor's sweep
takes them over. Every case must end with the server ACTIVE, spawned once,
with the allocations of one host, and nothing left once it is deleted.

The conductor also dies in the middle of every stage that has a middle
(``during``), at the call listed in MIDDLES: part of the stage's work is
done, the rest is not, and nothing says which. ``choose-host`` has none (a
first attempt only reads its inputs), nor has ``accelerators`` for a
server whose flavor and ports ask for no device profile.

The server of the ``accelerators`` cases has a device profile (nova's
Cyborg fixture): dying after the stage bound its accelerator requests
(ARQs), the conductor leaves them bound to the instance, and the second
conductor's execution must give the host one set, not two. That stage's
middle, between creating the ARQs and binding them, is not cut: unbound
ARQs name no instance, so nothing could find them after a crash there,
as with the inline code.

A reschedule is cut too (RESCHEDULE): the first host fails the build and
the conductor dies before, in the middle of (its claim of the alternate in
placement made, not recorded) and after choose-host picks the alternate;
the second conductor must build the server on the alternate with its
claim alone.

The host's build is a call the conductor waits for. A conductor that dies
while the host builds (``build-on-host``, ``during``) leaves the build
going; the second conductor asks the host again, which waits for that
build under the instance's lock and reports it, so the guest is spawned
once.
"""

import ddt
from oslo_utils import importutils

from nova.compute import rpcapi as compute_rpcapi
from nova import exception
from nova.orchestration.flows import boot as build_flows
from nova.orchestration import persistence
from nova.orchestration import states
from nova.orchestration import task as task_mod
from nova.tests import fixtures as nova_fixtures
from nova.tests.orchestration.functional import test_build

STAGES = [stage.item for flow in (build_flows.BUILD_REQUEST,
                                  build_flows.BUILD_INSTANCE)
          for stage in flow.stages]
# The call in the middle of a stage where the conductor dies, and whether
# the call is made first.
_CONDUCTOR = 'nova.conductor.manager.ComputeTaskManager.'
MIDDLES = {
    # The scheduler claimed the host, no build-instance flow exists.
    'schedule': (
        'nova.orchestration.flows.boot.request.Schedule._create_flows',
        False),
    # The build-instance flow is started, held by the dying conductor.
    'start-instance-flows': ('nova.orchestration.engine.Engine.start', True),
    # The instance is created in its cell, the quota not checked again.
    'create-instance': (_CONDUCTOR + '_recheck_quota', False),
    # The create action is started, the instance is not mapped to its cell.
    'record-instance': (_CONDUCTOR + '_map_instance_to_cell', False),
    # The BuildRequest is deleted in the stage's uncommitted transaction.
    'delete-build-request': (
        'nova.objects.build_request.BuildRequest.destroy', True),
}
# A reschedule: the first host fails the build, choose-host claims an
# alternate in placement.
RESCHEDULE = [('choose-host', when) for when in (
    'before reschedule', 'during reschedule', 'after reschedule')]
POINTS = [(task.name, when) for task in STAGES
          for when in ('before', 'after')] + [
    (stage, 'during') for stage in MIDDLES] + [
    ('build-on-host', 'during')] + RESCHEDULE


class ConductorDied(BaseException):
    """The process of the conductor running the stage is gone."""


@ddt.ddt
class BuildCrashMatrixTest(test_build.BuildFlowTestBase):
    # A dying conductor sends no reply: casts must stay casts.
    CAST_AS_CALL = False

    def setUp(self):
        super().setUp()
        self.dead = []
        self.spawned = []
        for task in STAGES:
            cls = type(task)
            method = 'first' if issubclass(cls, task_mod.Retry) else 'execute'
            self._wrap(cls, method, (task.name, 'before'),
                       (task.name, 'after'))
        for stage, (target, made) in MIDDLES.items():
            self._die_in_the_middle((stage, 'during'), target, made)
        self._die_at_reschedule()
        self._die_while_the_host_builds()
        real_spawn = self.computes['compute'].driver.__class__.spawn
        self.failed_spawns = []

        def spawn(driver, context, instance, *args, **kwargs):
            if self.point in RESCHEDULE and not self.failed_spawns:
                self.failed_spawns.append(instance.host)
                raise exception.ComputeResourcesUnavailable(reason='test')
            self.spawned.append(instance.uuid)
            return real_spawn(driver, context, instance, *args, **kwargs)

        self.stub_out('nova.virt.fake.FakeDriver.spawn', spawn)

    def _wrap(self, cls, method, before, after):
        """The conductor dies at the before or after point of a method."""
        real = getattr(cls, method)

        def execute(task, *args, **kwargs):
            conductor = kwargs['conductor']
            if conductor in self.dead:
                raise ConductorDied()
            if not self.dead and self.point == before:
                self.dead.append(conductor)
                raise ConductorDied()
            result = real(task, *args, **kwargs)
            if not self.dead and self.point == after:
                self.dead.append(conductor)
                raise ConductorDied()
            return result

        self.stub_out('%s.%s.%s' % (cls.__module__, cls.__name__, method),
                      execute)

    def _die_in_the_middle(self, point, target, made):
        """The conductor dies at a call in the middle of a stage."""
        module, cls_name, name = target.rsplit('.', 2)
        cls = getattr(importutils.import_module(module), cls_name)
        static = isinstance(cls.__dict__[name], staticmethod)
        real = getattr(cls, name)

        def call(*args, **kwargs):
            if self.dead or self.point != point:
                return real(*args, **kwargs)
            # Marked dead first: a flow started here runs none of its
            # stages on this conductor.
            self.dead.append(self.conductor.manager.compute_task_mgr)
            if made:
                real(*args, **kwargs)
            raise ConductorDied()

        self.stub_out(target, staticmethod(call) if static else call)

    def _die_at_reschedule(self):
        """The conductor dies around choose-host's claim of an alternate."""
        self._wrap(build_flows.ChooseHost, 'next', RESCHEDULE[0],
                   RESCHEDULE[2])
        # The alternate is claimed, the claim not recorded.
        self._die_in_the_middle(
            RESCHEDULE[1],
            'nova.orchestration.flows.boot.host.ChooseHost._claim', True)

    def _die_while_the_host_builds(self):
        """The call reaches the host, its caller dies before the reply."""
        real = compute_rpcapi.ComputeAPI.build_and_run_instance

        def build_and_run_instance(rpcapi, ctxt, instance, host, **kwargs):
            if not (self.point == ('build-on-host', 'during') and
                    kwargs.get('wait') and not self.dead):
                return real(rpcapi, ctxt, instance, host, **kwargs)
            self.dead.append(self.conductor.manager.compute_task_mgr)
            cctxt = rpcapi.router.client(ctxt).prepare(server=host,
                                                       version='6.6')
            limits = kwargs.pop('limits')
            cctxt.cast(ctxt, 'build_and_run_instance', instance=instance,
                       limits=limits.to_dict() if limits else None,
                       **kwargs)
            raise ConductorDied()

        self.stub_out('nova.compute.rpcapi.ComputeAPI.build_and_run_instance',
                      build_and_run_instance)

    def _device_flavor(self):
        """A flavor with a device profile; each host has one device."""
        self.cyborg = self.useFixture(nova_fixtures.CyborgFixture())
        self._create_trait(self.cyborg.trait)
        for node in self._get_all_providers():
            device = self.placement.post(
                '/resource_providers', version='1.20', body={
                    'name': node['name'] + '-device',
                    'parent_provider_uuid': node['uuid']}).body
            self._update_inventory(device['uuid'], {
                'resource_provider_generation': 0,
                'inventories': {'FPGA': {'total': 1}}})
            self._set_provider_traits(device['uuid'], [self.cyborg.trait])
        return self._create_flavor(
            extra_spec={'accel:device_profile': self.cyborg.dp_name})

    @ddt.data(*POINTS)
    @ddt.unpack
    def test_conductor_dies(self, stage, when):
        self.point = (stage, when)
        accelerated = stage == 'accelerators'
        first = self.conductor.manager.compute_task_mgr
        server = self.api.post_server({'server': self._build_server(
            networks='none',
            flavor_id=self._device_flavor() if accelerated else None)})
        self._wait_for_assert(lambda: self.assertEqual([first], self.dead))
        self._wait_for_assert(
            lambda: self.assertEqual({}, first.orchestration._held))

        self._take_over(server['id'])

        server = self._wait_for_state_change(server, 'ACTIVE')
        self._wait_for_assert(lambda: self.assertEqual(
            {states.SUCCESS},
            {row.state for row in
             persistence.flows_of_instance(self.ctxt, server['id'])}))
        self.assertEqual([server['id']], self.spawned)
        if self.point in RESCHEDULE:
            self.assertEqual(1, len(self.failed_spawns))
            self.assertNotEqual(self.failed_spawns[0],
                                server['OS-EXT-SRV-ATTR:host'])
        # The providers of one host: its compute node, and its device.
        self.assertEqual(
            2 if accelerated else 1,
            len(self._get_allocations_by_server_uuid(server['id'])))
        if accelerated:
            self.assertEqual(
                [server['OS-EXT-SRV-ATTR:hypervisor_hostname']],
                [arq['hostname'] for arq in
                 self.cyborg.fake_get_arqs_for_instance(server['id'])])
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])
        if accelerated:
            self.assertEqual(
                [], self.cyborg.fake_get_arqs_for_instance(server['id']))
