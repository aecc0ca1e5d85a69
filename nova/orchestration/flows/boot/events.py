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

"""The stages reported as events of the instance's create action."""

import contextlib

from oslo_log import log as logging
from oslo_utils import timeutils

import nova.conf
from nova import context as nova_context
from nova.db.main import api as main_db_api
from nova import exception
from nova import objects

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)


@contextlib.contextmanager
def stage_event(context, cell, instance_uuid, stage, attempt=1):
    """Report a stage as an event of the instance's create action.

    Users and operators see the stages where they see the host's build
    (``compute__do_build_and_run_instance``): in the instance action's
    events, as ``conductor_<stage>``, with ``_<attempt>`` appended from the
    second attempt of a retried stage on (an event is finished by its
    name). As for the host's build event, a build the stage ends as
    designed (BuildEnded, a reschedule, a host found down or giving no
    outcome) is reported by the instance's state and fault, not by an
    event error; an unexpected error fails the event. Reporting never
    fails the stage.

    The event is written when the stage ends, with the stage's start and
    finish times: one write to the cell database where starting and then
    finishing it took two. While the stage runs, the host's own event
    shows the build.
    """
    name = 'conductor_' + stage.replace('-', '_')
    if attempt > 1:
        name += '_%d' % attempt
    start_time = timeutils.utcnow()
    report = True
    exc_info = (None, None)
    try:
        yield
    except (exception.BuildEnded, exception.RescheduledException,
            exception.BuildHostDown, exception.HostGaveNoOutcome):
        raise
    except exception.OrchestrationEngineStopped:
        # As after a crash: the conductor resuming the stage reports it.
        report = False
        raise
    except Exception as exc:
        exc_info = (exc, exc.__traceback__)
        raise
    finally:
        if report:
            _write_event(context, cell, instance_uuid, name, start_time,
                         *exc_info)


def _write_event(context, cell, instance_uuid, name, start_time, exc_val,
                 exc_tb):
    """Write a stage's event, started and finished; never raise."""
    event = objects.InstanceActionEvent
    try:
        with nova_context.target_cell(context, cell) as cctxt:
            values = event.pack_action_event_start(
                cctxt, instance_uuid, name, host=CONF.host)
            values['start_time'] = start_time
            if exc_tb is None:
                values.update(event.pack_action_event_finish(
                    cctxt, instance_uuid, name))
            main_db_api.action_event_start(cctxt, values)
            if exc_tb is not None:
                # nova's finish also marks the action as failed.
                event.event_finish_with_failure(
                    cctxt, instance_uuid, name, exc_val=exc_val,
                    exc_tb=exc_tb, want_result=False)
    except Exception:
        LOG.warning('Could not report event %s of the build', name,
                    instance_uuid=instance_uuid, exc_info=True)
