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


"""Direct writes to orchestration records, for setting up test cases."""

import sqlalchemy as sa

from nova.db.api import api as api_db_api
from nova.db.api import models as api_models


@api_db_api.context_manager.writer
def expire_lease(context, flow_uuid):
    context.session.execute(
        sa.update(api_models.OrchestrationFlow).where(
            api_models.OrchestrationFlow.uuid == flow_uuid).values(
            lease_expires_at=api_models.OrchestrationFlow.created_at))


@api_db_api.context_manager.writer
def set_column(context, model, row_id, **values):
    context.session.execute(
        sa.update(model).where(model.id == row_id).values(**values))
