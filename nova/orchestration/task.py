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

"""Tasks, retry controllers and flows: what the engine runs."""

import collections

from nova import exception as exception_mod

# What resuming a flow does with a stage it finds RUNNING, i.e. a stage
# whose conductor died or lost its lease before recording the outcome.
RERUN = 'rerun'    # execute again: the task is idempotent
REVERT = 'revert'  # the outcome is unknown: undo whatever it may have done

# A flow that can be aborted once it started a stage: its creator committed
# to work (e.g. a server shown in BUILD) that only its first stage's revert
# undoes, and the reverts of a flow that started no stage do not run.
ONCE_STARTED = 'once-started'


class Task(object):
    """One stage of a flow.

    ``execute`` receives the request context and the values named in
    ``requires`` (flow inputs or earlier results) as keyword arguments; its
    return value is stored, JSON-encoded, under ``provides``. ``revert``
    receives the same arguments plus ``result`` (None when the stage did not
    complete). Reverts may run more than once after a crash and after a
    partial execute, so they must be idempotent.
    """

    #: Unique name of the stage within its flow.
    name = None
    #: Names of the values passed to execute() and revert().
    requires = ()
    #: Name the result of execute() is stored under, or None.
    provides = None
    #: Seconds the stage may run; None means [orchestration]stage_timeout.
    timeout = None
    #: RERUN or REVERT, see above.
    on_crash = REVERT
    #: If True, execute() runs inside the fenced API DB transaction that
    #: records its success: its API DB writes commit exactly once, with
    #: the stage, and a crash mid-stage leaves nothing behind to revert.
    transactional = False

    def execute(self, context, **kwargs):
        raise NotImplementedError()

    def execute_again(self, context, **kwargs):
        """Execute a RERUN stage found RUNNING: its conductor stopped.

        It receives the arguments of execute(), which it calls unless
        overridden. A stage whose execute cannot simply run twice removes
        here what an interrupted execution left; one that must look for
        what an interrupted execution did looks here, sparing the first
        execution the reads.
        """
        return self.execute(context, **kwargs)

    def revert(self, context, result, failure, **kwargs):
        pass


class Failure(object):
    """Why the engine reverts a stage: a failed stage's, or an abort.

    ``record`` is what the flow stores (persistence.failure_record, or the
    abort's). The pass that caught the exception also has the exception
    itself; a pass that resumes the revert after a crash has the record
    only.
    """

    def __init__(self, record, exception=None):
        self.record = record or {}
        self._exception = exception

    @property
    def type(self):
        """The name of the exception's class (ABORTED's for an abort)."""
        return self.record.get('type')

    def exception(self):
        """The exception: the one caught, else one made from the record.

        The latter is a NovaException with the record's message, raised
        once so that it has a traceback as a caught exception has.
        """
        if self._exception is None:
            try:
                raise exception_mod.NovaException(
                    message=self.record.get('message') or self.type)
            except exception_mod.NovaException as exc:
                self._exception = exc
        return self._exception


class Retry(object):
    """Decides whether the stages of a retry block run again.

    ``first`` returns the values (a dict, merged into the flow's store) of
    the first attempt. When a stage of the block fails, the engine reverts
    the block's stages and calls ``next`` with the attempt number that just
    failed and the Failure: a dict starts a new attempt with those values,
    None gives up and reverts the whole flow with that failure, and an
    exception gives up with that exception as the flow's failure.
    ``requires`` may name the controller's own ``provides``: ``next`` then
    receives the failed attempt's values, and ``first`` None.
    """

    name = None
    requires = ()
    #: Keys of the dicts returned by first() and next().
    provides = ()
    timeout = None
    # Choosing values has no side effect, so choosing again is always safe.
    on_crash = RERUN
    transactional = False

    def first(self, context, **kwargs):
        raise NotImplementedError()

    def next(self, context, attempt, failure, **kwargs):
        raise NotImplementedError()

    def revert(self, context, result, failure, **kwargs):
        pass


