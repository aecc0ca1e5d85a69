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

"""States of flows and stages as stored in the API database."""

# Flow states. A flow is claimable while it is in one of ACTIVE.
PENDING = 'PENDING'
RUNNING = 'RUNNING'
REVERTING = 'REVERTING'
SUCCESS = 'SUCCESS'
REVERTED = 'REVERTED'
ERROR = 'ERROR'
ACTIVE = (PENDING, RUNNING, REVERTING)
FINISHED = (SUCCESS, REVERTED, ERROR)

# Stage states (SUCCESS, REVERTING and REVERTED are shared with flows).
# A stage row is written when the stage starts, so it has no PENDING state.
STAGE_RUNNING = RUNNING
STAGE_SUCCESS = SUCCESS
STAGE_FAILURE = 'FAILURE'
STAGE_REVERTING = REVERTING
STAGE_REVERTED = REVERTED
