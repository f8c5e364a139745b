"""A submitted call: what the owner tracks of it, and the error when it does not pickle."""

from __future__ import annotations

import itertools
import pickle

from ..store import serialize

_task_ids = itertools.count(1)


class Task:
    """One submitted call, as the owner tracks it until its future settles."""

    __slots__ = ("task_id", "future", "fn_id", "fn_bytes", "fn_name", "args", "deps",
                 "waiting", "attempt", "retries_left", "deaths", "started", "estimate")

    def __init__(self, future, fn_id, fn_bytes, fn_name, args, deps, retries):
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

    def describe(self) -> str:
        return f"task {self.task_id} ({self.fn_name})"


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
