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
    pulled(): no room in C's store           ──► DROP of C's secondary copies, least
      (store full)                               recently used first; the PULL again, once
    free(): the last reference went          ──► FREE to the writer, DROP to every copy's node

A piece is known by its **primary** location (where its writer put it: the
driver's or a local worker's store on the head, or a remote worker's node,
told by the writer id). Copies are recorded here, per host (``HEAD`` or a
node index), by the primary's name. Blocks (``store.objects``) remain the
object table: Python's references decide when a piece is freed, and this
directory then frees every copy with it.

Store pressure. A pull that finds no room in its host's store (shared
memory at capacity and the spill directory full) makes room there: the
host's **secondary** copies are dropped, least recently placed first, until
the piece's size is freed, then the pull is asked again once (after
ROOM_WAIT). A copy is secondary while another live host holds the piece (its
primary's host, or another copy's); never dropped: the last copy, one a task
placed on that host takes, one a pull in progress reads, and one handed out
to a reader the directory does not follow (a driver's ``result()``, a
borrower's value: dropping it would free no memory while they hold it, and
they would read it again). Still no room: the task (or ``result()``) gets
ObjectStoreFullError saying so. ``evicted_copies`` / ``evicted_bytes``
count what was dropped (``futurepool status``).

All state here belongs to the owner's I/O thread. The head's transfer
endpoint reports through ``owner.post``; nodes report through PULLED on
their control connection (``core.head``).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import weakref

from ..errors import ObjectLostError, ObjectStoreFullError
from ..protocol.messages import MessageType
from ..store import serialize
from ..store.objects import NODE_SHIFT, Block, remote
from ..store.segments import Location
from ..store.transfer import STORE_FULL, describe_source
from .lineage import Reconstruction

#: The head's own store, in this module's host keys (remote nodes: their index).
HEAD = -1
#: Hosts at most in one pipelined-broadcast chain after the piece's holder
#: (B→C→D→E: 3); a pull past it starts a new chain from a complete copy.
MAX_CHAIN = 3
#: Seconds between dropping copies to make room on a host and asking its pull
#: again: the node unlinks them at once, but a worker that read one unmaps it
#: only when idle (it looks every 0.2 s, core.worker): until then its pages stay.
ROOM_WAIT = 0.5


def host_of(location: Location) -> int:
    """Which host's store holds a primary location."""
    return (location.writer >> NODE_SHIFT) - 1 if remote(location) else HEAD


def host_of_link(link) -> int:
    return link.index if link.remote else HEAD


