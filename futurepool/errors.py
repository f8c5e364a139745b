"""The exception tree.

Everything futurepool raises on its own account derives from
:class:`FuturePoolError`. Where drop-in code expects a stdlib type, the
exception also derives from it: :class:`WorkerCrashedError` is a
``concurrent.futures.process.BrokenProcessPool``, so ``except
BrokenProcessPool`` written for the stdlib keeps catching it. Timeouts raise
the builtin ``TimeoutError`` and cancellations
``concurrent.futures.CancelledError``, as the stdlib does.

Every exception here pickles with its attributes (a task may re-raise one).
"""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "FuturePoolError",
    "WorkerCrashedError",
    "InitializerError",
    "UnpicklingFailedError",
    "RemoteError",
    "ResultPicklingError",
    "ProtocolError",
    "ObjectStoreFullError",
    "ObjectLostError",
    "TaskTimeoutError",
    "OwnerDiedError",
]

_OOM_HINT = (
    " SIGKILL is most often sent by the kernel's out-of-memory killer: check"
    " `dmesg` or the cgroup's memory.events, and the task's memory use."
)


class FuturePoolError(Exception):
    """Base class of the errors futurepool raises on its own account."""


class WorkerCrashedError(FuturePoolError, BrokenProcessPool):
    """The worker process running a task died before reporting its result.

    Unlike the stdlib, only the tasks that worker was running fail; the pool
    replaces the worker and every other future completes.

    Attributes:
        task: a short description of the task (function name and id).
        worker_id: the node-local id of the worker that died.
        pid: its process id.
        host: the host it ran on.
        exitcode: the exit status (``None`` when killed by a signal).
        signal_name: the signal that killed it (``"SIGKILL"``), or ``None``.
        deaths: how many workers this task has killed (with retries).
    """

    def __init__(self, task=None, worker_id=None, pid=None, host=None,
                 exitcode=None, signal_name=None, deaths=1, detail=""):
        self.task = task
        self.worker_id = worker_id
        self.pid = pid
        self.host = host
        self.exitcode = exitcode
        self.signal_name = signal_name
        self.deaths = deaths
        self.detail = detail
        super().__init__(self._message())

    @property
    def cause(self) -> str:
        """``'SIGKILL'``, ``'EXIT(3)'``, or ``'unknown'``."""
        if self.signal_name:
            return self.signal_name
        if self.exitcode is not None:
            return f"EXIT({self.exitcode})"
        return "unknown"

    def _message(self) -> str:
        if self.worker_id is None:
            return f"The pool's worker processes could not be kept running. {self.detail}"
        where = f"worker {self.worker_id} (pid {self.pid}) on {self.host}"
        what = self.task or "a task"
        msg = f"The {where} died with {self.cause} while running {what}."
        if self.deaths > 1:
            msg += f" This task has now killed {self.deaths} workers; it is not retried again."
        if self.signal_name == "SIGKILL":
            msg += _OOM_HINT
        elif self.signal_name == "SIGSEGV":
            msg += " A segmentation fault usually comes from a C extension; the worker's" \
                   " faulthandler output, if any, is in its stderr."
        elif self.exitcode is not None:
            msg += " The task (or a library it called) ended the process, e.g. with os._exit()."
        if self.detail:
            msg += " " + self.detail
        return msg

    def __reduce__(self):
        return (_rebuild_crash, (self.task, self.worker_id, self.pid, self.host,
                                 self.exitcode, self.signal_name, self.deaths, self.detail))


def _rebuild_crash(*args):
    return WorkerCrashedError(*args)


class InitializerError(FuturePoolError, BrokenProcessPool):
    """The pool's initializer failed in a worker; the pool is broken.

    As with the stdlib, a pool whose initializer fails cannot run tasks. The
    difference is that futurepool says so once, with the initializer's own
    exception as ``__cause__``, instead of respawning workers forever
    (cpython#87472).
    """


