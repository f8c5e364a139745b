"""Stored pieces between hosts: chunked, windowed pulls over CURVE, straight into a segment.

::

    puller (node C, or the head)                          holder (node B, or the head)
    ────────────────────────────                          ────────────────────────────
    reserve a segment of `nbytes` in its store
    CHUNK_REQUEST(t, i, offset, length, chunk) ────────► map the piece read-only (shared
      a run of chunks i, i+1, ... (TRANSFER_RUN);        lock: its writer cannot reuse it)
      up to TRANSFER_WINDOW chunks asked at once
    write each into the segment at its offset ◄──────── CHUNK(t, i), CHUNK(t, i+1), ...:
      once a run's worth has landed, ask the next run      zero-copy slices, back to back
    all bytes there: commit, report the Location
    CHUNK_ERROR, or no chunk for TRANSFER_TIMEOUT:
      abort (the segment is unlinked), next source; none left: report why

Routes. Every host runs one :class:`Endpoint`: a thread with its own zmq
context, CURVE on every socket, a ZAP handler admitting only the cluster's
keys (FAULTS.md §1b: a forged chunk is unpickled by its reader, so data
sockets are as sensitive as control):

* a node with an address binds a ROUTER there (node keypair) and other
  nodes dial it: the **direct** path, node to node;
* every node also dials the **head's endpoint** (a ROUTER with the head's
  keypair) and says TRANSFER_HELLO: the head then asks it for chunks over
  that connection (the node need not be reachable), serves pieces of the
  head's own store to it, and **relays**: a CHUNK_REQUEST naming a node as
  its source is passed to that node's connection, and its CHUNKs back, chunk
  by chunk (never the whole object staged at the head).

Integrity: CURVE authenticates every message (Poly1305), so a chunk arrives
whole and unaltered or not at all; the puller checks each chunk's length and
the total. A request must name a piece of the session of the store it asks
(``<session>-...``), within that piece's size: nothing else of the host is
readable through it.

Pipelined broadcast (Hoplite). A host still pulling a piece serves it too:
the directory names the piece by its **primary name** (each source's fifth
element, kept by the pull as its key) and may put a host whose pull is in
progress first in another host's sources. A CHUNK_REQUEST naming the key of a
pull in progress here, for that piece's exact size, is answered from the
reserved segment chunk by chunk: each chunk that has landed at once, the others
as they land; if this host's own pull fails, the deferred requests get
CHUNK_ERROR (the requester goes on to its next source). Once the pull is
committed the key stays an alias of the copy until the copy is dropped. A
request may arrive before this host has heard of its own pull (the head
sends both PULLs at once, on different connections): a request for a piece
not here waits up to ``_EARLY_WAIT`` for a pull of it to start, and is
refused after that.
Chunks that landed stay landed when a pull moves to its next source: only
the missing ones are asked for again.

Threads: the endpoint's sockets, pulls and relays belong to its thread;
other threads call :meth:`Endpoint.pull` (queued, wakes the thread) and
:meth:`Endpoint.drop` (the segment writer is thread-safe). A finished pull
is reported through ``on_done(pull_id, location or None, why)``, called on
the endpoint's thread (pulled: ``why`` says from which source, ``"source N: ..."``,
N its place in the list).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import threading
import time

import zmq

from .. import config
from ..errors import ObjectLostError, ObjectStoreFullError, ProtocolError
from ..protocol import faults, security
from ..protocol.framing import decode_header, pack_header
from ..protocol.messages import CHUNK_BODY, MessageType
from ..protocol.zap import Authenticator
from . import segments, shared
from .segments import Location, SegmentWriter, StoreSettings

LOGGER = logging.getLogger("futurepool")

#: The writer id of copies a transfer made (segment names ``<session>--2-<n>``).
COPY_WRITER = -2
#: How the ``why`` of a pull that found no room in this host's store begins
#: (``core.directory`` then drops other copies there, and asks again).
STORE_FULL = "store full: "
#: Largest chunk a holder serves (a guard; pullers ask for config.TRANSFER_CHUNK).
MAX_CHUNK = 64 << 20
#: Most bytes, and chunks, one request asks for (a run; pullers ask for config.TRANSFER_RUN).
MAX_RUN = 256 << 20
MAX_RUN_CHUNKS = 1024
#: Pieces a holder keeps mapped between requests (each holds a shared lock).
_MAX_VIEWS = 16
#: Seconds a holder keeps an idle piece mapped.
_VIEW_IDLE = 2.0
#: Seconds a request for a piece not held here waits for a pull of it to start here
#: (a chained pull's source may hear of its own pull after its downstream asks).
_EARLY_WAIT = 0.5


class _Pull:
    __slots__ = ("pull_id", "name", "nbytes", "sources", "tried", "errors",
                 "location", "seg", "tid", "route", "asked_source", "next_offset",
                 "outstanding", "received", "progress", "chunk", "window", "started",
                 "key", "landed", "waiters", "run")

    def __init__(self, pull_id, nbytes, sources, location, seg):
        self.pull_id = pull_id
        self.name = ""  # as the current source names it
        self.nbytes = nbytes
        self.sources = list(sources)
        self.tried = 0
        self.errors: list[str] = []
        self.location = location
        self.seg = seg
        self.tid = 0
        self.route = None  # (socket, routing id or None)
        self.asked_source = -1
        self.next_offset = 0
        self.outstanding: set[int] = set()
        self.received = 0
        self.progress = 0.0
        self.chunk = max(1, config.TRANSFER_CHUNK)
        self.window = max(1, config.TRANSFER_WINDOW)
        self.run = min(self.window, max(1, config.TRANSFER_RUN))
        self.started = time.monotonic()
        # The piece's primary name (a source's 5th element): what hosts pulling after
        # this one ask for while it is still arriving here (pipelined broadcast).
        self.key = self.sources[0][4] if self.sources and len(self.sources[0]) > 4 else ""
        self.landed: set[int] = set()  # chunk indexes written (kept across sources)
        self.waiters: list[tuple] = []  # deferred requests: (route, index, tid, offset, length)


def _covered(pull: _Pull, offset: int, length: int) -> bool:
    """Whether every chunk of ``pull`` that bytes ``offset..offset+length`` touch has landed."""
    first, last = offset // pull.chunk, (offset + length - 1) // pull.chunk
    return all(i in pull.landed for i in range(first, last + 1))


def describe_source(source) -> str:
    index, address = source[:2]
    if index < 0:
        return "the head"
    return f"node {index} ({address})" if address else f"node {index} (relayed by the head)"


def local_address(toward: str) -> str:
    """The address of this host's interface that reaches ``toward`` (``tcp://HOST:PORT``)."""
    host, _, port = toward[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, int(port or 9)))  # no packet is sent: only a route is chosen
        return probe.getsockname()[0]


