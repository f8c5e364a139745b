"""The head's side of nested ownership: it places the tasks tasks submit, then forgets them.

A worker whose task submits tasks owns their futures (``core.nested``). The
head keeps only what placement needs, and only while the task is out::

    owner worker W               Relay (owner's I/O thread)                 any worker X
    ──────────────               ──────────────────────────                 ────────────
    SUBMIT ───────────────────►  a Task whose future is a RelayFuture ─► the owner's ready
                                  queue: placed like any task ───── TASKS ──► runs it
    OUTCOMES ◄─── batched ◄────  RelayFuture settled: passed on, forgotten ◄─ RESULTS
    WAITING/RESUMED ──────────►  W is blocked: nothing new for it but
    (RETURN: tasks queued           its own tasks, lent to it ────── LEND ──► W runs inline
     behind the blocked one)
    GET/VALUE/RELEASE ◄───────►  passed between a borrower and the owner

Stored results travel as locations, never as bytes through the head. The
head's Block of a nested result stays in :attr:`Relay.handed` until its owner
frees it (FREE): the Block, not the owner, decides when the piece and every
copy of it go (``core.directory``). A piece the owner wrote itself (its
arguments, a ``put``) stays the owner's to free. A receiver on another host
than the piece gets a copy pulled to its host first (``ObjectDirectory.deliver``).
A result whose only copy is lost on its way to its owner's host (its host was
lost) is made again by running its task again (``Relay._rebuild``), within
``max_reconstructions``, as ``core.lineage`` does for the driver's results.

When an owner dies, its tasks that have not run are dropped, the ones
running are stopped, and the processes that borrowed its futures hear
OWNER_DIED; what it borrowed is released at its owners.
"""

from __future__ import annotations

import functools
import logging

from ..errors import ObjectLostError, OwnerDiedError, ProtocolError
from ..protocol.messages import MessageType, ResultStatus
from ..store import segments, serialize
from ..store.objects import Block
from ..store.segments import Location
from .calls import Task
from .directory import HEAD, host_of_link
from .nested import BorrowTable, _Mapped

LOGGER = logging.getLogger("futurepool")

#: The borrower id of the driver itself (workers' ids are >= 0).
DRIVER = -1
#: How far into the ready queue a blocked worker's own tasks are looked for.
LEND_SCAN = 1024
#: Tasks blocked on one worker's stack past which it is lent only what its top task
#: awaits (each lent task runs on top of the blocked ones: the stack is the bound).
LEND_DEPTH = 8

_PENDING, _RUNNING, _DONE, _CANCELLED = range(4)


class RelayFuture:
    """What the owner's code sees as a nested task's future: it reports to the owner."""

    __slots__ = ("relay", "owner_id", "local_id", "state")
    _exception = None

    def __init__(self, relay: Relay, owner_id: int, local_id: int):
        self.relay = relay
        self.owner_id = owner_id
        self.local_id = local_id
        self.state = _PENDING

    def set_running_or_notify_cancel(self) -> bool:
        if self.state == _CANCELLED:
            return False
        self.state = _RUNNING
        return True

    def cancel(self) -> bool:
        if self.state != _PENDING:
            return self.state == _CANCELLED
        self.state = _CANCELLED
        self.relay.report(self, ResultStatus.CANCELLED, b"")
        return True

    def cancelled(self) -> bool:
        return self.state == _CANCELLED

    def done(self) -> bool:
        return self.state >= _DONE

    def _set_encoded_result(self, payload) -> None:
        if self.state >= _DONE:
            return  # stopped or dropped: its owner does not want it
        self.state = _DONE
        self.relay.report(self, ResultStatus.OK, payload)

    def set_exception(self, exc: BaseException) -> None:
        if self.state >= _DONE:
            return
        self.state = _DONE
        self.relay.report(self, ResultStatus.ERROR, serialize.dumps_exception(exc))


