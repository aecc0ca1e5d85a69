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

"""A build taken over by another conductor acts for the requester.

nova's functional fixtures ignore tokens. Here requests carry one, as
keystonemiddleware gives them, and neutron refuses a user context without
one, as nova's neutron client does (``_get_auth_plugin``). The conductor
running a build with a port dies before the host builds; a second
conductor takes the flow over and hands the build to the host, which
creates the port as the requester and spawns the guest with the request's
admin password and personality files.
"""

from cryptography import fernet
from oslo_serialization import base64

from nova.api import auth as api_auth
from nova import exception
from nova.orchestration.flows import boot as build_flows
from nova.orchestration import states
from nova.tests.orchestration.functional import test_build
from nova.tests.orchestration.functional import test_build_crash
from nova.virt import fake


class ResumedBuildCredentialsTest(test_build.BuildFlowTestBase):
    # A dying conductor sends no reply: casts must stay casts.
    CAST_AS_CALL = False

    def setUp(self):
        super().setUp()
        real_context = api_auth.NovaKeystoneContext._create_context

        def create_context(env, **kwargs):
            context = real_context(env, **kwargs)
            context.auth_token = 'token-of-%s' % context.user_id
            return context

        self.stub_out('nova.api.auth.NovaKeystoneContext._create_context',
                      create_context)
        real_client = self.neutron._get_client
        # The tokens of the user contexts neutron was called with.
        self.tokens = []

        def get_client(context, admin=False):
            if not (admin or context.is_admin):
                if not context.auth_token:
                    raise exception.Unauthorized()
                self.tokens.append(context.auth_token)
            return real_client(context, admin=admin)

        self.stub_out('nova.network.neutron.get_client', get_client)
        self.dead = []
        real_execute = build_flows.BuildOnHost.execute

        def execute(task, context, conductor, **inputs):
            if conductor in self.dead or not self.dead:
                self.dead.append(conductor)
                raise test_build_crash.ConductorDied()
            return real_execute(task, context, conductor, **inputs)

        self.stub_out(
            'nova.orchestration.flows.boot.host.BuildOnHost.execute', execute)
        # The admin password and personality files of each spawn.
        self.spawned = []
        real_spawn = fake.FakeDriver.spawn

        def spawn(driver, context, instance, image_meta, injected_files,
                  admin_password, *args, **kwargs):
            self.spawned.append((admin_password, injected_files))
            return real_spawn(driver, context, instance, image_meta,
                              injected_files, admin_password, *args,
                              **kwargs)

        self.stub_out('nova.virt.fake.FakeDriver.spawn', spawn)

    def _boot_through_a_takeover(self, **server):
        """Boot a server with a port; its conductor dies before the host
        builds it and a second conductor takes its flows over.
        """
        first = self.conductor.manager.compute_task_mgr
        body = self._build_server(
            networks=[{'uuid': self.neutron.network_1['id']}])
        body.update(server)
        server = self.api.post_server({'server': body})
        self._wait_for_assert(lambda: self.assertEqual([first], self.dead))
        self._wait_for_assert(
            lambda: self.assertEqual({}, first.orchestration._held))
        # Only nova-api's own calls were made as the requester so far.
        self.assertNotIn(None, self.tokens)
        self.tokens.clear()
        self._take_over(server['id'])
        return server

    def test_resumed_build_creates_the_port_as_the_requester(self):
        self.flags(credential_keys=[fernet.Fernet.generate_key().decode()],
                   group='orchestration')
        server = self._boot_through_a_takeover()

        server = self._wait_for_state_change(server, 'ACTIVE')
        self.assertEqual(
            {states.SUCCESS},
            {row.state for row in self._ended_flows(server['id']).values()})
        ports = self.neutron.list_ports(
            True, device_id=server['id'])['ports']
        self.assertEqual(1, len(ports))
        # The host made its calls with the requester's token.
        self.assertEqual({'token-of-%s' % self.api.auth_user},
                         set(self.tokens))
        self.assertEqual(
            1, len(self._get_allocations_by_server_uuid(server['id'])))
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])

    def test_resumed_build_spawns_with_the_request_secrets(self):
        self.flags(credential_keys=[fernet.Fernet.generate_key().decode()],
                   group='orchestration')
        # Personality files are accepted up to microversion 2.56.
        self.api.microversion = '2.56'
        files = [{'path': '/etc/motd',
                  'contents': base64.encode_as_text('hello')}]
        server = self._boot_through_a_takeover(
            adminPass='secret-pass', personality=files)

        server = self._wait_for_state_change(server, 'ACTIVE')
        # The host decodes the files' contents.
        self.assertEqual(
            [('secret-pass', [['/etc/motd', b'hello']])],
            [(password, [list(f) for f in injected])
             for password, injected in self.spawned])
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])

    def test_resumed_build_without_keys_ends_error(self):
        # Without [orchestration]credential_keys the token is not stored:
        # the host the dead conductor may have asked is asked again and
        # cannot create the port as the requester; the build is not tried
        # on the alternate. The server ends ERROR with the reason as its
        # fault, and nothing is left after its deletion.
        server = self._boot_through_a_takeover()

        server = self._wait_for_state_change(server, 'ERROR')
        self.assertIn("ended: it was resumed without the requester's token "
                      "(nothing was stored sealed: [orchestration]"
                      "credential_keys was not set where the build was "
                      "requested)", server['fault']['message'])
        self.assertEqual([], self.tokens)
        self.assertIn("does not have the requester's token (nothing was "
                      "stored sealed", self.stdlog.logger.output)
        self._delete_server(server)
        self._assert_nothing_leaked(server['id'])
