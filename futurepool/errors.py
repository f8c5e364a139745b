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
    "TaskMemoryError",
    "UnsatisfiableResourcesError",
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

    Also raised when the only copy lived on a node that was lost and the
    value could not be rebuilt from lineage: reconstruction is off
    (``max_reconstructions=0``), its attempts were exceeded, or the value
    was not made by a task (a ``put``).

    Attributes:
        name: the segment that held the value.
        host: the lost host it lived on, when that is why (else None).
    """

    def __init__(self, message="", name=None, host=None):
        super().__init__(message)
        self.name = name
        self.host = host

    def __reduce__(self):
        return type(self), (str(self), self.name, self.host)


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


def _size(n) -> str:
    """``n`` bytes as a person reads them: ``512.0MB``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n)}B"


def _describe(resources: dict) -> str:
    """``cpu=8, gpu=2, mem=64.0GB``: quantities as a user would write them."""
    if not resources:
        return "nothing"
    return ", ".join(
        f"{name}={_size(value) if name in ('mem', 'memory') else format(value, 'g')}"
        for name, value in sorted(resources.items()))


class TaskMemoryError(FuturePoolError, MemoryError):
    """A task's worker used more memory than the ``memory_limit`` given with ``options()``.

    The worker was killed (SIGKILL) as soon as its resident memory was seen
    past the limit, before the kernel's out-of-memory killer would pick a
    victim, and replaced; other tasks were untouched. Resident memory here
    is the worker's RSS less the pages of files and of shared memory (the
    object store), which killing it would not free. A builtin
    ``MemoryError``, so ``except MemoryError`` catches it.

    Attributes:
        task: a short description of the task (its id and function).
        limit: the limit, in bytes.
        peak: the largest resident size seen, in bytes (the worker may have
            grown a little further between two looks).
        host: the host it ran on.
    """

    def __init__(self, task=None, limit=None, peak=None, host=None):
        self.task = task
        self.limit = limit
        self.peak = peak
        self.host = host
        what = task or "the task"
        where = f" on {host}" if host else ""
        message = f"{what} used more memory than its memory_limit"
        if limit is not None:
            message += f" of {_size(limit)} ({limit} bytes)"
        if peak:
            message += f": its worker{where} reached {_size(peak)} ({peak} bytes)"
        message += (". The worker was killed and replaced; other tasks were not affected."
                    " Raise the limit, or make the task use less memory (smaller chunks).")
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.task, self.limit, self.peak, self.host)


class UnsatisfiableResourcesError(FuturePoolError, ValueError):
    """No node can ever run a task with these ``resources``: raised by ``submit``.

    Raised in the caller, before anything is sent, when the executor does
    not listen for remote nodes and this host does not offer what the task
    asks for (an executor that listens lets the task wait for a node that
    does). A ``ValueError``: the request is a bad value for this executor.

    Attributes:
        requested: what the task asked for, ``{name: quantity}``.
        offers: what each node offers, ``{node: {name: quantity}}``.
    """

    def __init__(self, requested=None, offers=None, listening=False):
        self.requested = requested or {}
        self.offers = offers or {}
        self.listening = listening
        nodes = "; ".join(f"{node}: {_describe(offer)}" for node, offer in self.offers.items())
        message = (f"No node can run a task that asks for resources {_describe(self.requested)}."
                   f" What the nodes offer: {nodes or 'nothing'}.")
        if not listening:
            message += (" Declare what this host has with Executor(resources={...}), or"
                        " listen= for remote nodes started with futurepool worker"
                        " --resources.")
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.requested, self.offers, self.listening)


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