class _Resolved:
    """A dependency the owner worker resolved before it sent the task."""

    __slots__ = ("_encoded",)

    def __init__(self, payload):
        self._encoded = payload

    def _payload(self):
        return self._encoded


class Relay:
    """Nested tasks in flight, for one owner (the driver's I/O thread's state)."""

    def __init__(self, owner):
        self.owner = owner
        self.tasks: dict[tuple, Task] = {}  # (owner worker id, its id) -> task
        self.functions: dict[bytes, bytes] = {}  # every function a worker sent us once
        self.outgoing: dict[int, dict] = {}  # worker id -> kind -> items, sent by flush()
        # Name sent to an owner -> (the Block keeping the piece, the owner): until it frees.
        self.handed: dict[str, tuple] = {}
        self.blocked: dict[int, object] = {}  # worker id -> its slot, while a task waits
        self.borrowers: dict[int, set] = {}  # owner id -> who asked it for values
        self.borrowed: dict[int, set] = {}  # borrower worker id -> {(owner, id)} it holds
        dirs = owner.store.settings.dirs
        self.read = lambda location: segments.read(location, dirs)
        # Futures inside the driver's results: the driver borrows them.
        self.driver_borrows = BorrowTable(self._driver_send, self.read)

    # -- from workers ---------------------------------------------------------------

    def message(self, slot, kind: MessageType, body) -> None:
        if kind == MessageType.RESUMED:
            if slot.frames:
                slot.frames.pop()
            if not slot.frames:
                self.blocked.pop(slot.worker_id, None)
            return
        try:
            items = serialize.loads(body)
        except Exception as exc:  # noqa: BLE001 - garbage from a worker: drop it, say so
            raise ProtocolError(f"{kind.name} body: {type(exc).__name__}: {exc}") from exc
        if kind == MessageType.SUBMIT:
            self._submit(slot, items)
        elif kind == MessageType.WAITING:
            self._waiting(slot, *items)
        elif kind == MessageType.RETURN:
            self._take_back(slot, items)
        elif kind == MessageType.CANCEL:
            for local_id in items:
                self._cancel(slot.worker_id, local_id)
        elif kind == MessageType.FREE:
            for location in items:
                held = self.handed.pop(location[0], None)
                if held is None:  # a piece it wrote itself
                    self.owner._free(Location(*location))
                # (else the Block goes now, and with it the piece and its copies)
        elif kind == MessageType.GET:
            for owner_id, local_id in items:
                self._get(slot.worker_id, owner_id, local_id)
        elif kind == MessageType.VALUE:
            for borrower, local_id, status, payload in items:
                self._value(slot.worker_id, borrower, local_id, status, payload)
        elif kind == MessageType.RELEASE:
            for owner_id, local_id in items:
                self.borrowed.get(slot.worker_id, set()).discard((owner_id, local_id))
                self._send(owner_id, MessageType.RELEASE, (slot.worker_id, local_id))

    def _submit(self, slot, items) -> None:
        owner = self.owner
        worker_id = slot.worker_id
        for local_id, fn_id, fn_bytes, fn_name, args, deps, options in items:
            timeout, retries, resources, memory_limit = options
            if fn_bytes:
                self.functions[fn_id] = fn_bytes
            else:
                fn_bytes = self.functions[fn_id]
            args = self._held(args)  # its pieces, as pieces the directory can place
            deps = tuple((oid, self._held(payload)) for oid, payload in deps)
            future = RelayFuture(self, worker_id, local_id)
            task = Task(future, fn_id, fn_bytes, fn_name, args,
                        {oid: _Resolved(payload) for oid, payload in deps},
                        owner.max_retries if retries is None else retries, timeout,
                        retries is not None, resources, memory_limit)
            task.waiting = 0
            task.owner_id = worker_id
            self.tasks[(worker_id, local_id)] = task
            owner.submitted += 1
            if owner.broken is not None:
                owner._settle_exception(task, owner._broken_error())
                continue
            owner.tasks[task.task_id] = task
            owner.ready.append(task)

    def _held(self, payload):
        """A worker's encoded value with each location as the piece the head knows:
        the Block of a result handed to it, or (its own piece) a reference."""
        if type(payload) is bytes:
            return payload
        inband, pieces = payload
        hold = self._hold
        return hold(inband), tuple(hold(piece) for piece in pieces)

    def _hold(self, piece):
        if type(piece) is bytes or type(piece) is Block or type(piece) is _Mapped:
            return piece
        held = self.handed.get(piece[0])
        if held is not None:
            return held[0]
        return _Mapped(Location(*piece), self.read)

    def _waiting(self, slot, frame, awaited, returned) -> None:
        """A task of ``slot``'s blocks on futures it owns (``awaited``: their ids)."""
        slot.frames.append((tuple(frame), {(slot.worker_id, i) for i in awaited}))
        slot.lent = 0  # what it was lent (if that is what blocks) is a frame now
        self.blocked[slot.worker_id] = slot
        self._take_back(slot, returned)

    def _take_back(self, slot, returned) -> None:
        """Tasks a blocked worker will not run: first in the queue again."""
        wanted = {tuple(item) for item in returned}
        if not wanted:
            return
        kept = [t for t in slot.inflight if (t.task_id, t.attempt) not in wanted]
        back = [t for t in slot.inflight if (t.task_id, t.attempt) in wanted]
        slot.inflight.clear()
        slot.inflight.extend(kept)
        for task in reversed(back):
            slot.backlog -= task.estimate
            if slot.quota is not None:
                slot.quota += 1
            if task.task_id == slot.lent:
                slot.lent = 0
            self.owner.ready.appendleft(task)
        if not kept:
            slot.backlog = 0.0

    def _cancel(self, owner_id: int, local_id: int) -> None:
        task = self.tasks.pop((owner_id, local_id), None)
        if task is None:
            return
        future = task.future
        if future.state == _PENDING:
            future.state = _CANCELLED  # its owner forgot it already: nothing to report
            self.owner.tasks.pop(task.task_id, None)  # (left in the queue: skipped)
        elif future.state == _RUNNING:
            future.state = _CANCELLED
            self.owner._stop_task(task.task_id)

    # -- to workers -----------------------------------------------------------------

    def report(self, future: RelayFuture, status, payload) -> None:
        """A nested task's outcome, for its owner (batched until :meth:`flush`)."""
        task = self.tasks.pop((future.owner_id, future.local_id), None)
        lost = None
        if status == ResultStatus.OK and task is not None:
            lost = functools.partial(self._rebuild, task)
        self._deliver(future.owner_id, MessageType.OUTCOMES, (future.local_id, status),
                      payload, hand=True, lost=lost)

    def _rebuild(self, task: Task, error: ObjectLostError):
        """A nested result's only copy was lost before it reached its owner's host: its
        task runs again (None), or the error its owner gets (off, or past the limit).

        The lineage of a nested result is its Task, kept only while the result is on
        its way: once delivered, the owner's host holds a copy for as long as the
        owner lives (and the owner's futures die with it), so nothing else can lose it.
        """
        owner, future = self.owner, task.future
        if future.state != _DONE or owner.broken is not None or owner.head is None:
            return error
        lineage = owner.objects.lineage
        try:
            lineage.check(error, error.name, error.host, task.rebuilds,
                          f"the nested task that made it ({task.fn_name})", task.fn_name)
        except ObjectLostError as final:
            return final
        task.rebuilds += 1
        task.attempt += 1  # (anything late from the first run is fenced)
        lineage.rebuilt += 1
        LOGGER.warning("rebuilding the result of nested %s: its stored value %s lived only on"
                       " %s, which was lost before it reached its owner (reconstruction %d of"
                       " at most %d)", task.describe(), error.name, error.host, task.rebuilds,
                       lineage.limit)
        future.state = _PENDING
        self.tasks[(future.owner_id, future.local_id)] = task
        owner.tasks[task.task_id] = task
        owner.ready.append(task)
        return None

    def _deliver(self, worker_id: int, kind: MessageType, fields: tuple, payload,
                 hand: bool = False, lost=None) -> None:
        """Queue ``(*fields, payload)`` for a worker (or the driver), once every stored
        piece of ``payload`` is on its host; ``hand``: it owns the pieces from now on.
        ``lost(error)``: a piece had no copy left to pull; None if it handles that (a
        rebuild), else the error to send."""
        if type(payload) is bytes:
            self._send(worker_id, kind, (*fields, payload))
            return
        if worker_id == DRIVER:
            dest = HEAD
        else:
            slot = self.owner.scheduler.workers.get(worker_id)
            if slot is None:
                return  # gone: the pieces go with the payload
            dest = host_of_link(slot.link)
        pieces = [self._hold(piece) for piece in (payload[0], *payload[1])]
        located: list = [None] * len(pieces)
        waiting = [len(pieces)]

        def arrived(index, location, error):
            if waiting[0] <= 0:
                return  # failed already
            if error is not None:
                waiting[0] = 0
                if lost is not None and isinstance(error, ObjectLostError):
                    error = lost(error)
                    if error is None:
                        return
                self._send(worker_id, kind, (*fields[:-1], ResultStatus.ERROR,
                                             serialize.dumps_exception(error)))
                return
            located[index] = location if type(location) is bytes else tuple(location)
            waiting[0] -= 1
            if waiting[0]:
                return
            if hand:  # kept until it frees what we sent
                for piece, sent in zip(pieces, located):
                    if type(piece) is Block:
                        self.handed[sent[0]] = (piece, worker_id)
            self._send(worker_id, kind, (*fields, (located[0], tuple(located[1:]))))

        for index, piece in enumerate(pieces):
            if type(piece) is bytes:
                arrived(index, piece, None)
                continue
            self.owner.objects.deliver(
                piece, dest, lambda location, error, i=index: arrived(i, location, error))

    def _send(self, worker_id: int, kind: MessageType, item) -> None:
        if worker_id == DRIVER:
            if kind == MessageType.VALUE:
                self.driver_borrows.valued([item])
            return
        self.outgoing.setdefault(worker_id, {}).setdefault(kind, []).append(item)

    def flush(self) -> None:
        outgoing, self.outgoing = self.outgoing, {}
        workers = self.owner.scheduler.workers
        for worker_id, kinds in outgoing.items():
            slot = workers.get(worker_id)
            for kind, items in kinds.items():
                if slot is None:
                    continue  # gone: what it would have got is freed with the items
                try:
                    slot.link.send(slot, kind, len(items), serialize.dumps_plain(items))
                except Exception:  # noqa: BLE001 - it just left; its node tells us how
                    LOGGER.debug("could not send %s to worker %d", kind.name, worker_id,
                                 exc_info=True)

    # -- placement: a blocked worker runs its own tasks ---------------------------------

    def lend(self, assign) -> None:
        """Lend each blocked worker with nothing in hand a task it owns, if one waits.

        ``assign(task, slot)`` sends it (as LEND). The awaited tasks come first;
        then any other task the worker owns, so its subtree goes on.
        """
        ready = self.owner.ready
        for worker_id, slot in list(self.blocked.items()):
            if slot.lent or not slot.alive or not slot.frames:
                continue
            awaited = slot.frames[-1][1]
            any_owned = len(slot.frames) < LEND_DEPTH
            choice = None
            for index, task in enumerate(ready):
                if index >= LEND_SCAN:
                    break
                if task.owner_id != worker_id or task.resources is not None:
                    continue  # (a task that asks for resources is placed by them)
                if (worker_id, task.future.local_id) in awaited:
                    choice = index
                    break
                if choice is None and any_owned:
                    choice = index
            if choice is not None:
                task = ready[choice]
                del ready[choice]
                if task.future.state == _CANCELLED:
                    self.owner.tasks.pop(task.task_id, None)
                    continue
                assign(task, slot)
                slot.lent = task.task_id

    # -- failures ---------------------------------------------------------------------

    def blocked_tasks(self, slot) -> set:
        """(task id, attempt) of the tasks blocked under the one ``slot`` ran last."""
        return {frame for frame, _awaited in slot.frames}

    def worker_gone(self, slot) -> None:
        """A worker died: what it owned is cancelled, what it borrowed released."""
        worker_id = slot.worker_id
        self.blocked.pop(worker_id, None)
        slot.frames.clear()
        for key in [key for key in self.tasks if key[0] == worker_id]:
            task = self.tasks.pop(key)
            future = task.future
            if future.state == _PENDING:
                future.state = _CANCELLED
                self.owner.tasks.pop(task.task_id, None)
            elif future.state == _RUNNING:
                future.state = _CANCELLED
                self.owner._stop_task(task.task_id)
        self.outgoing.pop(worker_id, None)
        for name in [name for name, held in self.handed.items() if held[1] == worker_id]:
            del self.handed[name]  # what it held of results goes (the Blocks free it)
        for borrower in self.borrowers.pop(worker_id, ()):
            if borrower == DRIVER:
                self.driver_borrows.owners_died([worker_id], self._describe_owner(slot))
            else:
                self._send(borrower, MessageType.OWNER_DIED, worker_id)
        for owner_id, local_id in self.borrowed.pop(worker_id, ()):
            self._send(owner_id, MessageType.RELEASE, (worker_id, local_id))

    @staticmethod
    def _describe_owner(slot):
        where = slot.link.host if slot.link is not None else "?"
        return lambda owner_id: f"worker {owner_id} (pid {slot.pid}, on {where})"

    # -- borrowing ----------------------------------------------------------------------

    def _get(self, borrower: int, owner_id: int, local_id: int) -> None:
        if owner_id not in self.owner.scheduler.workers:  # it died already
            error = OwnerDiedError(f"worker {owner_id}", f"future {owner_id}.{local_id}")
            if borrower == DRIVER:
                self.driver_borrows.owners_died([owner_id], lambda _o: error.owner)
            else:
                self._send(borrower, MessageType.VALUE,
                           (owner_id, local_id, ResultStatus.ERROR,
                            serialize.dumps_exception(error)))
            return
        self.borrowers.setdefault(owner_id, set()).add(borrower)
        if borrower != DRIVER:
            self.borrowed.setdefault(borrower, set()).add((owner_id, local_id))
        self._send(owner_id, MessageType.GET, (borrower, local_id))

    def _value(self, owner_id: int, borrower: int, local_id: int, status, payload) -> None:
        if borrower == DRIVER and type(payload) is bytes:
            self.driver_borrows.valued([(owner_id, local_id, status, payload)])
        elif borrower == DRIVER:  # once its pieces are on this host
            self._deliver(DRIVER, MessageType.VALUE, (owner_id, local_id, status), payload)
        else:
            self._deliver(borrower, MessageType.VALUE, (owner_id, local_id, status), payload)

    def _driver_send(self, kind: MessageType, key) -> None:
        """The driver's borrow table (any thread): to the I/O thread."""
        self.owner.post(("relay", kind, key))

    def driver_command(self, kind: MessageType, key) -> None:
        owner_id, local_id = key
        if kind == MessageType.GET:
            self._get(DRIVER, owner_id, local_id)
        else:
            self._send(owner_id, MessageType.RELEASE, (DRIVER, local_id))


#: What workers send the relay (as owners, blocked tasks, borrowers).
RELAY_KINDS = frozenset({MessageType.SUBMIT, MessageType.WAITING, MessageType.RESUMED,
                         MessageType.RETURN, MessageType.CANCEL, MessageType.FREE,
                         MessageType.GET, MessageType.VALUE, MessageType.RELEASE})
