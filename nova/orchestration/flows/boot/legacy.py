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

"""build-instance version 1: cast the instance to its host.

The path for computes older than the waiting build (compute service
version 75); the host reschedules through build_instances.
"""

from oslo_log import log as logging

from nova.orchestration.flows.boot import common
from nova.orchestration.flows.boot import host as host_stages
from nova.orchestration.flows.boot import instance as instance_stages

LOG = logging.getLogger(__name__)


class CastToHost(instance_stages.InstanceTask):
    """Hand the instance to its selected host (build_and_run_instance).

    Skipped when the instance shows the host has it already (an earlier
    execution's cast arrived); the host reschedules through
    build_instances as it always did.
    """

    name = 'cast-to-host'
    requires = ('conductor', 'requester', 'instance_uuid', 'cell_uuid',
                'selections', 'image', 'spec_fields', 'requested_networks',
                'accelerators', 'has_injected_files', 'admin_password',
                'injected_files')
    instance_attrs = host_stages.HOST_BUILD_ATTRS

    def execute(self, context, conductor, requester, instance_uuid,
                cell_uuid, selections, image, spec_fields, requested_networks,
                accelerators, has_injected_files, admin_password,
                injected_files):
        context = common.user_context(context, requester)
        instance, cell = self._instance(context, instance_uuid, cell_uuid)
        if instance.host:
            # Set by the host's resource claim.
            LOG.info('The host has the instance already', instance=instance)
            return
        spec = common.request_spec(context, instance.uuid, spec_fields,
                                   requested_networks)
        secrets = common.request_secrets(requester, admin_password,
                                         injected_files)
        host_stages.require_injected_files(requester, has_injected_files,
                                           secrets, instance)
        selections = common.from_primitive(selections)
        host_stages.cast_to_host(
            context, conductor, instance, cell, spec, selections[0],
            selections[1:], 1, image, accelerators, secrets)

    def revert(self, context, result, failure, **unused):
        """Nothing to undo: the host cleans up after a build that failed."""