class UnpicklingFailedError(FuturePoolError, BrokenProcessPool):
    """A task's arguments or result could not be deserialized.

    ``what`` is ``"arguments"`` (in the worker) or ``"result"`` (in the
    caller); ``__cause__`` is the original exception. Only this one task's
    future fails: the pool is not broken. It derives from
    ``BrokenProcessPool`` because that is what the stdlib raises in the same
    situation, so existing ``except`` clauses keep working.
    """

    def __init__(self, message: str, what: str = "result"):
        super().__init__(message)
        self.what = what

    def __reduce__(self):
        return (UnpicklingFailedError, (self.args[0], self.what))


class RemoteError(FuturePoolError):
    """Surrogate for a task's exception that could not cross processes.

    Raised when the original exception could not be pickled in the worker or
    unpickled here. It keeps what can be kept: the original type's qualified
    name, its message and the remote traceback text.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self):
        return (RemoteError, (self.type_name, self.message, self.traceback_text))


class ResultPicklingError(FuturePoolError, pickle.PicklingError):
    """A task's return value could not be pickled in the worker.

    Attributes:
        value_repr: ``repr()`` of the value (as far as it could be taken).
        reason_repr: ``repr()`` of the pickling exception, also ``__cause__``.
    """

    def __init__(self, message: str, value_repr: str = "", reason_repr: str = ""):
        super().__init__(message)
        self.value_repr = value_repr
        self.reason_repr = reason_repr

    def __reduce__(self):
        return (ResultPicklingError, (self.args[0], self.value_repr, self.reason_repr))


class ProtocolError(FuturePoolError):
    """A message did not follow the wire protocol; it was dropped."""


class ObjectStoreFullError(FuturePoolError, MemoryError):
    """A value could not be stored: shared memory and the spill directory are full.

    Raised in the caller by ``submit``, ``map`` and ``put`` before anything
    is sent (nothing is left half-written), or as the exception of the one
    future whose result could not be stored. A ``MemoryError``, so code that
    handles running out of memory keeps handling it.
    """


class ObjectLostError(FuturePoolError):
    """A stored value is gone: its segment was removed before it was read.

    Attributes:
        name: the segment that held the value.
    """

    def __init__(self, message="", name=None):
        super().__init__(message)
        self.name = name

    def __reduce__(self):
        return type(self), (str(self), self.name)


class TaskTimeoutError(FuturePoolError, TimeoutError):
    """A task ran past the ``timeout`` it was given with ``options()``; it was stopped.

    The time counts from the moment the task started in its worker. The task
    was first interrupted by this exception, raised inside it (so its
    ``finally`` blocks and context managers ran); if it had not ended
    ``config.INTERRUPT_GRACE`` seconds later, its worker was killed and
    replaced (``killed``). A builtin ``TimeoutError``, so ``except
    TimeoutError`` catches it.

    Attributes:
        task: a short description of the task (its id and function).
        timeout: the limit, in seconds.
        killed: whether the worker had to be killed to stop the task.
    """

    def __init__(self, task=None, timeout=None, killed=False):
        self.task = task
        self.timeout = timeout
        self.killed = killed
        what = task or "the task"
        message = f"{what} ran past its timeout of {timeout:g} s and was stopped." \
            if timeout is not None else f"{what} ran past its timeout and was stopped."
        if killed:
            message += (" It did not end once interrupted, so its worker was killed and"
                        " replaced; its finally blocks may not have run. Tasks that catch"
                        " every exception (except BaseException, or except Exception around"
                        " a TimeoutError) keep running after the interrupt.")
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.task, self.timeout, self.killed)


class OwnerDiedError(FuturePoolError):
    """The worker that owned a future died before it could hand over the result.

    A task that submits tasks owns their futures (nested ownership): their
    table lives in its worker process. When that worker dies, every holder of
    one of those futures elsewhere (a borrower) gets this error; the owner's
    pending children are cancelled. ``max_retries`` on the parent task re-runs
    it, and with it its children.

    Attributes:
        owner: a short description of the owner (worker id and host).
        future: a short description of the future (its task).
    """

    def __init__(self, owner=None, future=None):
        self.owner = owner
        self.future = future
        super().__init__(
            f"{future or 'the future'} was owned by {owner or 'a worker'}, which died before"
            " its result could be handed over; the tasks it had submitted and not finished"
            " were cancelled.")

    def __reduce__(self):
        return type(self), (self.owner, self.future)
