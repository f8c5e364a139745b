"""Where stored pieces live across hosts: copies, pulls, and placement by locality.

::

    owner I/O thread                                   hosts
    ──────────────────────────────────────             ───────────────────────────────────
    _dispatch: task for worker w on node C
      place(): each stored piece of its         yes ─► TASKS with C's Locations
      arguments already on C?
                                                no  ─► PULL(pieces, sources) to C's node ──┐
      the task waits (held; its slot stays       (the head's own store: its endpoint)      │
      reserved in w.inflight)                                                              │
    pulled(): record the copy; every piece   ◄── PULLED(Location or why) ◄─────────────────┘
      there: the task goes; a pull that failed
      from every copy (or no copy left: its
      host was lost): the value is rebuilt
      from lineage and the task waits for it
      (core.lineage), else it fails with
      ObjectLostError
    free(): the last reference went          ──► FREE to the writer, DROP to every copy's node

A piece is known by its **primary** location (where its writer put it: the
driver's or a local worker's store on the head, or a remote worker's node,
told by the writer id). Copies are recorded here, per host (``HEAD`` or a
node index), by the primary's name. Blocks (``store.objects``) remain the
object table: Python's references decide when a piece is freed, and this
directory then frees every copy with it.

All state here belongs to the owner's I/O thread. The head's transfer
endpoint reports through ``owner.post``; nodes report through PULLED on
their control connection (``core.head``).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import weakref

from ..errors import ObjectLostError
from ..protocol.messages import MessageType
from ..store import serialize
from ..store.objects import NODE_SHIFT, Block, remote
from ..store.segments import Location
from ..store.transfer import describe_source
from .lineage import Reconstruction

#: The head's own store, in this module's host keys (remote nodes: their index).
HEAD = -1
#: Hosts at most in one pipelined-broadcast chain after the piece's holder
#: (B→C→D→E: 3); a pull past it starts a new chain from a complete copy.
MAX_CHAIN = 3


def host_of(location: Location) -> int:
    """Which host's store holds a primary location."""
    return (location.writer >> NODE_SHIFT) - 1 if remote(location) else HEAD


def host_of_link(link) -> int:
    return link.index if link.remote else HEAD


class _Wanted:
    """One pull in progress: a piece on its way to one host, and who waits for it."""

    __slots__ = ("block", "name", "dest", "held", "fetchers", "sources", "depth", "downstream",
                 "chained")

    def __init__(self, block: Block, dest: int, sources, depth: int = 1):
        self.block = weakref.ref(block)
        self.name = block.location.name
        self.dest = dest
        self.held: list[_Held] = []
        self.fetchers: list = []  # concurrent.futures.Future of a driver's result()
        self.sources = sources
        self.depth = depth  # its place in a broadcast chain (1: from a complete copy)
        self.downstream = 0  # pulls that forward from this one while it is in progress
        self.chained = False  # its first source is a host still receiving


class _Held:
    """A task placed on a worker whose host lacks some of its pieces: sent once pulled."""

    __slots__ = ("worker", "task", "attempt", "item", "pending", "error")

    def __init__(self, worker, task, item):
        self.worker = worker
        self.task = task
        self.attempt = task.attempt
        self.item = item
        self.pending = 0
        self.error: BaseException | None = None


