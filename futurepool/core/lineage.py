"""Lineage: rebuilding a stored result whose only copy was on a node that was lost.

::

    owner I/O thread
    ────────────────────────────────────────────────────────────────────────────
    a task's result has pieces on a remote host ─► produced(): the future keeps a
                                                   Record (what made it); by_piece
                                                   maps its pieces' names to it (weakly)
    core.directory: a piece it must pull has no ─► lost(): the Record's task runs again
      copy left (its host was lost, or every          (a Rebuild: an internal future);
      pull from it failed)                            past max_reconstructions, or off,
                                                      or no Record (a put): ObjectLostError
      the dependent task waiting for it        ─► park(): off its worker, back in the
                                                   ready queue once rebuilt
      a driver's result() waiting for it       ─► wait_fetch(): told Rebuilt, decodes
                                                   the future's new pieces
    the rebuild's result                        ─► _finished(): the new pieces replace the
                                                   old in the same Future; waiters go on

Recursion comes for free: a rebuild is an ordinary task whose dependencies
are the original's futures; if one of those lost its pieces too, placing the
rebuild finds it lost and rebuilds that first (its own Record).

Cost: only results with a piece stored on a remote host (the only ones a
lost node can take) get a Record, held by their Future and freed with it:
about ten references, keeping alive the task's pickled arguments and the
futures it depended on (as Ray's lineage pinning does). Reconstruction
re-runs tasks: it assumes them idempotent, as Ray does;
``max_reconstructions=0`` turns it off (and records nothing).

All state here belongs to the owner's I/O thread.
"""

from __future__ import annotations

import logging
import weakref

from .. import config
from ..errors import ObjectLostError, WorkerCrashedError
from ..future import Future
from ..store.objects import Block, Rebuilt, remote
from .calls import Task

LOGGER = logging.getLogger("futurepool")


class Record:
    """What made one stored result: enough to run the task again."""

    __slots__ = ("fn_id", "fn_bytes", "fn_name", "args", "deps", "retries", "timeout",
                 "retry_timeouts", "resources", "memory_limit", "rebuilds", "rebuild",
                 "detached")

    def __init__(self, task: Task, retries: int):
        self.fn_id = task.fn_id
        self.fn_bytes = task.fn_bytes
        self.fn_name = task.fn_name
        self.args = task.args
        # {object_id: what to rebuild from}: a dependency with lineage of its own by
        # weak reference and its Record (its value is freed with its future, and made
        # again if needed); any other (inline, or on the head: never lost) itself.
        self.deps = {oid: _Weak(dep) if getattr(dep, "_lineage", None) is not None else dep
                     for oid, dep in task.deps.items()}
        self.retries = retries
        self.timeout = task.timeout
        self.retry_timeouts = task.retry_timeouts
        self.resources = task.resources
        self.memory_limit = task.memory_limit
        self.rebuilds = 0  # re-runs started, against max_reconstructions
        self.rebuild: Rebuild | None = None  # the one running now
        self.detached = None  # weakref to a re-run whose original future was gone


class _Weak:
    """A dependency with lineage, held weakly: its future if alive, else its Record."""

    __slots__ = ("ref", "record")

    def __init__(self, future):
        self.ref = weakref.ref(future)
        self.record = future._lineage


class Rebuild:
    """One re-run of a Record's task, and who waits for it: ``callback(error)``."""

    __slots__ = ("record", "future", "name", "host", "callbacks", "done", "error")

    def __init__(self, record: Record | None, future, name: str, host: str):
        self.record = record
        self.future = future  # the user's Future, whose pieces are replaced
        self.name = name  # the lost piece that started it
        self.host = host  # where it lived
        self.callbacks: list = []
        self.done = False
        self.error: BaseException | None = None

    def add(self, callback) -> None:
        if self.done:
            callback(self.error)
        else:
            self.callbacks.append(callback)

    def finish(self, error: BaseException | None) -> None:
        self.done, self.error = True, error
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            try:
                callback(error)
            except Exception:  # noqa: BLE001 - one waiter must not stop the others
                LOGGER.exception("resuming a waiter of a rebuilt value")