class RetryBlock(object):
    """A run of tasks that ``retry`` may execute again after a failure."""

    def __init__(self, retry, tasks):
        self.retry = retry
        self.tasks = list(tasks)


# A flow flattened into positions: the retry controller of a block takes
# the position before the block's tasks. ``block`` is the RetryBlock the
# stage belongs to (None outside blocks).
StageDefinition = collections.namedtuple('StageDefinition',
                                         'position item block')


class FlowDefinition(object):
    """An ordered list of tasks and retry blocks, of a kind and version.

    The kind and version are stored with every flow run; an engine only
    resumes a run whose definition it knows, so a changed flow must get a
    new version and the old one must stay registered until no run of it is
    left.

    ``inputs`` are stored with the flow. ``transient`` names values that
    are never stored: the running engine supplies them (e.g. the conductor
    manager whose clients the tasks use) or the caller who starts a run
    does (e.g. a secret that must not reach the database). A run resumed by
    another conductor has only the engine's, so a task must cope with a
    caller's value being None.
    """

    def __init__(self, kind, version, inputs, items, transient=(),
                 abortable=True, ended_inputs=None):
        """:param abortable: False for a flow whose reverts do not undo
            what it did yet: an operator cannot abort it. ONCE_STARTED for
            a flow that can be aborted once it started a stage.
        :param ended_inputs: a function given the stored inputs of a run
            that ends (SUCCESS, REVERTED or ERROR); what it returns is
            stored in their place, unless it returns None. Lets a flow drop
            what it needs only while it runs, such as sealed secrets.
        """
        self.kind = kind
        self.version = version
        self.abortable = abortable
        self.ended_inputs = ended_inputs
        self.inputs = tuple(inputs)
        self.transient = tuple(transient)
        self.stages = []
        self.block_positions = {}
        # name -> positions of the stages providing it, in flow order
        self.providers = collections.defaultdict(list)
        for item in items:
            if isinstance(item, RetryBlock):
                first = len(self.stages)
                for member in [item.retry] + item.tasks:
                    self.stages.append(
                        StageDefinition(len(self.stages), member, item))
                self.block_positions[id(item)] = (first, len(self.stages) - 1)
            else:
                self.stages.append(
                    StageDefinition(len(self.stages), item, None))
        self._validate()

    def _validate(self):
        clash = set(self.inputs) & set(self.transient)
        if clash:
            raise ValueError('%s cannot be both stored inputs and transient'
                             % sorted(clash))
        known = set(self.inputs) | set(self.transient)
        names = set()
        for stage in self.stages:
            item = stage.item
            if not item.name or item.name in names:
                raise ValueError('stage names must be unique and set: %r' %
                                 item.name)
            names.add(item.name)
            # A retry controller may read its own values: next() gets
            # those of the attempt that failed (first() gets None).
            own = set(item.provides) if isinstance(item, Retry) else set()
            missing = set(item.requires) - known - own
            if missing:
                raise ValueError('%s requires %s, which no earlier stage '
                                 'provides' % (item.name, sorted(missing)))
            provides = (item.provides if isinstance(item, Retry)
                        else [item.provides] if item.provides else [])
            for name in provides:
                if name in self.transient:
                    raise ValueError('%s provides %s, a transient value' %
                                     (item.name, name))
                known.add(name)
                self.providers[name].append(stage.position)

    def block_range(self, block):
        """First and last position of a retry block."""
        return self.block_positions[id(block)]


_REGISTRY = {}


def register(flow):
    """Make a flow definition known to the engine."""
    key = (flow.kind, flow.version)
    if key in _REGISTRY and _REGISTRY[key] is not flow:
        raise ValueError('flow %s version %d is already registered' % key)
    _REGISTRY[key] = flow
    return flow


def lookup(kind, version):
    """The registered flow of that kind and version, or None."""
    return _REGISTRY.get((kind, version))


def definitions():
    """The (kind, version) pairs of every registered flow."""
    return list(_REGISTRY)