class _Wanted:
    """One pull in progress: a piece on its way to one host, and who waits for it."""

    __slots__ = ("block", "name", "dest", "held", "fetchers", "sources", "depth", "downstream",
                 "chained", "room", "upstream")

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
        self.upstream: _Wanted | None = None  # that host's pull, while this one may use it
        self.room: tuple[int, int] | None = None  # copies, bytes dropped for it (store full)


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
        # For store pressure (module docstring): what a copy's piece is, when it was last
        # placed (a tick of ``clock``), and which copies were handed out (never dropped).
        self.homes: dict[str, int] = {}  # primary name -> its primary's host
        self.last_used: dict[tuple[str, int], int] = {}  # (primary name, host) -> tick
        self.pinned: set[tuple[str, int]] = set()
        self.clock = itertools.count(1)
        self.evicted_copies = 0  # secondary copies dropped to make room (futurepool status)
        self.evicted_bytes = 0
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
        else:
            self.last_used[(location.name, dest)] = next(self.clock)
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
            if wanted is None or wanted.downstream or wanted.depth >= MAX_CHAIN \
                    or wanted.room is not None:  # (waiting for room: nothing arrives there)
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
        wanted.upstream = upstream
        self.by_piece[(location.name, dest)] = pull_id
        self._send_pull(pull_id, dest, location.nbytes, sources)
        return wanted

    def _send_pull(self, pull_id: int, dest: int, nbytes: int, sources) -> None:
        if dest == HEAD:
            self.head.transfer.pull(pull_id, nbytes, sources)
        else:
            self.head.by_index[dest].send_control(
                MessageType.PULL, serialize.dumps_plain([(pull_id, nbytes, sources)]))

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
            self.pinned.add((block.location.name, HEAD))  # the driver reads it from now on
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
            self.pinned.add((location.name, dest))  # its reader may read it again later
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
        full = location is None and why.startswith(STORE_FULL)
        if full and wanted.room is None and self._make_room(pull_id, wanted):
            return  # asked again once the room is there
        _unchain(wanted)
        self.by_piece.pop((wanted.name, dest), None)
        block = wanted.block()
        error = rebuild = None
        if full:  # the value is not lost: nothing to rebuild, and no room for it anyway
            error = self._store_full(wanted, why)
        elif location is None:
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
            self.homes[wanted.name] = host_of(block.location)
            self.last_used[(wanted.name, dest)] = next(self.clock)
            if wanted.fetchers:  # handed out: a driver's result(), a borrower (deliver)
                self.pinned.add((wanted.name, dest))
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

    # -- store pressure -----------------------------------------------------------------

    def _make_room(self, pull_id: int, wanted: _Wanted) -> bool:
        """A pull found ``wanted.dest``'s store full: drop secondary copies there, least
        recently placed first, until its size is freed (or none is left to drop); whether
        anything was, and then the pull is asked again after ROOM_WAIT (it stays current)."""
        host, block = wanted.dest, wanted.block()
        if block is None or self.head is None:
            return False
        nbytes = block.location.nbytes
        keep = self._in_use(host)
        candidates = sorted(
            (self.last_used.get((name, host), 0), name, held[host])
            for name, held in self.copies.items()
            if host in held and name not in keep and (name, host) not in self.pinned
            and self._held_elsewhere(name, host))
        dropped, freed = [], 0
        for _, name, copy in candidates:
            if freed >= nbytes:
                break
            dropped.append(copy)
            freed += copy.nbytes
            self._forget(name, host)
        wanted.room = (len(dropped), freed)
        if not dropped:
            return False
        self._drop(host, dropped)
        self.evicted_copies += len(dropped)
        self.evicted_bytes += freed
        self.pulls[pull_id] = wanted
        self.owner._add_timer(ROOM_WAIT, lambda: self._pull_again(pull_id, wanted))
        return True

    def _pull_again(self, pull_id: int, wanted: _Wanted) -> None:
        if self.pulls.get(pull_id) is not wanted or self.head is None:
            return  # its host was lost meanwhile (its tasks run elsewhere), or the cluster
        block = wanted.block()
        sources = self._sources(block.location, wanted.dest) if block is not None else []
        if not sources:
            self.pulled(wanted.dest, pull_id, None, "no copy left to pull from")
            return
        wanted.sources, wanted.chained = sources, False  # (from complete copies only)
        _unchain(wanted)
        self._send_pull(pull_id, wanted.dest, block.location.nbytes, sources)

    def _in_use(self, host: int) -> set[str]:
        """Pieces (primary names) whose copy on ``host`` must stay: tasks placed on its
        workers take them (sent, or held for a pull), or a pull in progress reads it."""
        names = set()
        for worker in self.owner.scheduler.workers.values():
            if worker.inflight and host_of_link(worker.link) == host:
                for task in worker.inflight:
                    names.update(_stored_names(task))
        for wanted in self.pulls.values():
            names.update(source[4] for source in wanted.sources
                         if source[0] == host and len(source) > 4)
        return names

    def _held_elsewhere(self, name: str, host: int) -> bool:
        """Whether a live host other than ``host`` holds the piece (never the last copy)."""
        holders = set(self.copies.get(name, ()))
        holders.add(self.homes.get(name, host))
        holders.discard(host)
        head = self.head
        return any(other == HEAD or (other in head.by_index and not head.by_index[other].leaving)
                   for other in holders)

    def _forget(self, name: str, host: int) -> None:
        """The copy of ``name`` on ``host`` is gone (dropped, or with its host)."""
        copies = self.copies.get(name)
        if copies is not None:
            copies.pop(host, None)
            if not copies:
                del self.copies[name]
                self.homes.pop(name, None)
        self.last_used.pop((name, host), None)
        self.pinned.discard((name, host))

    def _store_full(self, wanted: _Wanted, why: str) -> ObjectStoreFullError:
        dropped, freed = wanted.room or (0, 0)
        block = wanted.block()
        size = f" ({block.location.nbytes:,} bytes)" if block is not None else ""
        made = (f"{dropped} {'copy' if dropped == 1 else 'copies'} of other values there"
                f" ({freed:,} bytes) dropped to make room did not make enough" if dropped else
                "nothing there could be dropped to make room (all it holds are last copies"
                " of values, values its tasks take, or values handed out to be read there)")
        return ObjectStoreFullError(
            f"Could not copy the stored value {wanted.name}{size} to"
            f" {self._describe(wanted.dest)}: the store on that host is full; {made}."
            " Free results you no longer need, or give that host a larger store"
            " (FUTUREPOOL_STORE_CAPACITY, or FUTUREPOOL_SPILL_DIR on a larger disk)."
            f" ({why[len(STORE_FULL):]})")

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
        self.homes.pop(location.name, None)
        if not copies:
            return
        for host in copies:
            self.last_used.pop((location.name, host), None)
            self.pinned.discard((location.name, host))
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
        for name in [name for name, copies in self.copies.items() if host in copies]:
            self._forget(name, host)
        for pull_id in [p for p, wanted in self.pulls.items() if wanted.dest == host]:
            wanted = self.pulls.pop(pull_id)
            _unchain(wanted)
            self.by_piece.pop((wanted.name, host), None)


def _unchain(wanted: _Wanted) -> None:
    """``wanted`` forwards from its upstream no more: that pull may head another link."""
    upstream, wanted.upstream = wanted.upstream, None
    if upstream is not None:
        upstream.downstream -= 1


def _blocks(task):
    """The Blocks among a task's arguments and its done dependencies' results."""
    yield from _payload_blocks(task.args)
    for dep in task.deps.values():
        yield from _payload_blocks(dep._encoded)


def _stored_names(task):
    """The primary names of every stored piece a task takes (a Block, or a piece a nested
    task's owner keeps: core.relay)."""
    for payload in (task.args, *(dep._encoded for dep in task.deps.values())):
        if type(payload) is not tuple:
            continue
        inband, pieces = payload
        for piece in (inband, *pieces):
            location = getattr(piece, "location", None)
            if location is not None:
                yield location.name


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