class Reconstruction:
    """The owner's lineage: records, rebuilds, and who waits for them."""

    def __init__(self, owner):
        self.owner = owner
        self.max_reconstructions: int | None = None  # None: config.MAX_RECONSTRUCTIONS
        # piece name -> the Future whose result holds (or held) it; entries go with it.
        self.by_piece: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.rebuilt = 0  # re-runs started (tests; a counter for status to show)

    @property
    def limit(self) -> int:
        limit = self.max_reconstructions
        return config.MAX_RECONSTRUCTIONS if limit is None else limit

    def produced(self, task: Task, payload) -> None:
        """``task`` finished with ``payload``: keep its lineage if a lost node can take it."""
        if type(payload) is bytes or self.owner.head is None or self.limit <= 0:
            return  # inline, or one host only (nothing can be lost), or off
        future = task.future
        if getattr(future, "_rebuild_of", None) is not None or not isinstance(future, Future):
            return  # a rebuild: its result goes to the original (_finished)
        names = _remote_names(payload)
        if names:
            if getattr(future, "_lineage", None) is None:  # (a detached re-run has one)
                retries = task.retries_left if task.retry_timeouts else self.owner.max_retries
                future._lineage = Record(task, retries)
            for name in names:
                self.by_piece[name] = future

    def lost(self, block: Block, error: ObjectLostError, host: str) -> Rebuild:
        """``block`` has no copy left: the rebuild to wait for, or raise ``error``
        (reworded when reconstruction is off or its attempts are exceeded)."""
        name = block.location.name
        future = self.by_piece.get(name)
        record = getattr(future, "_lineage", None) if future is not None else None
        limit = self.limit
        if record is None:  # not made by a task here (a put, a nested result), or off
            if limit <= 0:
                raise ObjectLostError(
                    f"{error} Reconstruction is off (max_reconstructions=0), so the task"
                    " that made it was not run again.", name, host) from None
            raise ObjectLostError(f"{error} It was not made by a task this executor can run"
                                  " again (a put value, or a nested task's result), so it"
                                  " cannot be rebuilt.", name, host) from None
        if name not in _remote_names(future._encoded):
            done = Rebuild(None, future, name, host)  # an old piece, rebuilt already
            done.finish(None)
            return done
        if record.rebuild is not None:
            return record.rebuild
        self.check(error, name, host, record.rebuilds,
                   future._description or "the task that made it", record.fn_name)
        rebuild = Rebuild(record, future, name, host)
        self._start(rebuild)
        return rebuild

    def check(self, error: ObjectLostError, name: str, host: str, rebuilds: int,
              what: str, fn_name: str) -> None:
        """Raise ``error``, reworded, if the task that made a lost value (``what``) may
        not run again: reconstruction is off, or it was re-run ``limit`` times already."""
        limit = self.limit
        if limit <= 0:
            raise ObjectLostError(
                f"{error} Reconstruction is off (max_reconstructions=0), so {what} was not"
                " run again.", name, host) from None
        if rebuilds >= limit:
            raise ObjectLostError(
                f"{error} Reconstruction attempts exceeded: the task that made it"
                f" ({fn_name}) was already re-run {rebuilds} time(s), and"
                f" max_reconstructions={limit}. Its nodes keep being lost while they hold"
                " its result: check them (logs, memory), or raise max_reconstructions.",
                name, host) from None

    def _start(self, rebuild: Rebuild) -> None:
        record = rebuild.record
        record.rebuilds += 1
        record.rebuild = rebuild
        self.rebuilt += 1
        runner = Future()
        runner._rebuild_of = rebuild.future
        runner._description = f"{rebuild.future._description or record.fn_name} (rebuilt)"
        LOGGER.warning("rebuilding %s: the stored value %s lived only on %s, which was lost"
                       " (reconstruction %d of at most %d)", rebuild.future._description,
                       rebuild.name, rebuild.host, record.rebuilds, self.limit)
        runner.add_done_callback(lambda f: self._finished(rebuild, f))
        self._run(record, runner)

    def _run(self, record: Record, runner) -> None:
        """Submit ``record``'s task again, its result for ``runner``."""
        deps = {}
        for oid, dep in record.deps.items():
            if type(dep) is _Weak:
                deps[oid] = dep.ref() or self._detached(dep.record)
            else:
                deps[oid] = dep
        self.owner._admit(Task(runner, record.fn_id, record.fn_bytes, record.fn_name,
                               record.args, deps, record.retries, record.timeout,
                               record.retry_timeouts, record.resources, record.memory_limit))

    def _detached(self, record: Record):
        """A dependency whose future is gone (its value freed with it): made again, into a
        new future that only the re-run needing it holds (once for all who need it)."""
        runner = record.detached() if record.detached is not None else None
        if runner is not None:
            return runner
        runner = Future()
        runner._description = f"{record.fn_name} (rebuilt, as an input)"
        record.detached = weakref.ref(runner)
        limit = self.limit
        if record.rebuilds >= limit:
            runner.set_running_or_notify_cancel()
            runner.set_exception(ObjectLostError(
                f"An input of a value being rebuilt, made by {record.fn_name}, was freed and"
                f" must be made again, but reconstruction attempts were exceeded: it was"
                f" already re-run {record.rebuilds} time(s), and max_reconstructions={limit}."))
            return runner
        record.rebuilds += 1
        self.rebuilt += 1
        runner._lineage = record  # the same count, if it is lost again
        self._run(record, runner)
        return runner

    def _finished(self, rebuild: Rebuild, runner) -> None:
        """The re-run ended: its result becomes the original future's, or waiters fail."""
        record, future = rebuild.record, rebuild.future
        record.rebuild = None
        exc = None if runner.cancelled() else runner._exception
        if runner.cancelled():
            error = ObjectLostError(
                f"The stored value {rebuild.name} was lost with {rebuild.host}, and the"
                " executor stopped before it was rebuilt.", rebuild.name, rebuild.host)
        elif exc is None:
            payload = runner._encoded
            future._replace_encoded(payload)
            for name in _remote_names(payload):
                self.by_piece[name] = future
            error = None
        elif isinstance(exc, WorkerCrashedError) and record.rebuilds < self.limit:
            # Its node was lost too while it ran (or was dead but not yet declared so).
            again = Rebuild(record, future, rebuild.name, rebuild.host)
            again.callbacks = rebuild.callbacks
            rebuild.callbacks = []
            self._start(again)
            return
        else:
            error = ObjectLostError(
                f"The stored value {rebuild.name} was lost with {rebuild.host}, and"
                f" rebuilding it failed: running {record.fn_name} again raised"
                f" {type(exc).__name__}: {exc}", rebuild.name, rebuild.host)
            error.__cause__ = exc
        rebuild.finish(error)

    # -- who waits ------------------------------------------------------------------------

    def park(self, worker, task: Task, rebuild: Rebuild) -> None:
        """``task``, placed on ``worker`` but not sent, needs a value being rebuilt: it
        leaves the worker (a new attempt, so that pulls still running for it are fenced)
        and goes back to the queue once the value is there."""
        if task in worker.inflight:
            worker.inflight.remove(task)
            worker.backlog -= task.estimate
            if worker.quota is not None:
                worker.quota += 1
        task.attempt += 1
        rebuild.add(lambda error: self._resume(task, error))

    def _resume(self, task: Task, error) -> None:
        owner = self.owner
        if task.future.done():  # stopped meanwhile
            owner.tasks.pop(task.task_id, None)
        elif error is not None:
            owner._settle_exception(task, error)
        else:
            owner.ready.append(task)

    def wait_fetch(self, fetcher, rebuild: Rebuild) -> None:
        """A driver's ``result()`` waits: told :class:`Rebuilt` (decode the new pieces)."""
        def resume(error):
            if not fetcher.done():
                fetcher.set_exception(error or Rebuilt(
                    f"The stored value {rebuild.name} was rebuilt: read the new one.",
                    rebuild.name, rebuild.host))
        rebuild.add(resume)


def _remote_names(payload) -> list[str]:
    """The names of a payload's stored pieces that live on a remote host."""
    if type(payload) is not tuple:
        return []
    inband, pieces = payload
    return [piece.location.name for piece in (inband, *pieces)
            if type(piece) is Block and remote(piece.location)]


__all__ = ["Reconstruction", "Record"]
