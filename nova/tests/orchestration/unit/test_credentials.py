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

from cryptography import fernet

from nova import context as nova_context
from nova.orchestration import credentials
from nova.orchestration.flows.boot import common as build_common
from nova import test

CATALOG = [{'type': 'image', 'name': 'glance',
            'endpoints': [{'publicURL': 'http://glance'}]}]


class CredentialsTestCase(test.NoDBTestCase):

    def setUp(self):
        super().setUp()
        self.key = fernet.Fernet.generate_key().decode()
        self.context = nova_context.RequestContext(
            'user', 'project', auth_token='secret-token',
            service_catalog=CATALOG)

    def _keys(self, *keys):
        self.flags(credential_keys=list(keys), group='orchestration')

    def test_sealed_token_and_catalog_unseal(self):
        self._keys(self.key)
        sealed = credentials.seal(self.context)

        self.assertNotIn('secret-token', sealed)
        self.assertEqual(
            {'auth_token': 'secret-token', 'service_catalog': CATALOG,
             'secrets': {}},
            credentials.unseal(sealed))

    def test_secrets_are_sealed_without_a_token(self):
        self._keys(self.key)
        files = [('/etc/motd', b'hello')]
        sealed = credentials.seal(
            nova_context.RequestContext('user', 'project'),
            {'admin_password': 'my password', 'injected_files': files,
             'unset': None})

        # A Fernet token is base64url: no space in it, by chance or not.
        self.assertNotIn('my password', sealed)
        self.assertEqual(
            {'auth_token': None, 'service_catalog': [],
             'secrets': {'admin_password': 'my password',
                         'injected_files': [['/etc/motd', 'hello']]}},
            credentials.unseal(sealed))

    def test_nothing_sealed_without_keys_or_token(self):
        self.assertIsNone(credentials.seal(self.context))
        self._keys(self.key)
        self.assertIsNone(credentials.seal(
            nova_context.RequestContext('user', 'project'),
            {'admin_password': None, 'injected_files': []}))
        self.assertIsNone(credentials.unseal(None))
        self.assertIn('nothing was stored sealed',
                      credentials.why_not_unsealed(None))

    def test_any_key_unseals_and_the_first_seals(self):
        new = fernet.Fernet.generate_key().decode()
        self._keys(self.key)
        old_sealed = credentials.seal(self.context)
        # A rotation: the new key first, the old one still unsealing.
        self._keys(new, self.key)
        new_sealed = credentials.seal(self.context)
        self.assertEqual('secret-token',
                         credentials.unseal(old_sealed)['auth_token'])
        self._keys(new)
        self.assertEqual('secret-token',
                         credentials.unseal(new_sealed)['auth_token'])
        self.assertIsNone(credentials.unseal(old_sealed))
        self.assertIn('not in this conductor',
                      credentials.why_not_unsealed(old_sealed))

    def test_no_key_here_unseals_nothing(self):
        self._keys(self.key)
        sealed = credentials.seal(self.context)
        self._keys()
        self.assertIsNone(credentials.unseal(sealed))
        self.assertIn('is not set on this conductor',
                      credentials.why_not_unsealed(sealed))

    def test_corrupt_record_unseals_nothing(self):
        self._keys(self.key)
        sealed = credentials.seal(self.context)
        for corrupt in (sealed[:-4] + 'AAAA', 'not sealed', 'é', 42):
            self.assertIsNone(credentials.unseal(corrupt), corrupt)

    def test_malformed_key_is_an_error_not_a_failure(self):
        self._keys('not-a-key')
        self.assertIsNone(credentials.seal(self.context))
        self.assertIn("credential_keys holds a key that is not 32 bytes",
                      self.stdlog.logger.output)
        self.assertNotIn('not-a-key', self.stdlog.logger.output)

    def test_context_record_holds_the_token_only_sealed(self):
        self._keys(self.key)
        record = build_common.context_record(self.context)

        self.assertNotIn('auth_token', record)
        self.assertNotIn('service_catalog', record)
        self.assertEqual('secret-token', credentials.unseal(
            record[credentials.SEALED])['auth_token'])
        # A conductor that predates the sealing rebuilds the requester's
        # context from the record as before, without the token.
        context = nova_context.RequestContext.from_dict(record)
        self.assertIsNone(context.auth_token)
        self.assertEqual(('user', 'project'),
                         (context.user_id, context.project_id))