class ObjectDirectory:
    """The owner's record of pieces across hosts; see the module docstring."""

    def __init__(self, owner):
        self.owner = owner
        self.copies: dict[str, dict[int, Location]] = {}  # primary name -> host -> copy
        self.pulls: dict[int, _Wanted] = {}
        self.by_piece: dict[tuple[str, int], int] = {}    # (primary name, host) -> pull id
        self.pull_ids = itertools.count(1)
        self.pulled_bytes = 0  # futurepool status, benchmarks
        self.pull_count = 0
        self.chained_pulls = 0  # pulls whose first source was a host still receiving
        self.forwarded_pulls = 0  # of those, pulls that got every chunk from it
        self.lost_hosts: dict[int, str] = {}  # host -> how it was described
        self.lineage = Reconstruction(owner)  # rebuilds what a lost host took (core.lineage)

    @property
    def head(self):
        return self.owner.head

    # -- placement ----------------------------------------------------------------------

    def affinity(self, task) -> dict[int, int] | None:
        """Bytes of ``task``'s stored pieces per host that holds them (None: nothing stored)."""
        if self.head is None:
            return None
        held: dict[int, int] = {}
        for block in _blocks(task):
            location = block.location
            hosts = {host_of(location)}
            copies = self.copies.get(location.name)
            if copies:
                hosts.update(copies)
            for host in hosts:
                held[host] = held.get(host, 0) + location.nbytes
        return held or None

    def place(self, worker, task, item):
        """``item`` (a TASKS entry) with Locations readable on ``worker``'s host, or None:
        held until its node has pulled what it lacks (then sent by :meth:`pulled`)."""
        if self.head is None:
            return item
        dest = host_of_link(worker.link)
        missing: dict[str, Block] = {}
        args = self._localize(item[4], dest, missing)
        deps = tuple((oid, self._localize(payload, dest, missing)) for oid, payload in item[5])
        if not missing:
            return (*item[:4], args, deps, *item[6:])
        held = _Held(worker, task, item)
        for block in missing.values():
            try:
                wanted = self._want(block, dest)
            except ObjectLostError as exc:
                try:  # its only copy went with a lost host: rebuilt, then the task goes
                    rebuild = self.lineage.lost(block, exc, self._describe(host_of(block.location)))
                except ObjectLostError as final:
                    held.error = final
                    break
                self.lineage.park(worker, task, rebuild)  # (fences the pulls started above)
                return None
            wanted.held.append(held)
            held.pending += 1
        if held.error is not None and held.pending == 0:
            self.owner._held_failed(worker, task, held.error)
        return None

    def _localize(self, payload, dest: int, missing: dict):
        if type(payload) is bytes:
            return payload
        inband, pieces = payload
        return (self._piece(inband, dest, missing),
                tuple(self._piece(piece, dest, missing) for piece in pieces))

    def _piece(self, piece, dest: int, missing: dict):
        if type(piece) is bytes or type(piece) is Location:
            return piece  # inline, or already a Location
        # A Block, or a piece a nested task's owner keeps (core.relay): same rules.
        location = piece.location
        if host_of(location) == dest:
            return location
        copy = self.copies.get(location.name, {}).get(dest)
        if copy is None:
            missing[location.name] = piece
        return copy

    # -- pulls --------------------------------------------------------------------------

    def _sources(self, location: Location, dest: int) -> list[tuple]:
        """Who can send a piece to ``dest``, best first: nodes others can dial, the
        head, then nodes reached only through the head."""
        head = self.head
        holders = [(host_of(location), location)]
        holders += list(self.copies.get(location.name, {}).items())
        direct, relayed, own = [], [], []
        for host, where in holders:
            if host == dest:
                continue
            if host == HEAD:
                own.append((HEAD, "", where.name, where.spilled, location.name))
                continue
            link = head.by_index.get(host)
            if link is None:
                continue  # lost with its host
            address = link.transfer if dest != HEAD else ""
            (direct if address else relayed).append(
                (host, address, where.name, where.spilled, location.name))
        return direct + own + relayed

    def _upstream(self, location: Location, dest: int):
        """Pipelined broadcast: the most recent pull of the same piece to another host that
        nobody forwards from yet and whose chain is short enough, and that host as a
        source (the piece named by its primary name: the key of that pull there)."""
        best = None
        for (name, host), pull_id in self.by_piece.items():
            if name != location.name or host == dest:
                continue
            wanted = self.pulls.get(pull_id)
            if wanted is None or wanted.downstream or wanted.depth >= MAX_CHAIN:
                continue
            if best is None or pull_id > best[0]:
                best = (pull_id, wanted)
        if best is None:
            return None, None
        wanted = best[1]
        host = wanted.dest
        if host == HEAD:
            return wanted, (HEAD, "", location.name, False, location.name)
        link = self.head.by_index.get(host)
        if link is None:
            return None, None
        address = link.transfer if dest != HEAD else ""
        return wanted, (host, address, location.name, False, location.name)

    def _want(self, block: Block, dest: int) -> _Wanted:
        location = block.location
        pull_id = self.by_piece.get((location.name, dest))
        if pull_id is not None:
            return self.pulls[pull_id]
        sources = self._sources(location, dest)
        if not sources:
            host = self._describe(host_of(location))
            raise ObjectLostError(
                f"The stored value {location.name} ({location.nbytes:,} bytes) is lost: it"
                f" lived on {host}, which left or was lost, and no other host holds a copy.",
                location.name, host)
        upstream, forwarder = self._upstream(location, dest)
        depth = 1
        if upstream is not None:  # a chain B→C→D rather than B→C, B→D
            sources = [forwarder, *sources]
            upstream.downstream += 1
            depth = upstream.depth + 1
            self.chained_pulls += 1
        pull_id = next(self.pull_ids)
        wanted = self.pulls[pull_id] = _Wanted(block, dest, sources, depth)
        wanted.chained = upstream is not None
        self.by_piece[(location.name, dest)] = pull_id
        if dest == HEAD:
            self.head.transfer.pull(pull_id, location.nbytes, sources)
        else:
            self.head.by_index[dest].send_control(
                MessageType.PULL, serialize.dumps_plain([(pull_id, location.nbytes, sources)]))
        return wanted

    def _describe(self, host: int) -> str:
        if host == HEAD:
            return "the head"
        link = self.head.by_index.get(host) if self.head is not None else None
        if link is not None:
            return link.describe()
        return self.lost_hosts.get(host, f"node {host}")

    def fetch(self, block: Block, future) -> None:
        """A driver's ``result()`` needs ``block`` here: pull it into the head's store."""
        copy = self.copies.get(block.location.name, {}).get(HEAD)
        if copy is not None:
            future.set_result(copy)
            return
        if self.head is None:
            future.set_exception(ObjectLostError(
                f"The stored value {block.location.name} lives on another host, and this"
                " executor has no cluster any more.", block.location.name))
            return
        future.rebuildable = True  # a result() in the driver: may wait for a rebuild
        try:
            self._want(block, HEAD).fetchers.append(future)
        except ObjectLostError as exc:
            try:
                rebuild = self.lineage.lost(block, exc, self._describe(host_of(block.location)))
            except ObjectLostError as final:
                future.set_exception(final)
                return
            self.lineage.wait_fetch(future, rebuild)

    def deliver(self, piece, dest: int, done) -> None:
        """``done(location, error)`` once ``piece`` (a Block, or what a nested task's owner
        keeps) can be read on host ``dest``: there already, or pulled (core.relay)."""
        location = piece.location
        if host_of(location) == dest:
            done(location, None)
            return
        copy = self.copies.get(location.name, {}).get(dest)
        if copy is not None:
            done(copy, None)
            return
        if self.head is None:
            done(None, ObjectLostError(
                f"The stored value {location.name} lives on another host, and this executor"
                " has no cluster any more.", location.name))
            return
        future = concurrent.futures.Future()
        future.add_done_callback(lambda f: done(*((None, f.exception()) if f.exception()
                                                  else (f.result(), None))))
        try:
            self._want(piece, dest).fetchers.append(future)
        except ObjectLostError as exc:
            future.set_exception(exc)

    def pulled(self, dest: int, pull_id: int, location, why: str) -> None:
        """A pull ended (from the head's endpoint, or a node's PULLED)."""
        wanted = self.pulls.pop(pull_id, None)
        if location is not None:
            location = Location(*location)
        if wanted is None or wanted.dest != dest:
            if location is not None:  # nobody wants it any more (its host was lost...)
                self._drop(dest, [location])
            return
        self.by_piece.pop((wanted.name, dest), None)
        block = wanted.block()
        error = rebuild = None
        if location is None:
            source = self._describe(host_of(block.location)) if block is not None else None
            error = ObjectLostError(
                f"Could not copy the stored value {wanted.name} to {self._describe(dest)}:"
                f" every copy failed ({why}); it was made on {source}.", wanted.name, source)
            if block is not None and (wanted.held or any(
                    getattr(f, "rebuildable", False) for f in wanted.fetchers)):
                try:  # no copy could be read (its host was lost): rebuilt from lineage
                    rebuild = self.lineage.lost(block, error, source)
                except ObjectLostError as final:
                    error = final
        elif block is None:  # freed while it travelled
            self._drop(dest, [location])
        else:
            self.copies.setdefault(wanted.name, {})[dest] = location
            self.pulled_bytes += location.nbytes
            self.pull_count += 1
            if wanted.chained and why.startswith("source 0:"):
                self.forwarded_pulls += 1
        for future in wanted.fetchers:
            if not future.done():
                if rebuild is not None and getattr(future, "rebuildable", False):
                    self.lineage.wait_fetch(future, rebuild)
                elif error is None:
                    future.set_result(location)
                else:
                    future.set_exception(error)
        for held in wanted.held:
            held.pending -= 1
            if rebuild is not None:
                if self._current(held):
                    self.lineage.park(held.worker, held.task, rebuild)
                continue
            if error is not None:
                held.error = error
            if held.pending == 0:
                self._release(held)

    @staticmethod
    def _current(held: _Held) -> bool:
        """Whether a held task still waits on its worker (not requeued, nor parked)."""
        worker, task = held.worker, held.task
        return task in worker.inflight and task.attempt == held.attempt and worker.alive

    def _release(self, held: _Held) -> None:
        worker, task = held.worker, held.task
        if not self._current(held):
            return  # requeued meanwhile (its worker died, or its node left), or parked
        if held.error is not None:
            self.owner._held_failed(worker, task, held.error)
            return
        item = self.place(worker, task, held.item)
        if item is not None:
            self.owner._send_tasks(worker, [item])

    # -- freeing ------------------------------------------------------------------------

    def free(self, location: Location) -> None:
        """The last reference to a piece went: remove every copy of it."""
        copies = self.copies.pop(location.name, None)
        if not copies:
            return
        by_host: dict[int, list] = {}
        for host, copy in copies.items():
            by_host.setdefault(host, []).append(copy)
        for host, locations in by_host.items():
            self._drop(host, locations)

    def orphan(self, location: Location) -> None:
        """A remote piece whose writer is gone: its node removes it."""
        self._drop(host_of(location), [location])

    def _drop(self, host: int, locations) -> None:
        head = self.head
        if head is None:
            return
        if host == HEAD:
            head.transfer.drop(locations)
            return
        link = head.by_index.get(host)
        if link is not None:
            link.send_control(MessageType.DROP,
                              serialize.dumps_plain([tuple(loc) for loc in locations]))

    def host_lost(self, host: int, description: str = "") -> None:
        """A node is gone: its copies with it. Pulls to it will never end: forgotten
        (the tasks held for them are its workers', which the owner buries and runs
        elsewhere). Pieces only it held are rebuilt when needed (core.lineage)."""
        self.lost_hosts[host] = description or f"node {host}"
        for copies in self.copies.values():
            copies.pop(host, None)
        for pull_id in [p for p, wanted in self.pulls.items() if wanted.dest == host]:
            wanted = self.pulls.pop(pull_id)
            self.by_piece.pop((wanted.name, host), None)


def _blocks(task):
    """The Blocks among a task's arguments and its done dependencies' results."""
    yield from _payload_blocks(task.args)
    for dep in task.deps.values():
        yield from _payload_blocks(dep._encoded)


def _payload_blocks(payload):
    if type(payload) is not tuple:  # bytes, or None (a dependency not done)
        return
    inband, pieces = payload
    if type(inband) is Block:
        yield inband
    for piece in pieces:
        if type(piece) is Block:
            yield piece


__all__ = ["HEAD", "ObjectDirectory", "describe_source", "host_of"]
