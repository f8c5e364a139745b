"""A submitted call: what the owner tracks of it, and the error when it does not pickle."""

from __future__ import annotations

import itertools
import pickle

from ..store import serialize
from .resources import normalize, parse_bytes

_task_ids = itertools.count(1)


class Task:
    """One submitted call, as the owner tracks it until its future settles."""

    __slots__ = ("task_id", "future", "fn_id", "fn_bytes", "fn_name", "args", "deps",
                 "waiting", "attempt", "retries_left", "deaths", "started", "estimate",
                 "timeout", "retry_timeouts", "resources", "memory_limit", "gpus",
                 "owner_id", "shared", "rebuilds")

    def __init__(self, future, fn_id, fn_bytes, fn_name, args, deps, retries, timeout=0.0,
                 retry_timeouts=False, resources=None, memory_limit=0):
        self.task_id = next(_task_ids)
        self.future = future
        self.fn_id = fn_id
        self.fn_bytes = fn_bytes
        self.fn_name = fn_name
        self.args = args
        self.deps = deps  # {object_id: Future} the arguments refer to
        self.waiting = len(deps)
        self.attempt = 1
        self.retries_left = retries
        self.deaths = 0
        self.started = False
        self.estimate = 0.0  # seconds the scheduler expected when it sent it
        self.timeout = timeout  # seconds it may run in its worker; 0.0: no limit
        self.retry_timeouts = retry_timeouts  # max_retries given with the timeout: re-run
        # What it holds on its node while sent to a worker: ((name, quantity), ...) or None.
        self.resources = resources
        self.memory_limit = memory_limit  # bytes its worker may hold while it runs; 0: any
        self.gpus = ()  # the GPU indices of its node it was given (core.resources.Round)
        self.owner_id = None  # a nested task: the worker that owns it (core.relay)
        self.shared = ()  # the shared memory segments in its arguments (store.shared)
        self.rebuilds = 0  # a nested task re-run as its result was lost (core.relay)

    def limits(self):
        """What its worker enforces besides the timeout: None, or (memory_limit, gpus)."""
        if self.memory_limit or self.gpus:
            return (self.memory_limit, self.gpus)
        return None

    def describe(self) -> str:
        return f"task {self.task_id} ({self.fn_name})"


class TaskOptions:
    """What ``options()`` sets for the tasks of one view; None keeps the executor's.

    Built (and validated) once per view by :func:`task_options`, then only
    read by ``Owner.make_task``: the per-task cost is one attribute read per
    option.
    """

    __slots__ = ("timeout", "max_retries", "resources", "memory_limit", "request")
    #: The keys ``options()`` accepts.
    KEYS = ("timeout", "max_retries", "resources", "memory_limit")

    def __init__(self, timeout=None, max_retries=None, resources=None, memory_limit=None):
        self.timeout = timeout
        self.max_retries = max_retries
        self.resources = resources  # {name: quantity}, validated, or None
        self.memory_limit = memory_limit  # bytes, or None
        # The request as tasks carry it: hashable, sorted; None when it asks for nothing.
        self.request = tuple(sorted(resources.items())) if resources else None

    def __repr__(self) -> str:
        given = ", ".join(f"{key}={getattr(self, key)!r}" for key in self.KEYS
                          if getattr(self, key) is not None)
        return f"options({given})"


def task_options(base: TaskOptions | None, given: dict) -> TaskOptions:
    """``base`` updated with ``given`` (the keyword arguments of ``options()``), validated."""
    unknown = sorted(set(given) - set(TaskOptions.KEYS))
    if unknown:
        raise TypeError(f"options() got an unexpected keyword argument {unknown[0]!r};"
                        f" it accepts {', '.join(TaskOptions.KEYS)}")
    merged = {key: getattr(base, key) for key in TaskOptions.KEYS} if base else {}
    merged.update(given)
    timeout = merged.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
        if not timeout > 0 or timeout != timeout or timeout == float("inf"):
            raise ValueError(f"timeout must be > 0 and finite, got {timeout!r}")
        timeout = float(timeout)
    retries = merged.get("max_retries")
    if retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"max_retries must be an integer or None, got {retries!r}")
        if retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {retries!r}")
    resources = merged.get("resources")
    if "resources" in given:
        resources = normalize(resources)
    memory_limit = merged.get("memory_limit")
    if "memory_limit" in given:
        memory_limit = parse_bytes(memory_limit)
    return TaskOptions(timeout, retries, resources, memory_limit)


def pickling_error(what: str, exc: BaseException) -> BaseException:
    """The error for a call that does not pickle, naming the culprit.

    As in the stdlib, the pickler's own exception is what the future raises
    (a TypeError for a lock, a PicklingError, whatever a ``__reduce__``
    raised); ``what`` is added as a note. A ``SystemExit`` or similar from a
    ``__reduce__`` becomes a PicklingError, so that it cannot end the caller.
    """
    if not isinstance(exc, Exception):
        error = pickle.PicklingError(f"{what}: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error
    if hasattr(exc, "add_note"):
        exc.add_note(what)
    else:  # Python 3.10: the attribute is there for whoever looks
        exc.__notes__ = [*getattr(exc, "__notes__", ()), what]
    return exc


def culprit(fn, args, kwargs) -> str:
    """Name the first argument that does not pickle, for the error message."""
    name = serialize.describe_callable(fn)
    for index, value in enumerate(args):
        try:
            serialize.dumps_arguments((value,), {})
        except BaseException:  # noqa: BLE001
            return f"Could not pickle argument {index} ({type(value).__name__}) of {name}()"
    for key, value in kwargs.items():
        try:
            serialize.dumps_arguments((value,), {})
        except BaseException:  # noqa: BLE001
            return f"Could not pickle keyword argument {key!r} ({type(value).__name__}) of {name}()"
    return f"Could not pickle the arguments of {name}()"