class Endpoint:
    """One host's transfer endpoint (module docstring); ``head``: the head's, which relays.

    Args:
        keys: the cluster's :class:`~futurepool.protocol.security.ClusterKeys`.
        settings: the store pulled pieces are written into and served from.
        head: whether this is the head's endpoint.
        bind: ``tcp://HOST:0``-style address to listen on, or None (a node nobody
            can dial: everything it needs or holds goes through the head).
        hub: a node's: the head endpoint's address; ``node_index`` its index there.
        on_done: ``on_done(pull_id, Location or None, why)``, on this thread.
        zero_copy: send chunks without copying them (default: not in the head).
        exported: the head's: piece name -> the name of a segment of the stdlib's
            shared memory it stands for (``store.shared``), served from that segment.
    """

    def __init__(self, keys, settings: StoreSettings, *, head: bool, bind: str | None,
                 hub: str | None = None, node_index: int = -1, on_done=None,
                 zero_copy: bool | None = None, exported: dict | None = None):
        self.keys = keys
        self.exported = exported if exported is not None else {}
        self._pull_delay = faults.seconds("delay-pull")
        # Zero-copy sends of our own buffers start pyzmq's process-wide garbage thread:
        # not in the driver's process (its program would find a thread it did not
        # start), where a chunk is copied once into its message instead.
        self.zero_copy = not head if zero_copy is None else zero_copy
        self.settings = settings
        self.is_head = head
        self.node_index = node_index
        self.on_done = on_done or (lambda *_: None)
        self.prefix = settings.session + "-"
        self.writer = SegmentWriter(settings, COPY_WRITER)
        self.ctx = zmq.Context(1)
        self.auth = Authenticator(self.ctx, security.admitted_keys(
            keys, security.Role.HEAD if head else security.Role.NODE))
        self.server = None
        self.address = None
        self.hub = None
        self._dealers: dict[str, zmq.Socket] = {}  # address -> DEALER to that node
        self._by_socket: dict[zmq.Socket, str] = {}
        self._new_dealers: list[zmq.Socket] = []  # to add to the poller
        self._commands: collections.deque = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._tids = itertools.count(1)
        self._pulls: dict[int, _Pull] = {}    # by transfer id (one per attempt)
        self._relays: dict[int, tuple] = {}   # head: relay id -> (sock, peer, tid, chunk, when)
        self._reverse: dict[int, bytes] = {}  # head: node index -> its connection's routing id
        self._views: collections.OrderedDict[str, list] = collections.OrderedDict()
        self._partial: dict[str, _Pull] = {}   # key (primary name) -> pull in progress
        # Requests for a piece not here (yet): name -> [(deadline, why, nbytes, waiter)]
        self._early: dict[str, list] = {}
        self._aliases: dict[str, Location] = {}  # key -> the copy that pull made here
        self._stopping = False
        self.dropped = 0   # malformed messages from authenticated peers
        self.refusals = 0  # requests naming what this host does not hold
        self.relayed = 0   # chunks passed on (head)
        self.forwarded = 0  # chunks served from a pull still in progress
        try:
            if bind is not None:
                self.server = self._socket(zmq.ROUTER)
                self.server.setsockopt(zmq.ROUTER_MANDATORY, 1)
                security.make_curve_server(
                    self.server, keys, role=security.Role.HEAD if head else security.Role.NODE)
                self.auth.watch(self.server)
                self.server.bind(bind)
                self.address = self.server.getsockopt(zmq.LAST_ENDPOINT).decode()
            if hub is not None:
                self._connect_hub(hub, node_index)
        except BaseException:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._run, name="futurepool-transfer",
                                        daemon=True)
        self._thread.start()

    def _socket(self, kind) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max(MAX_CHUNK, 2 * config.TRANSFER_CHUNK) + 4096)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        return sock

    # -- other threads -------------------------------------------------------------

    def pull(self, pull_id: int, nbytes: int, sources) -> None:
        """Copy a piece into this host's store from the first of ``sources`` that has it.

        ``sources``: ``((node index or -1 for the head, its transfer address or "",
        the piece's name there, spilled), ...)``, tried in order.
        """
        if not self._thread.is_alive():  # stopped (or failed): nobody would answer
            self.on_done(pull_id, None, "the transfer endpoint stopped")
            return
        command = ("pull", pull_id, int(nbytes), tuple(tuple(s) for s in sources))
        if self._pull_delay:  # a testing fault (protocol.faults)
            timer = threading.Timer(self._pull_delay, self._post, (command,))
            timer.daemon = True
            timer.start()
            return
        self._post(command)

    def join_hub(self, address: str, node_index: int) -> None:
        """A node's: dial the head's endpoint (it asks for chunks, and relays, through it)."""
        self._post(("hub", address, node_index))

    def drop(self, locations) -> None:
        """Remove pieces of this host's store (copies made here, or orphaned pieces)."""
        for location in locations:
            location = Location(*location)
            if not location.name.startswith(self.prefix) or "/" in location.name:
                continue  # never anything outside this session's store
            for key, copy in list(self._aliases.items()):
                if copy.name == location.name:
                    self._aliases.pop(key, None)
            self.writer.free(location)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; pulls in progress are aborted (their segments removed)."""
        if self._thread.is_alive():
            self._post(("stop",))
            self._thread.join(timeout)
        if not self._thread.is_alive() and self._wake_r >= 0:
            self.writer.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1

    def _post(self, command) -> None:
        self._commands.append(command)
        if self._wake_w < 0:
            return  # closed
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # full: it wakes anyway; closed: it is gone

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        for sock in self.auth.sockets:
            poller.register(sock, zmq.POLLIN)
        for sock in (self.server, self.hub):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        next_tick = 0.0
        try:
            while not self._stopping:
                wait_ms = 20 if self._early else config.HEARTBEAT_INTERVAL * 500
                for what, _ in poller.poll(wait_ms):
                    if what == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                    elif what is self.server or what is self.hub or what in self._by_socket:
                        self._drain(what)
                    else:
                        self.auth.handle()
                while self._commands:
                    command = self._commands.popleft()
                    if command[0] == "stop":
                        self._stopping = True
                        break
                    if command[0] == "hub":
                        self._connect_hub(*command[1:])
                        poller.register(self.hub, zmq.POLLIN)
                    else:
                        self._start(*command[1:])
                for sock in self._new_dealers:
                    poller.register(sock, zmq.POLLIN)
                self._new_dealers.clear()
                now = time.monotonic()
                self._check_progress(now)
                if self._early:
                    self._expire_early(now)
                if now >= next_tick:
                    next_tick = now + config.HEARTBEAT_INTERVAL
                    self.auth.tick()
                    self._expire_views(now)
                    if self.hub is not None:
                        self._hello()  # again: a re-dialled connection is a new peer there
        except BaseException:  # noqa: BLE001 - never die silently: fail what is pending
            LOGGER.critical("futurepool transfer thread failed", exc_info=True)
        finally:
            for pull in list(self._pulls.values()):
                self._end(pull, None, "the transfer endpoint stopped")
            self._views.clear()
            self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self.server, self.hub, *self._dealers.values()):
            if sock is not None:
                sock.close(linger=0)
        self._dealers.clear()
        self.auth.close()
        self.ctx.term()

    def _connect_hub(self, address: str, node_index: int) -> None:
        self.node_index = node_index
        self.hub = self._socket(zmq.DEALER)
        security.make_curve_client(self.hub, self.keys)
        self.hub.connect(address)
        self._hello()

    def _hello(self) -> None:
        try:
            self.hub.send_multipart([pack_header(MessageType.TRANSFER_HELLO),
                                     b"%d" % self.node_index], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _dealer(self, address: str) -> zmq.Socket:
        sock = self._dealers.get(address)
        if sock is None:
            sock = self._socket(zmq.DEALER)
            security.make_curve_client(sock, self.keys, role=security.Role.NODE,
                                       server=security.Role.NODE)
            sock.connect(address)
            self._dealers[address] = sock
            self._by_socket[sock] = address
            self._new_dealers.append(sock)
        return sock

    # -- input ---------------------------------------------------------------------

    def _drain(self, sock: zmq.Socket) -> None:
        router = sock is self.server
        for _ in range(10000):
            try:
                first = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            peer = None
            if router:
                peer = first
                if not sock.getsockopt(zmq.RCVMORE):
                    self.dropped += 1
                    continue
                first = sock.recv()
            try:
                header = decode_header(first)
            except ProtocolError as exc:
                self.dropped += 1
                LOGGER.warning("transfer: dropped a malformed message: %s", exc)
                self._skip(sock)
                continue
            kind = header.kind
            try:
                if kind == MessageType.CHUNK:
                    self._chunk(sock, header)
                elif kind == MessageType.CHUNK_REQUEST:
                    self._serve(sock, peer, header, self._rest(sock))
                elif kind == MessageType.CHUNK_ERROR:
                    self._chunk_error(header, self._rest(sock))
                elif kind == MessageType.TRANSFER_HELLO and router and self.is_head:
                    self._reverse[int(self._rest(sock))] = peer
                else:
                    self.dropped += 1
                    self._skip(sock)
            except (ValueError, UnicodeDecodeError) as exc:
                self.dropped += 1
                LOGGER.warning("transfer: dropped a malformed %s: %s", kind.name, exc)
                self._skip(sock)

    @staticmethod
    def _rest(sock) -> bytes:
        body = sock.recv() if sock.getsockopt(zmq.RCVMORE) else b""
        Endpoint._skip(sock)
        return body

    @staticmethod
    def _skip(sock) -> None:
        while sock.getsockopt(zmq.RCVMORE):
            sock.recv(copy=False)

    def _send(self, route, frames) -> bool:
        sock, peer = route
        try:
            # (Frames received and passed on, as relays do, are never copied.)
            sock.send_multipart(frames if peer is None else [peer, *frames], zmq.NOBLOCK,
                                copy=not self.zero_copy)
            return True
        except zmq.ZMQError:  # ROUTER_MANDATORY: that peer is gone
            return False

    # -- holding: serve chunks (and relay, at the head) -----------------------------

    def _serve(self, sock, peer, header, body: bytes) -> None:
        source, offset, length, nbytes, chunk = CHUNK_BODY.unpack_from(body)
        name = body[CHUNK_BODY.size:].decode()
        route = (sock, peer)
        if source >= 0:
            if self.is_head:
                self._relay(route, header, source, body)
            else:
                self._refuse(route, header, "a node relays nothing")
            return
        chunk = chunk or length
        if length > MAX_RUN or chunk > MAX_CHUNK or offset + length > nbytes or length == 0 \
                or length > chunk * MAX_RUN_CHUNKS:
            self._refuse(route, header, f"chunks {offset}+{length} (of {chunk}) outside"
                                        f" {nbytes} bytes, or too many")
            return
        end, tid = offset + length, header.ident
        chunks = [(index, start, min(chunk, end - start)) for index, start in
                  enumerate(range(offset, end, chunk), header.count)]
        partial = self._partial.get(name)
        if partial is not None and partial.nbytes == nbytes:  # still arriving: forward
            for index, start, size in chunks:
                if _covered(partial, start, size):
                    self._forward(partial, route, index, tid, start, size)
                else:
                    partial.waiters.append((route, index, tid, start, size))
            return
        alias = self._aliases.get(name)
        if alias is not None and alias.nbytes == nbytes:
            name = alias.name  # a pull that was in progress here has finished: its copy
        try:
            view = self._view(name, nbytes)
        except (ObjectLostError, PermissionError) as exc:  # (not here; another host's key)
            if "/" in name or name.endswith(".free"):
                self._refuse(route, header, str(exc))
                return
            # Perhaps the head just chained a pull from here whose own PULL has not
            # reached this endpoint yet (it travels on another connection): the request
            # waits a little for it (see _start) before it is refused (well before its
            # sender would give up on us).
            deadline = time.monotonic() + min(_EARLY_WAIT, config.TRANSFER_TIMEOUT / 4)
            self._early.setdefault(name, []).extend(
                (deadline, str(exc), nbytes, (route, index, tid, start, size))
                for index, start, size in chunks)
            return
        except (ValueError, OSError) as exc:
            self._refuse(route, header, str(exc))
            return
        for index, start, size in chunks:
            self._send(route, [pack_header(MessageType.CHUNK, index, tid),
                               view[start:start + size]])
        if end == nbytes:  # the last chunk: let the writer reuse it when freed
            self._views.pop(name, None)

    def _forward(self, pull: _Pull, route, index: int, tid: int, offset: int,
                 length: int) -> None:
        """Serve a chunk that has landed in a pull still in progress (copied into its
        message: the segment may be aborted while zmq still sends)."""
        sock, peer = route
        frames = [pack_header(MessageType.CHUNK, index, tid)]
        with memoryview(pull.seg.mapping()) as whole, whole[offset:offset + length] as part:
            frames.append(part)
            try:
                sock.send_multipart(frames if peer is None else [peer, *frames], zmq.NOBLOCK,
                                    copy=True)
                self.forwarded += 1
            except zmq.ZMQError:
                pass  # that peer is gone
            del frames

    def _wake(self, pull: _Pull) -> None:
        if not pull.waiters:
            return
        waiting = []
        for waiter in pull.waiters:
            route, index, tid, offset, length = waiter
            if _covered(pull, offset, length):
                self._forward(pull, route, index, tid, offset, length)
            else:
                waiting.append(waiter)
        pull.waiters = waiting

    def _refuse(self, route, header, why: str) -> None:
        self._refuse_waiter((route, header.count, header.ident), why)

    def _refuse_waiter(self, waiter, why: str) -> None:
        route, index, tid = waiter[:3]
        self.refusals += 1
        self._send(route, [pack_header(MessageType.CHUNK_ERROR, index, tid),
                           why.encode()[:1000]])

    def _expire_early(self, now: float) -> None:
        for name in [n for n, waiting in self._early.items() if waiting[0][0] <= now]:
            waiting = self._early.pop(name)
            keep = [entry for entry in waiting if entry[0] > now]
            if keep:
                self._early[name] = keep
            for deadline, why, _, waiter in waiting:
                if deadline <= now:
                    self._refuse_waiter(waiter, why)

    def _view(self, name: str, nbytes: int) -> memoryview:
        if not name.startswith(self.prefix) or "/" in name or name.endswith(".free"):
            raise PermissionError(f"{name!r} is not a piece of this host's session")
        entry = self._views.get(name)
        if entry is not None and len(entry[0]) >= nbytes:
            entry[1] = time.monotonic()
            self._views.move_to_end(name)
            return entry[0]
        # A SharedMemory passed to a task is read where it is (store.shared).
        segment = self.exported.get(name)
        places = [(Location(segment, nbytes, False, 0), (shared.SHM_ROOT, shared.SHM_ROOT))] \
            if segment is not None else \
            [(Location(name, nbytes, spilled, 0), self.settings.dirs) for spilled in (False, True)]
        view = None
        for location, dirs in places:
            try:
                view = segments.read(location, dirs)
                break
            except ObjectLostError:
                continue
            except ValueError:  # mmap: the file is shorter than asked
                raise ValueError(f"{name} holds fewer than {nbytes:,} bytes") from None
        if view is None:
            raise ObjectLostError(f"{name} is not held here (freed, or never written)", name)
        self._views[name] = [view, time.monotonic()]
        while len(self._views) > _MAX_VIEWS:
            self._views.popitem(last=False)
        return view

    def _expire_views(self, now: float) -> None:
        for name in [n for n, (_, used) in self._views.items() if now - used > _VIEW_IDLE]:
            del self._views[name]
        for rid in [r for r, entry in self._relays.items()
                    if now - entry[4] > 2 * config.TRANSFER_TIMEOUT]:
            del self._relays[rid]

    def _relay(self, route, header, source: int, body: bytes) -> None:
        target = self._reverse.get(source)
        if target is None:
            self._refuse(route, header, f"node {source} has no transfer connection to the head")
            return
        rid = next(self._tids)
        _, offset, length, nbytes, chunk = CHUNK_BODY.unpack_from(body)
        chunks = -(-length // (chunk or length or 1))
        self._relays[rid] = [route[0], route[1], header.ident, chunks, time.monotonic()]
        ok = self._send((self.server, target), [
            pack_header(MessageType.CHUNK_REQUEST, header.count, rid),
            CHUNK_BODY.pack(-1, offset, length, nbytes, chunk) + body[CHUNK_BODY.size:]])
        if not ok:
            del self._relays[rid]
            self._reverse.pop(source, None)
            self._refuse(route, header, f"node {source} is not connected to the head")

    # -- pulling ---------------------------------------------------------------------

    def _start(self, pull_id, nbytes, sources) -> None:
        try:
            location, seg = self.writer.reserve(nbytes)
        except ObjectStoreFullError as exc:
            self.on_done(pull_id, None, f"{STORE_FULL}{exc}")
            return
        except Exception as exc:  # noqa: BLE001 - an OSError
            self.on_done(pull_id, None, f"{type(exc).__name__}: {exc}")
            return
        pull = _Pull(pull_id, nbytes, sources, location, seg)
        # (The key names the piece on its writer's host, a session of its own: only what
        # this pull writes into this session's store is ever served under it.)
        if pull.key and pull.key not in self._partial:
            self._partial[pull.key] = pull
            for _, why, size, waiter in self._early.pop(pull.key, ()):
                if size == nbytes:
                    pull.waiters.append(waiter)  # (served as their chunks land: _wake)
                else:
                    self._refuse_waiter(waiter, why)
        self._next_source(pull, None)

    def _next_source(self, pull: _Pull, why: str | None) -> None:
        if why is not None:
            pull.errors.append(f"from {describe_source(pull.sources[pull.tried - 1])}: {why}")
        self._pulls.pop(pull.tid, None)
        pull.outstanding.clear()
        pull.next_offset = 0  # (what landed stays: only the rest is asked for again)
        while pull.tried < len(pull.sources):
            index, address, pull.name = pull.sources[pull.tried][:3]
            pull.tried += 1
            if self.is_head:
                peer = self._reverse.get(index)
                if peer is None:
                    pull.errors.append(f"from {describe_source((index, address))}: it has no"
                                       " transfer connection to the head")
                    continue
                pull.route, pull.asked_source = (self.server, peer), -1
            elif address:
                pull.route, pull.asked_source = (self._dealer(address), None), -1
            else:  # the head's own store (-1), or a node nobody can dial: relayed
                if self.hub is None:
                    pull.errors.append(f"from {describe_source((index, address))}: not"
                                       " connected to the head's transfer endpoint")
                    continue
                pull.route, pull.asked_source = (self.hub, None), index
            pull.tid = next(self._tids)
            pull.progress = time.monotonic()
            self._pulls[pull.tid] = pull
            if self._ask(pull):
                return
            self._pulls.pop(pull.tid, None)
            pull.errors.append(f"from {describe_source((index, address))}: not connected")
        self._end(pull, None, "; ".join(pull.errors) or "no copy to pull from")

    def _ask(self, pull: _Pull) -> bool:
        """Keep up to ``window`` chunks requested, ``run`` consecutive ones per request
        (asked once that many are free, or the rest are fewer); False if the route is gone."""
        name = pull.name.encode()
        chunk, nbytes, landed = pull.chunk, pull.nbytes, pull.landed
        while pull.next_offset < nbytes:
            free = pull.window - len(pull.outstanding)
            if free < min(pull.run, -(-(nbytes - pull.next_offset) // chunk)):
                break
            start = end = pull.next_offset
            indexes = []
            while end < nbytes and len(indexes) < min(free, pull.run):
                index = end // chunk
                if index in landed:  # (from an earlier source: not asked again)
                    if indexes:
                        break
                    start = end = end + min(chunk, nbytes - end)
                    continue
                indexes.append(index)
                end += min(chunk, nbytes - end)
            pull.next_offset = end
            if not indexes:
                continue
            if not self._send(pull.route, [
                    pack_header(MessageType.CHUNK_REQUEST, indexes[0], pull.tid),
                    CHUNK_BODY.pack(pull.asked_source, start, end - start, nbytes, chunk)
                    + name]):
                return False
            pull.outstanding.update(indexes)
        return True

    def _chunk(self, sock, header) -> None:
        if not sock.getsockopt(zmq.RCVMORE):
            self.dropped += 1
            return
        tid, index = header.ident, header.count
        pull = self._pulls.get(tid)
        if pull is None:
            relay = self._relays.get(tid) if self.is_head else None
            frame = sock.recv(copy=False)
            self._skip(sock)
            if relay is not None:  # a chunk for a node that asked through us: pass it on
                rsock, rpeer, rtid = relay[:3]
                relay[3] -= 1  # chunks of its run still to come
                relay[4] = time.monotonic()
                if relay[3] <= 0:
                    del self._relays[tid]
                self.relayed += 1
                self._send((rsock, rpeer), [pack_header(MessageType.CHUNK, index, rtid), frame])
            return  # else: late, for an attempt given up on
        if index not in pull.outstanding or index in pull.landed:
            self._skip(sock)
            return
        offset = index * pull.chunk
        length = min(pull.chunk, pull.nbytes - offset)
        seg = pull.seg
        try:
            if seg.fd is None:  # a pooled segment: straight into its mapped pages
                with memoryview(seg.mm) as whole, whole[offset:offset + length] as target:
                    got = sock.recv_into(target)
            else:  # fresh pages: through the file (see segments.write_file)
                frame = sock.recv(copy=False)
                got = len(frame)
                if got == length:
                    seg.write(offset, frame.buffer)
        except OSError as exc:
            self._skip(sock)
            if segments.no_room(exc):
                self._reserve_again(pull)
            else:
                self._end(pull, None, f"{type(exc).__name__}: {exc}")
            return
        self._skip(sock)
        if got != length:
            self._next_source(pull, f"chunk {index} had {got:,} bytes, expected {length:,}")
            return
        pull.outstanding.discard(index)
        pull.landed.add(index)
        pull.received += length
        pull.progress = time.monotonic()
        self._wake(pull)
        if pull.received == pull.nbytes:  # (why: which source it came from, at the end)
            self._end(pull, pull.location, f"source {pull.tried - 1}:"
                                           f" {describe_source(pull.sources[pull.tried - 1])}")
        elif not self._ask(pull):
            self._next_source(pull, "not connected")

    def _reserve_again(self, pull: _Pull) -> None:
        """The filesystem filled up while the pull's segment was being written: a
        new one (spilled, if shared memory is still full), and every chunk again."""
        try:
            location, seg = self.writer.reserve(pull.nbytes)
        except ObjectStoreFullError as exc:  # (_end removes the old segment)
            self._end(pull, None, f"{STORE_FULL}{exc}")
            return
        except Exception as exc:  # noqa: BLE001 - an OSError
            self._end(pull, None, f"{type(exc).__name__}: {exc}")
            return
        self.writer.abort(pull.location, pull.seg)
        pull.location, pull.seg = location, seg
        pull.landed.clear()
        pull.received = 0
        pull.tried -= 1  # the same source again, under a new transfer id
        self._next_source(pull, None)

    def _chunk_error(self, header, body: bytes) -> None:
        tid = header.ident
        pull = self._pulls.get(tid)
        if pull is not None:
            self._next_source(pull, body.decode(errors="replace"))
            return
        relay = self._relays.pop(tid, None) if self.is_head else None
        if relay is not None:
            rsock, rpeer, rtid = relay[:3]
            self._send((rsock, rpeer), [pack_header(MessageType.CHUNK_ERROR, header.count, rtid),
                                        body])

    def _check_progress(self, now: float) -> None:
        limit = config.TRANSFER_TIMEOUT
        for pull in [p for p in self._pulls.values() if now - p.progress > limit]:
            self._next_source(pull, f"no data for {limit:g} s (the holder died, froze or"
                                    " is cut off)")

    def _end(self, pull: _Pull, location, why: str) -> None:
        self._pulls.pop(pull.tid, None)
        if self._partial.get(pull.key) is pull:
            del self._partial[pull.key]
        if location is not None:
            self._wake(pull)  # (everything has landed: nobody is left waiting)
            if pull.key:
                self._aliases[pull.key] = location
        for route, index, tid, _, _ in pull.waiters:  # this host's own pull failed
            self._send(route, [pack_header(MessageType.CHUNK_ERROR, index, tid),
                               f"its own pull failed: {why}".encode()[:1000]])
        pull.waiters = []
        if location is None:
            self.writer.abort(pull.location, pull.seg)  # nothing half-written stays
        else:
            self.writer.commit(pull.location, pull.seg)
            took = time.monotonic() - pull.started
            LOGGER.debug("pulled %s (%d bytes) in %.3f s", pull.name, pull.nbytes, took)
        try:
            self.on_done(pull.pull_id, location, why)
        except Exception:  # noqa: BLE001 - a callback must not stop the endpoint
            LOGGER.exception("transfer: reporting pull %d", pull.pull_id)


__all__ = ["COPY_WRITER", "STORE_FULL", "Endpoint", "local_address", "describe_source"]
