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

"""The request's secrets, sealed for a flow resumed by another conductor.

A flow stores the request context it acts for without its token and
service catalog, and never stores the request's secrets (a server's admin
password and personality files) in clear. With
``[orchestration]credential_keys`` set, it stores them beside the context
sealed with Fernet (encrypted and authenticated), so that a conductor
taking the flow over can act for the requester, and build what was
requested, as the first run would have.
"""

from cryptography import fernet
from oslo_log import log as logging
from oslo_serialization import jsonutils

import nova.conf

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

#: The key of the sealed credentials in a stored context record.
SEALED = 'sealed_credentials'


def _keys():
    """The configured keys, the first one sealing; None if there are none.
    """
    keys = CONF.orchestration.credential_keys
    if not keys:
        return None
    try:
        return fernet.MultiFernet([fernet.Fernet(key) for key in keys])
    except ValueError as exc:
        LOG.error('[orchestration]credential_keys holds a key that is not '
                  '32 bytes in URL-safe base64 (%s): no requester token is '
                  'sealed or unsealed by this service.', exc)
        return None


def seal(context, secrets=None):
    """The context's token and service catalog, and secrets, sealed.

    :param secrets: a dict of the request's secrets, e.g. its admin
        password.
    :returns: the sealed text, or None if no key is configured or there
        is nothing to seal.
    """
    secrets = {name: value for name, value in (secrets or {}).items()
               if value}
    if not (context.auth_token or secrets):
        return None
    keys = _keys()
    if keys is None:
        return None
    plain = jsonutils.dump_as_bytes({
        'auth_token': context.auth_token,
        'service_catalog': context.service_catalog,
        'secrets': secrets})
    return keys.encrypt(plain).decode('ascii')


def unseal(sealed):
    """What seal() sealed, or None.

    A dict of the ``auth_token``, the ``service_catalog`` and the
    ``secrets``; None if nothing was sealed, or if none of the configured
    keys unseals it (see why_not_unsealed).
    """
    keys = _keys()
    if not isinstance(sealed, str) or keys is None:
        return None
    try:
        return jsonutils.loads(keys.decrypt(sealed.encode('ascii')))
    except (fernet.InvalidToken, UnicodeEncodeError):
        return None


def why_not_unsealed(sealed, if_unsealed=None):
    """Why a value is missing from what unseal(sealed) gives, for a warning.

    :param if_unsealed: the reason when sealed does unseal, without the
        value.
    """
    if sealed is None:
        return ('nothing was stored sealed: [orchestration]credential_keys '
                'was not set where the build was requested')
    if not CONF.orchestration.credential_keys:
        return ('it was stored sealed, and [orchestration]credential_keys '
                'is not set on this conductor')
    if unseal(sealed) is not None:
        return if_unsealed
    return ('it was stored sealed with a key that is not in this '
            'conductor\'s [orchestration]credential_keys, or its record is '
            'corrupt')
