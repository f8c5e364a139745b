"""Tasks that submit tasks: the worker's side of nested ownership.

A task that submits tasks (through the executor it was passed, or
:func:`current_executor`) *owns* their futures, as the driver owns the ones
it submits: the table of those futures, their arguments, their dependencies
and their results live here, in the worker process, not in the driver. The
head only places the tasks and passes each outcome back (``core.relay``),
forgetting the task as it does, so the driver's memory stays flat however
many nested tasks run::

    worker W (owner)                       head (driver's I/O thread)       worker X
    ────────────────                       ──────────────────────────       ────────
    ex.submit(f) ─ NestedFuture ─ SUBMIT ─► relay: a Task, placed like ──TASKS─► runs f
                  (table here)               any other                          │
    result() ◄── OUTCOMES ◄──────────────── its outcome, then forgotten ◄RESULTS─┘

A task blocked on its own futures lends its slot (``Worker.lend``): it tells
the head (WAITING), hands back the tasks queued behind it, and runs, inline
in its own thread, the tasks it is waiting for (or other tasks its worker
owns) when the head has nowhere else to run them (LEND). No extra process is
ever started: a worker whose task blocks becomes a worker for that task's
subtree, so recursion (``fib(20)`` on two workers) cannot deadlock. Tasks
stacked on a blocked task are only tasks submitted from the same worker
process (its descendants, or tasks its earlier tasks left running), so a
wait never sits on top of work that waits for it.

A future that leaves its owner inside a result, or inside the arguments of
a task it does not wait for, is *borrowed*: the holder's copy asks the owner
for the value (GET, VALUE through the head) and releases it when collected
(RELEASE); the owner keeps the value alive while any borrower holds it.
When an owner dies, borrowers get :class:`~futurepool.errors.OwnerDiedError`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import weakref
from concurrent.futures import CancelledError
from concurrent.futures._base import FINISHED

from ..errors import OwnerDiedError
from ..future import Future
from ..protocol.messages import MessageType, ResultStatus
from ..store import serialize
from ..store.segments import Location
from .calls import task_options

#: This process's owner, once it is a worker serving tasks (None elsewhere).
_current: NestedOwner | None = None


def current_executor():
    """The executor running the current task, as a handle tasks can submit to.

    Inside a task run by a futurepool ``Executor`` or ``Pool``, returns the
    same handle an executor passed to the task arrives as: ``submit``,
    ``map``, ``options`` and ``put`` work as on the executor, and the
    futures it returns are owned by this worker.

    Raises:
        RuntimeError: outside a futurepool worker.

    .. versionadded:: 0.1
    """
    if _current is None:
        raise RuntimeError(
            "futurepool.current_executor() is only available inside a task run by a"
            " futurepool Executor or Pool; in the driver, use the executor itself")
    if not _current.serving:
        raise RuntimeError(
            "futurepool.current_executor() is not available in the pool's initializer"
            " (or while the main script is imported): the worker takes no task yet, so"
            " it could not wait for one; submit from a task instead")
    return _current.handle


def handle_with_options(handle, options):
    """Unpickling an ``options()`` view inside a task: the handle, with those options."""
    return ExecutorHandle(handle._nested, options)


def _executor_handle():
    """Unpickling an executor inside a task's arguments: this worker's handle."""
    return current_executor()


class NestedBlock:
    """A stored piece a nested result refers to; frees it (through the head) when collected."""

    __slots__ = ("location", "owner", "__weakref__")

    def __init__(self, location: Location, owner: NestedOwner):
        self.location = location
        self.owner = owner

    def __reduce__(self):  # in messages, a block is its location
        return Location, tuple(self.location)

    def view(self) -> memoryview:
        return self.owner.worker.store.view(self.location)

    def __del__(self):
        try:
            self.owner.free(self.location)
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass



class _LendingWaiters(list):
    """A nested future's ``_waiters``: a thread about to block in the stdlib's
    ``wait()`` or ``as_completed()`` on it lends its slot while it waits.

    Both install their waiter while holding every future's condition, before
    anything can set its event: swapping the event then loses nothing.
    """

    __slots__ = ("owner",)

    def append(self, waiter) -> None:
        event = waiter.event
        if type(event) is _LendingEvent:
            event.futures.append(self)
        elif type(event) is threading.Event:
            waiter.event = _LendingEvent(self.owner, [self])
        super().append(waiter)


class _LendingEvent(threading.Event):
    """The event of a stdlib waiter on nested futures: waiting on it lends the slot."""

    def __init__(self, owner: NestedOwner, waiter_lists: list):
        super().__init__()
        self.owner = owner
        self.futures = waiter_lists  # the _LendingWaiters of the futures waited on

    def wait(self, timeout=None) -> bool:
        if self.is_set():
            return True
        with self.owner.lock:
            futures = [f for f in self.owner.pending.values()
                       if any(f._waiters is waiters for waiters in self.futures)]
        if self.owner.block(futures, self.is_set, timeout):
            return super().wait(0)
        return super().wait(timeout)


class NestedFuture(Future):
    """A future owned by the worker whose task submitted it (module docstring)."""

    def __init__(self, owner: NestedOwner, local_id: int, description: str):
        super().__init__()
        self.object_id = local_id
        self._owner = owner
        self._description = description
        self._task_id = local_id
        self._stop_via = owner.request_stop
        self._waiters = _LendingWaiters()
        self._waiters.owner = owner
        self._parent = owner.worker.current  # (task id, attempt) that submitted it

    def __reduce__(self):
        if serialize.collect_references(self):
            return serialize.resolve_reference, (self.object_id,)
        return self._owner.lend_reference(self)

    def cancel(self) -> bool:
        # The owner cannot tell a queued task from a running one without asking the
        # head: a nested future stays pending until its outcome, and cancelling it
        # stops the task wherever it is (as Future.stop() does).
        if not super().cancel():
            return False
        self._owner.request_stop(self.object_id)
        return True

    def result(self, timeout=None):
        if self._state != FINISHED and self._owner.block([self], self.done, timeout):
            timeout = 0 if timeout is not None else None  # waited already
        return super().result(timeout)

    def exception(self, timeout=None):
        if self._state != FINISHED and self._owner.block([self], self.done, timeout):
            timeout = 0 if timeout is not None else None
        return super().exception(timeout)


class BorrowedFuture(Future):
    """A future owned by another process; its value was asked for when it was unpickled."""

    def __init__(self, table: BorrowTable, owner_id: int, local_id: int, description: str):
        super().__init__()
        self._table = table
        self.owner_id = owner_id
        self.local_id = local_id
        self._description = description

    def __reduce__(self):
        if serialize.collect_references(self):
            return serialize.resolve_reference, (self.object_id,)
        return _borrow, (self.owner_id, self.local_id, self._description)

    def __del__(self):
        try:
            self._table.release(self.owner_id, self.local_id)
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


class _Mapped:
    """A stored piece a borrowed value refers to: readable here, freed by its owner."""

    __slots__ = ("location", "read", "__weakref__")

    def __init__(self, location: Location, read):
        self.location = location
        self.read = read

    def __reduce__(self):
        return Location, tuple(self.location)

    def view(self) -> memoryview:
        return self.read(self.location)


class _Borrowed:
    __slots__ = ("copies", "count", "outcome")

    def __init__(self):
        self.copies = weakref.WeakSet()
        self.count = 0
        self.outcome = None  # (status, payload) once the owner sent it


class BorrowTable:
    """The futures this process borrowed, by (owner worker id, owner's id).

    One GET per future however many copies are unpickled here, one RELEASE
    when the last copy is collected. ``send(kind, item)`` queues a GET or
    RELEASE for the head; ``read(location)`` maps a stored piece.
    """

    def __init__(self, send, read):
        self.send = send
        self.read = read
        self.lock = threading.RLock()  # (finalizers of ours may run inside)
        self.groups: dict[tuple, _Borrowed] = {}

    def borrow(self, owner_id: int, local_id: int, description: str) -> BorrowedFuture:
        future = BorrowedFuture(self, owner_id, local_id, description)
        key = (owner_id, local_id)
        with self.lock:
            group = self.groups.get(key)
            first = group is None
            if first:
                group = self.groups[key] = _Borrowed()
            group.count += 1
            group.copies.add(future)
            outcome = group.outcome
        if first:
            self.send(MessageType.GET, key)
        if outcome is not None:
            _settle(future, *outcome)
        return future

    def release(self, owner_id: int, local_id: int) -> None:
        key = (owner_id, local_id)
        with self.lock:
            group = self.groups.get(key)
            if group is None:
                return
            group.count -= 1
            if group.count > 0:
                return
            del self.groups[key]
        self.send(MessageType.RELEASE, key)

    def valued(self, values) -> None:
        """VALUE: borrowed futures are done at their owners."""
        for owner_id, local_id, status, payload in values:
            if status == ResultStatus.OK and type(payload) is not bytes:
                payload = _pieces(payload, lambda loc: _Mapped(loc, self.read))
            with self.lock:
                group = self.groups.get((owner_id, local_id))
                if group is None:
                    continue
                group.outcome = (status, payload)
                copies = list(group.copies)
            for future in copies:
                _settle(future, status, payload)

    def owners_died(self, owner_ids, describe) -> None:
        """OWNER_DIED: what we borrowed from these owners will never come."""
        dead = set(owner_ids)
        with self.lock:
            lost = [(key, group) for key, group in self.groups.items() if key[0] in dead]
            for key, group in lost:
                if group.outcome is None:
                    group.outcome = (None, describe(key[0]))
        for _key, group in lost:
            for future in list(group.copies):
                if not future.done():
                    _settle(future, None, group.outcome[1])


def _pieces(payload, wrap):
    """An encoded value with each stored piece (a Location tuple) wrapped by ``wrap``."""
    inband, pieces = payload
    if type(inband) is not bytes:
        inband = wrap(Location(*inband))
    return inband, tuple(piece if type(piece) is bytes else wrap(Location(*piece))
                         for piece in pieces)


def _settle(future, status, payload) -> None:
    """Complete ``future`` with an outcome as the head reports it (None: the owner died)."""
    try:
        if status == ResultStatus.OK:
            future._set_encoded_result(payload)
        elif status == ResultStatus.CANCELLED:
            if not future.cancel():
                future.set_exception(CancelledError(f"{future._description} was cancelled"))
        elif status is None:
            future.set_exception(OwnerDiedError(payload, future._description))
        else:
            future.set_exception(serialize.loads_exception(payload))
    except concurrent.futures.InvalidStateError:
        pass  # cancelled here meanwhile


def _borrow(owner_id: int, local_id: int, description: str):
    """Unpickling a future that left its owner: a borrowed copy, registered here."""
    table = serialize.borrowing_table() or _current
    if table is None:
        raise RuntimeError(
            f"a futurepool future ({description}) can only be unpickled by the result()"
            " of a futurepool future or inside a task")
    return table.borrow(owner_id, local_id, description)


class _Entry:
    """A nested task waiting here for its dependencies before it is sent."""

    __slots__ = ("future", "item", "deps", "waiting")


class NestedOwner:
    """The futures the tasks of one worker process submitted (module docstring).

    Called from the task's thread (``submit``, ``block``), from whatever
    thread reads the worker's socket (``settle``, ``answer``), and from
    finalizers (``free``, borrowed copies' release); ``lock`` guards the
    tables. Messages go out through :meth:`Worker.flush` (``take_outgoing``),
    so a burst of submits travels in one SUBMIT.
    """

    def __init__(self, worker):
        self.worker = worker
        self.worker_id = worker.worker_id
        self.lock = threading.RLock()  # (finalizers of ours may run inside)
        self.ids = itertools.count(1)
        self.pending: dict[int, NestedFuture] = {}   # submitted, outcome not back
        self.args: dict[int, object] = {}            # their encoded arguments, until then
        self.holding: dict[int, list] = {}           # their dependencies, until then
        self.lent: dict[int, list] = {}              # local id -> [future, references out]
        self.functions = serialize.FunctionCache(serialize.dumps)
        self.sent_functions: set[bytes] = set()
        self.outgoing: dict[MessageType, list] = {}
        self.serving = False  # the worker serves tasks (not in its initializer)
        self.borrows = BorrowTable(self._queue, worker.store.view)
        self.handle = ExecutorHandle(self, None)

    def _queue(self, kind: MessageType, item) -> None:
        with self.lock:
            self.outgoing.setdefault(kind, []).append(item)
        self.worker.wake_flusher()

    # -- from the task ------------------------------------------------------------

    def submit(self, fn, args, kwargs, options) -> NestedFuture:
        local_id = next(self.ids)
        name = serialize.describe_callable(fn)
        future = NestedFuture(self, local_id, f"task {self.worker_id}.{local_id} ({name})")
        fn_id, fn_bytes = self.functions.get(fn)
        data, deps = serialize.dumps_arguments(args, kwargs, self.worker.store,
                                               context=self)
        # (None: the executor's max_retries, as for the driver's tasks)
        options = (0.0, None, None, 0) if options is None else \
            (options.timeout or 0.0, options.max_retries, options.request,
             options.memory_limit or 0)
        item = [local_id, fn_id, fn_bytes, name, data, (), options]
        with self.lock:
            self.pending[local_id] = future
            self.args[local_id] = data
            self.holding[local_id] = list(deps.values())
            waiting = [dep for dep in deps.values() if not dep.done()]
            if not waiting:
                self._send_locked(item, deps)
        if not waiting:
            self.worker.wake_flusher()
            return future
        entry = _Entry()
        entry.future, entry.item, entry.deps, entry.waiting = future, item, deps, len(waiting)
        for dep in waiting:
            dep.add_done_callback(lambda _dep, e=entry: self._dependency_done(e))
        return future

    def _dependency_done(self, entry: _Entry) -> None:
        failed = None
        with self.lock:
            entry.waiting -= 1
            future = entry.future
            if entry.waiting or future.object_id not in self.pending:
                return
            for dep in entry.deps.values():
                if dep.cancelled() or dep._exception is not None:
                    failed = dep
                    self._forget_locked(future.object_id)
                    break
            else:
                self._send_locked(entry.item, entry.deps)
        if failed is None:
            self.worker.wake_flusher()
        elif failed.cancelled():
            future.cancel()
        else:
            future.set_exception(failed._exception)

    def _send_locked(self, item, deps) -> None:
        fn_id = item[1]
        if fn_id in self.sent_functions:
            item[2] = b""
        else:
            self.sent_functions.add(fn_id)
        item[5] = tuple((oid, dep._payload()) for oid, dep in deps.items())
        self.outgoing.setdefault(MessageType.SUBMIT, []).append(tuple(item))

    def _forget_locked(self, local_id: int) -> None:
        self.pending.pop(local_id, None)
        self.holding.pop(local_id, None)
        data = self.args.pop(local_id, None)
        if data is not None and type(data) is not bytes:
            self._discard(data)

    def _discard(self, data) -> None:
        """Our own stored argument pieces: the task is over. Freed through the head,
        which also removes the copies other hosts pulled (core.directory)."""
        inband, pieces = data
        frees = self.outgoing.setdefault(MessageType.FREE, [])
        for piece in (inband, *pieces):
            if type(piece) is Location:
                frees.append(tuple(piece))

    def request_stop(self, local_id: int) -> None:
        """Cancel (or stop, if it started) a nested task: the head decides which."""
        with self.lock:
            if local_id not in self.pending:
                return
            self._forget_locked(local_id)
            self.outgoing.setdefault(MessageType.CANCEL, []).append(local_id)
        self.worker.wake_flusher()

    def cancel_children(self, task) -> None:
        """``task`` (id, attempt) was stopped or timed out: so is what it submitted."""
        with self.lock:
            children = [f for f in self.pending.values() if f._parent == task]
        for future in children:
            future.cancel()

    def block(self, futures, done, timeout) -> bool:
        """Wait until ``done()``, lending this worker to what the futures need meanwhile.

        False: this thread cannot lend the worker (not the task's thread); the
        caller waits as usual, and the watchdog delivers the outcomes.
        """
        with self.lock:
            awaited = set()
            stack = list(futures)
            while stack:  # a task still waiting here for its inputs: wait for those
                future = stack.pop()
                if type(future) is not NestedFuture or future.done():
                    continue
                if future.object_id in self.pending:
                    awaited.add(future.object_id)
                stack.extend(self.holding.get(future.object_id, ()))
        return self.worker.lend(sorted(awaited), done, timeout)

    # -- borrowing ------------------------------------------------------------------

    def lend_reference(self, future: NestedFuture):
        """One of ours pickled outside a task's arguments: kept alive for borrowers."""
        with self.lock:
            entry = self.lent.get(future.object_id)
            if entry is None:
                self.lent[future.object_id] = [future, 0]
        return _borrow, (self.worker_id, future.object_id, future._description)

    def borrow(self, owner_id: int, local_id: int, description: str):
        if owner_id == self.worker_id:  # one of ours came back: the future itself
            with self.lock:
                entry = self.lent.get(local_id)
                future = entry[0] if entry is not None else self.pending.get(local_id)
            if future is not None:
                return future
        return self.borrows.borrow(owner_id, local_id, description)

    def free(self, location: Location) -> None:
        """A stored piece of a nested result lost its last holder here."""
        self._queue(MessageType.FREE, tuple(location))

    # -- from the socket ------------------------------------------------------------

    def take_outgoing(self) -> dict:
        with self.lock:
            outgoing, self.outgoing = self.outgoing, {}
        return outgoing

    def settle(self, outcomes) -> None:
        """OUTCOMES: how our nested tasks ended (no lock of the worker's held)."""
        for local_id, status, payload in outcomes:
            with self.lock:
                future = self.pending.get(local_id)
                self._forget_locked(local_id)
            if future is None:
                continue
            if status == ResultStatus.OK and type(payload) is not bytes:
                payload = _pieces(payload, lambda loc: NestedBlock(loc, self))
            _settle(future, status, payload)

    def answer(self, requests) -> None:
        """GET: borrowers want values of ours; each is sent once it is done."""
        for borrower, local_id in requests:
            with self.lock:
                entry = self.lent.get(local_id)
                future = entry[0] if entry is not None else self.pending.get(local_id)
                if entry is not None:
                    entry[1] += 1
            if future is None:
                self._queue(MessageType.VALUE, (borrower, local_id, ResultStatus.ERROR,
                                                serialize.dumps_exception(RuntimeError(
                                                    f"future {self.worker_id}.{local_id} is"
                                                    " no longer held by its owner"))))
                continue
            future.add_done_callback(lambda f, b=borrower, i=local_id: self._reply(b, i, f))

    def _reply(self, borrower: int, local_id: int, future) -> None:
        if future.cancelled():
            status, payload = ResultStatus.CANCELLED, b""
        elif future._exception is not None:
            status, payload = ResultStatus.ERROR, serialize.dumps_exception(future._exception)
        else:
            status, payload = ResultStatus.OK, future._payload()
        self._queue(MessageType.VALUE, (borrower, local_id, status, payload))

    def released(self, requests) -> None:
        """RELEASE: a borrower let go of one of ours."""
        with self.lock:
            for _borrower, local_id in requests:
                entry = self.lent.get(local_id)
                if entry is not None:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del self.lent[local_id]


class ExecutorHandle(concurrent.futures.Executor):
    """The executor as a task sees it: submits from here are owned by this worker.

    What an :class:`~futurepool.Executor` passed to a task arrives as, and what
    :func:`current_executor` returns. ``submit`` and ``map`` have the stdlib's
    signatures; ``options()`` and ``put()`` work as on the executor.
    ``shutdown`` only waits for (or, with ``cancel_futures``, cancels) what
    this worker submitted: the executor itself belongs to the driver.
    """

    def __init__(self, owner: NestedOwner, options):
        self._nested = owner
        self._options = options

    def __reduce__(self):
        if not serialize.pickling_arguments():
            raise TypeError("a futurepool executor can only be passed as an argument of"
                            " one of its own tasks")
        if self._options is not None:
            return handle_with_options, (_executor_handle(), self._options)
        return _executor_handle, ()

    def submit(self, fn, /, *args, **kwargs):
        return self._nested.submit(fn, args, kwargs, self._options)

    def options(self, **options):
        return ExecutorHandle(self._nested, task_options(self._options, options))

    def put(self, value):
        """Store ``value`` once; a done future to pass to many tasks (as ``Executor.put``)."""
        nested = self._nested
        data = serialize.encode(value, nested.worker.store)
        if type(data) is not bytes:  # our own pieces, freed (through the head) when unused
            data = _pieces((tuple(data[0]) if type(data[0]) is Location else data[0],
                            tuple(p if type(p) is bytes else tuple(p) for p in data[1])),
                           lambda loc: NestedBlock(loc, nested))
        future = Future()
        future._description = f"put({type(value).__qualname__})"
        future._set_encoded_result(data)
        return future

    def shutdown(self, wait=True, *, cancel_futures=False):
        nested = self._nested
        if cancel_futures:
            with nested.lock:
                pending = list(nested.pending.values())
            for future in pending:
                future.cancel()
        if wait:
            with nested.lock:
                pending = list(nested.pending.values())
            concurrent.futures.wait(pending)

    def __repr__(self) -> str:
        given = f" {self._options!r}" if self._options is not None else ""
        return f"<futurepool executor handle in worker {self._nested.worker_id}{given}>"


def install(worker) -> NestedOwner:
    """Make ``worker``'s process an owner of nested futures (once, at start)."""
    global _current
    _current = NestedOwner(worker)
    return _current
