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

"""Booting servers: the conductor's part as stored, resumable stages.

A ``build-request`` flow schedules every instance of an API request at once
and creates one ``build-instance`` flow per instance, which creates the
instance in its cell, deletes the BuildRequest and hands the instance to
its compute host. Version 1 ends with the ``build_and_run_instance`` cast
that compute hosts accept today; version 2 waits for the host's build and
reschedules itself. See ``doc/source/devref/build-flow.rst``.

The stages call the same ComputeTaskManager helpers that
``schedule_and_build_instances`` used, through the ``conductor`` transient
value. A stage that ends a build (the user deleted the server, scheduling
failed, quota was exceeded, the host failed) raises, and the stages'
reverts clean up as the inline code did, each revert persisted: the
instance ends ERROR with the failure as its fault, buried in cell0 if it
was not created, or is forgotten if its server was deleted. The flow ends
REVERTED with the reason stored. An operator's abort of a version 2
build-instance flow ends it the same way, the host's build undone first:
the instance ends ERROR with the abort as its fault and without its
allocation.

The stages are in ``request`` (build-request), ``instance`` (build-instance
up to its host), ``host`` (version 2) and ``legacy`` (version 1).
"""

from nova.orchestration.flows.boot import common
from nova.orchestration.flows.boot import host as host_stages
from nova.orchestration.flows.boot import instance as instance_stages
from nova.orchestration.flows.boot import legacy
from nova.orchestration.flows.boot import request
from nova.orchestration import task

# Only version 2 of build-instance can be aborted, once it started (its
# BuildRequest is left to create-instance's revert): its host undoes its
# build (abort_build). Version 1 hands the instance to a host too old for
# that, and a build-request flow ends once its instance flows exist (abort
# those).
BUILD_REQUEST = task.register(task.FlowDefinition(
    common.REQUEST_KIND, common.VERSION, request.REQUEST_INPUTS,
    [request.Schedule(), request.StartInstanceFlows()],
    transient=common.TRANSIENT, abortable=False,
    ended_inputs=common.without_sealed))

BUILD_INSTANCE_V1 = task.register(task.FlowDefinition(
    common.INSTANCE_KIND, common.VERSION, request.INSTANCE_INPUTS,
    [instance_stages.CreateInstance(), instance_stages.RecordInstance(),
     instance_stages.DeleteBuildRequest(), instance_stages.Accelerators(),
     legacy.CastToHost()],
    transient=common.TRANSIENT, abortable=False,
    ended_inputs=common.without_sealed))

BUILD_INSTANCE = task.register(task.FlowDefinition(
    common.INSTANCE_KIND, common.INSTANCE_VERSION, request.INSTANCE_INPUTS,
    [instance_stages.CreateInstance(), instance_stages.RecordInstance(),
     instance_stages.DeleteBuildRequest(),
     task.RetryBlock(host_stages.ChooseHost(),
                     [host_stages.HostAccelerators(),
                      host_stages.BuildOnHost()])],
    transient=common.TRANSIENT, abortable=task.ONCE_STARTED,
    ended_inputs=common.without_sealed))

# The names code outside the package uses.
REQUEST_KIND = common.REQUEST_KIND
INSTANCE_KIND = common.INSTANCE_KIND
VERSION = common.VERSION
INSTANCE_VERSION = common.INSTANCE_VERSION
instance_flow_uuid = common.instance_flow_uuid
request_flow_uuid = common.request_flow_uuid
request_inputs = request.request_inputs
create_request_flow = request.create_request_flow
conductors_run_build_flows = request.conductors_run_build_flows
FLOW_CONDUCTOR_SERVICE_VERSION = request.FLOW_CONDUCTOR_SERVICE_VERSION
Schedule = request.Schedule
StartInstanceFlows = request.StartInstanceFlows
RecordInstance = instance_stages.RecordInstance
ChooseHost = host_stages.ChooseHost
BuildOnHost = host_stages.BuildOnHost
