"""The head's side of the cluster: one TCP port, CURVE, and the nodes that joined.

::

    owner I/O thread                                 remote host
    ────────────────────────────────────────         ─────────────────────────────────
    Head ── ROUTER tcp://HOST:PORT (CURVE server) ◄── DEALER (CURVE client) ── futurepool
     │       ZAP: only the cluster's node key          worker (core.remote_node): control
     │       JOIN / WELCOME / HEARTBEAT / LEAVE        only, and its node's worker events
     │                                           ◄── DEALER per worker (CURVE client, node
     └─ one RemoteLink per node: how the owner         key), says hello (the session)
        sends to that node's workers                   TASKS / RESULTS, no hop between

Everything here runs on the owner's I/O thread, which polls :attr:`Head.sockets`
and calls :meth:`Head.handle` and, every loop, :meth:`Head.tick`. The owner
never learns TCP: it sends to a worker through the worker's link, and hears
of workers through the callbacks this module makes (``Owner._worker_message``,
and ``core.membership`` for nodes joining, leaving, lost, and workers exiting).

Trust: bodies from a node are unpickled (worker results, exceptions), so
only peers holding the cluster's key get a frame through (FAULTS.md §1b):
CURVE with ZAP admitting the derived node key; anything else is refused
before any application frame is read.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time

import cloudpickle
import zmq

from .. import __version__, config
from ..errors import ProtocolError
from ..protocol import faults, security
from ..protocol.channel import Channel
from ..protocol.framing import decode_header, pack_header
from ..protocol.messages import PROTOCOL_VERSION, MessageType
from ..protocol.zap import Authenticator
from ..store import serialize
from ..store.objects import NODE_SHIFT
from ..store.transfer import Endpoint
from . import startup, status
from .lifetime import weak_method
from .resources import describe, normalize

LOGGER = logging.getLogger("futurepool")

#: Worker ids of remote node ``n`` start at ``(n + 1) << NODE_ID_SHIFT`` (local ones below).
NODE_ID_SHIFT = NODE_SHIFT

#: Messages from remote workers (their own connections); the owner handles them as local ones.
_WORKER_KINDS = frozenset({MessageType.READY, MessageType.RESULTS, MessageType.INIT_FAILED,
                           MessageType.START_FAILED, MessageType.OUTPUT, MessageType.ACK,
                           MessageType.SUBMIT, MessageType.WAITING, MessageType.RESUMED,
                           MessageType.RETURN, MessageType.CANCEL, MessageType.FREE,
                           MessageType.GET, MessageType.VALUE, MessageType.RELEASE})


def versions() -> dict:
    """What must match between head and node: code objects do not cross minor versions."""
    return {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "futurepool": __version__,
            "cloudpickle": cloudpickle.__version__, "protocol": str(PROTOCOL_VERSION)}


def version_mismatch(ours: dict, theirs: dict) -> str:
    """One line per differing version (``''``: they match)."""
    return "; ".join(f"{key}: head {ours.get(key)} vs node {theirs.get(key)}"
                     for key in sorted(set(ours) | set(theirs))
                     if ours.get(key) != theirs.get(key))


class RemoteLink:
    """One joined node: how the owner reaches its workers, and what it knows of it."""

    remote = True

    def __init__(self, head: Head, routing_id: bytes, index: int, host: str, address: str,
                 workers: int, pid: int, token: bytes, transfer: str = ""):
        self.head = head
        # Its transfer endpoint, which other nodes dial ("": none; the head relays).
        self.transfer = transfer
        self.routing_id = routing_id
        self.index = index
        self.host = host
        self.address = address
        self.workers = workers
        self.pid = pid
        self.first_worker_id = (index + 1) << NODE_ID_SHIFT
        self.last_heard = time.monotonic()
        self.joined_at = time.time()
        self.leaving = False
        self.token = token  # the node's name for its session: it says it after a re-dial
        self.welcome: tuple[bytes, bytes] | None = None  # sent again if JOIN comes again
        self.routes: dict[int, bytes] = {}  # worker id -> routing id of its connection
        # Exactly-once over TCP (protocol.channel): the node's control messages, and
        # each of its workers' TASKS/RESULTS streams, by worker id.
        self.control = Channel(config.RESEND_AFTER)
        self.channels: dict[int, Channel] = {}

    def owns(self, worker_id: int) -> bool:
        return worker_id >> NODE_ID_SHIFT == self.index + 1

    def channel(self, worker_id: int) -> Channel:
        channel = self.channels.get(worker_id)
        if channel is None:
            channel = self.channels[worker_id] = Channel(config.RESEND_AFTER)
        return channel

    def send(self, worker, kind: MessageType, count: int, body: bytes = b"") -> None:
        """Straight to the worker's own connection, numbered and kept until acknowledged.

        Never raises: a worker that is not connected right now (its connection broke
        and is being dialled again) gets the message when it is resent; whether the
        worker is gone is for its node to say, or for the node's deadline.
        """
        header = self.channel(worker.worker_id).stamp(kind, count, worker.worker_id, body,
                                                      time.monotonic())
        try:
            self.head.transmit(worker.routing_id, kind, header, body)
        except zmq.ZMQError:
            pass

    def send_control(self, kind: MessageType, body: bytes) -> None:
        """To the node process itself (PULL, DROP), numbered and kept until acknowledged."""
        header = self.control.stamp(kind, 0, 0, body, time.monotonic())
        try:
            self.head.transmit(self.routing_id, kind, header, body)
        except zmq.ZMQError:
            pass  # resent with its heartbeats (Head._resend), or the node is lost

    def describe(self) -> str:
        return f"node {self.index} ({self.host}, {self.address})"


class Head:
    """The listening side of a cluster, owned by one owner's I/O thread."""

    def __init__(self, owner, context: zmq.Context, listen: str, keys):
        self.owner = owner
        self.keys = keys
        self.nodes: dict[bytes, RemoteLink] = {}   # by the node's control connection
        self.by_index: dict[int, RemoteLink] = {}  # by node index (its workers' ids)
        self.dropped = 0  # malformed messages from authenticated peers
        self.next_index = 0
        self.next_heartbeat = 0.0
        # Names this run: a worker introduces itself with it, so workers of an earlier
        # head on this address are never taken for this session's (FAULTS 35).
        self.session = os.urandom(16).hex().encode()
        # Every connection gets a routing id of its own (an identity reused across
        # re-dials is handed over unreliably by libzmq: zeromq/libzmq#2892). A peer
        # says who it is after each handshake: a worker the session, a node its token.
        self.routes: dict[bytes, int] = {}  # routing id -> remote worker id
        self.by_token: dict[bytes, RemoteLink] = {}
        self.faults = faults.plan()
        self.auth = Authenticator(context, security.admitted_keys(keys))
        self.sock = context.socket(zmq.ROUTER)
        try:
            self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.setsockopt(zmq.SNDHWM, 0)
            self.sock.setsockopt(zmq.RCVHWM, 0)
            self.sock.setsockopt(zmq.HANDSHAKE_IVL, int(config.JOIN_TIMEOUT * 1000))
            security.make_curve_server(self.sock, keys)
            self.monitor = self.auth.watch(self.sock)
            self.sock.bind(listen)
        except BaseException:
            self.sock.close()
            self.auth.close()
            raise
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        # Objects move through their own endpoint (store.transfer): nodes pull pieces of
        # the head's store from it, the head pulls theirs, and it relays between nodes.
        host = listen[len("tcp://"):].rsplit(":", 1)[0]
        post = weak_method(owner.post)
        try:
            self.transfer = Endpoint(keys, owner.store.settings, head=True,
                                     bind=f"tcp://{host}:0", exported=owner.store.exports,
                                     on_done=lambda *done: post(("pulled", *done)))
        except BaseException:
            self.sock.close()
            self.auth.close()
            raise
        # futurepool status finds the heads of this host through this file.
        with open(os.path.join(owner.run_dir, "head"), "w") as file:
            file.write(self.address)

    @property
    def sockets(self) -> list:
        return [self.sock, *self.auth.sockets]

    @property
    def slots(self) -> int:
        return sum(node.workers for node in self.nodes.values() if not node.leaving)

    # -- input ------------------------------------------------------------------

    def handle(self, what) -> None:
        if what is not self.sock:
            self.auth.handle()
            return
        sock = self.sock
        for _ in range(10000):
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                return
            message = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                self._handle(message)
            except Exception as exc:  # noqa: BLE001 - an authenticated peer's garbage: drop it
                self.dropped += 1
                LOGGER.warning("dropped a malformed message from a node: %s: %s",
                               type(exc).__name__, exc)

    def _handle(self, message) -> None:
        if len(message) < 2:
            raise ProtocolError(f"{len(message)} frames")
        routing_id = message[0].bytes
        kind, count, ident, seq, ack = decode_header(message[1].bytes)
        body = message[2].bytes if len(message) > 2 else b""
        node = self.nodes.get(routing_id)
        if node is None and kind in (MessageType.ACK, MessageType.HEARTBEAT) \
                and body in self.by_token:  # a node's control connection, dialled again
            node = self._rebind(self.by_token[body], routing_id)
        if node is None and kind in _WORKER_KINDS:  # a remote worker's own connection
            node = self.by_index.get((ident >> NODE_ID_SHIFT) - 1)
            if node is None:
                return  # a worker of a node we lost (fenced), or not a worker at all
            if self.routes.get(routing_id) != ident:
                if kind != MessageType.ACK or body != self.session:
                    return  # not introduced (yet): it sends again when we do not ack
                self._route(node, ident, routing_id)
            channel = node.channel(ident)
            for what, flags, data in channel.receive(seq, ack, (kind, count, body)):
                if what != MessageType.ACK:
                    self.owner._worker_message(node, routing_id, what, flags, ident, data)
            return
        if kind == MessageType.STATUS:  # futurepool status, with the cluster's key
            self._send(routing_id, MessageType.STATUS,
                       serialize.dumps_plain(status.snapshot(self.owner)))
            return
        if node is None:
            if kind == MessageType.JOIN:
                self._join(routing_id, body, message[1].get("Peer-Address") or "?")
            elif kind == MessageType.HEARTBEAT:
                # A node we declared dead (it was cut off, or frozen): its session is
                # over; it should hear so now, not at its own deadline (FAULTS 31).
                # (A live node's heartbeat names it: it is known by then.)
                self._send(routing_id, MessageType.BYE)
            return
        node.last_heard = time.monotonic()
        if kind == MessageType.JOIN:  # our WELCOME was lost: the same again
            if node.welcome is not None:
                self._send(routing_id, MessageType.WELCOME, node.welcome[1],
                           header=node.welcome[0])
            return
        for what, data in node.control.receive(seq, ack, (kind, body)):
            self._from_node(node, what, data)

    def _route(self, node: RemoteLink, worker_id: int, routing_id: bytes) -> None:
        """A worker of ``node`` introduced itself on a (new) connection: send there now."""
        old = node.routes.get(worker_id)
        if old == routing_id:
            return  # the same connection, introduced again
        if old is not None:
            self.routes.pop(old, None)
        node.routes[worker_id] = routing_id
        self.routes[routing_id] = worker_id
        slot = self.owner.scheduler.workers.get(worker_id)
        if slot is not None and slot.link is node:
            slot.routing_id = routing_id
        if old is not None:  # a re-dial: what the old connection held may be lost
            try:
                for header, body in node.channel(worker_id).rewind(time.monotonic()):
                    self.sock.send_multipart([routing_id, header, body], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _rebind(self, node: RemoteLink, routing_id: bytes) -> RemoteLink:
        """A node's control connection was dialled again: it has a new routing id."""
        if self.nodes.get(node.routing_id) is node:
            del self.nodes[node.routing_id]
        node.routing_id = routing_id
        self.nodes[routing_id] = node
        return node

    def _from_node(self, node: RemoteLink, kind: MessageType, body: bytes) -> None:
        # WORKER_STARTED needs nothing: READY makes the slot, and another host's pids
        # stay out of executor._processes.
        if kind == MessageType.WORKER_EXITED:
            event = serialize.loads(body)
            if node.owns(event[0]):
                node.channels.pop(event[0], None)
                self.routes.pop(node.routes.pop(event[0], b""), None)
                self.owner.output.flush(node.host, event[0])
                self.owner.membership.worker_exited(*event, detail=f"It ran on {node.describe()}.")
        elif kind == MessageType.PULLED:
            for pull_id, location, why in serialize.loads(body):
                self.owner.objects.pulled(node.index, pull_id, location, why)
        elif kind == MessageType.LEAVE:
            node.leaving = True
            self.owner.membership.node_leaving(node)
        elif kind == MessageType.BYE:
            self._lost(node, "it left")

    def _join(self, routing_id: bytes, body: bytes, address: str) -> None:
        try:
            hello = serialize.loads(body)
            theirs, host, workers, pid, token = (hello["versions"], hello["host"],
                                                 int(hello["workers"]), int(hello["pid"]),
                                                 bytes(hello["token"]))
            offer = normalize(hello.get("resources") or {}, "the node's resources")
            transfer = str(hello.get("transfer") or "")
        except Exception as exc:  # noqa: BLE001 - an authenticated peer, but a broken JOIN
            raise ProtocolError(f"a JOIN that does not decode: {exc!r}") from None
        known = self.by_token.get(token)
        if known is not None:  # JOIN again from a re-dialled connection: the same WELCOME
            self._rebind(known, routing_id)
            self._send(routing_id, MessageType.WELCOME, known.welcome[1], header=known.welcome[0])
            return
        mismatch = version_mismatch(versions(), theirs)
        if self.owner.remote_start is None:
            self.owner.remote_start = session_for_nodes(self.owner)
        refusal = f"versions differ ({mismatch})" if mismatch else self.owner.remote_start[1]
        if refusal:
            LOGGER.warning("refused node %s (%s): %s", host, address, refusal)
            self._send(routing_id, MessageType.REFUSED, refusal.encode())
            return
        node = RemoteLink(self, routing_id, self.next_index, host, address, workers, pid, token,
                          transfer)
        node.resources = offer  # what tasks that ask for resources may hold there
        self.next_index += 1
        self.nodes[routing_id] = node
        self.by_token[token] = node
        self.by_index[node.index] = node
        welcome = dict(self.owner.remote_start[0], first_worker_id=node.first_worker_id,
                       transfer_port=int(self.transfer.address.rsplit(":", 1)[1]))
        welcome["settings"] = dict(welcome["settings"], session=self.session.decode())
        node.welcome = (pack_header(MessageType.WELCOME, 0, node.index),
                        serialize.dumps_plain(welcome))
        self._send(routing_id, MessageType.WELCOME, node.welcome[1], header=node.welcome[0])
        LOGGER.info("%s joined with %d workers, offering %s", node.describe(), workers,
                    describe(offer))
        self.owner.membership.node_joined(node)

    # -- output ------------------------------------------------------------------

    def transmit(self, routing_id: bytes, kind: MessageType, header: bytes, body) -> None:
        """Send one message; ``zmq.ZMQError`` if the peer is gone (ROUTER_MANDATORY).

        Under ``FUTUREPOOL_TESTING_FAULTS`` it may be lost or held back instead.
        """
        plan = self.faults
        if plan is not None:
            if plan.drop(kind):
                return
            if plan.delay(kind):
                def late():
                    try:
                        self.sock.send_multipart([routing_id, header, body], zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                self.owner._add_timer(plan.delay(kind), late)
                return
        self.sock.send_multipart([routing_id, header, body], zmq.NOBLOCK)

    def _send(self, routing_id: bytes, kind: MessageType, body: bytes = b"",
              header: bytes | None = None) -> bool:
        """A message outside the numbered streams (a reply, a heartbeat, BYE)."""
        try:
            self.transmit(routing_id, kind, header or pack_header(kind), body)
            return True
        except zmq.ZMQError:  # ROUTER_MANDATORY: the peer is gone
            return False

    def tick(self, now: float) -> None:
        """Heartbeats out; nodes silent past their deadline are lost."""
        if now < self.next_heartbeat:
            return
        self.next_heartbeat = now + config.HEARTBEAT_INTERVAL
        self.auth.tick()
        for node in list(self.nodes.values()):
            if now - node.last_heard > config.NODE_TIMEOUT:
                self._lost(node, f"it was silent for {now - node.last_heard:.1f} s (its host"
                                 " died, froze or is cut off)")
                continue
            self._send(node.routing_id, MessageType.HEARTBEAT,
                       header=node.control.plain(MessageType.HEARTBEAT))
            self._resend(node, now)

    def _resend(self, node: RemoteLink, now: float) -> None:
        """What its workers have not acknowledged in time goes again; acks they wait for."""
        try:  # what the node process itself has not acknowledged (PULL, DROP)
            for header, body in node.control.due(now):
                self.sock.send_multipart([node.routing_id, header, body], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        for worker_id, channel in node.channels.items():
            if not channel.unacked and not channel.ack_pending:
                continue
            routing_id = node.routes.get(worker_id)
            if routing_id is None:
                continue
            try:
                for header, body in channel.due(now):
                    self.sock.send_multipart([routing_id, header, body], zmq.NOBLOCK)
                if channel.ack_pending:
                    self.sock.send_multipart(
                        [routing_id, channel.plain(MessageType.ACK, 0, worker_id), b""],
                        zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # not connected now: its node's WORKER_EXITED, or a deadline, will tell

    def release(self, node: RemoteLink) -> None:
        """A leaving node has nothing left to run: end its session (it exits)."""
        self._send(node.routing_id, MessageType.BYE)
        self._lost(node, "it left")

    def _lost(self, node: RemoteLink, why: str) -> None:
        if self.nodes.pop(node.routing_id, None) is None:
            return
        self.by_index.pop(node.index, None)
        self.by_token.pop(node.token, None)
        for routing_id in node.routes.values():
            self.routes.pop(routing_id, None)
        LOGGER.warning("lost %s: %s", node.describe(), why)
        self.owner.membership.node_lost(node, why)

    def close(self) -> None:
        """Tell every node the session is over; close the socket, then the authenticator."""
        for node in list(self.nodes.values()):
            self._send(node.routing_id, MessageType.BYE)
        self.nodes.clear()
        self.by_index.clear()
        self.by_token.clear()
        self.routes.clear()
        self.sock.close(linger=500)
        self.auth.close()
        self.transfer.close()


def session_for_nodes(owner) -> tuple[dict | None, str]:
    """What every joining node is sent (WELCOME), or ``(None, why no node can serve)``.

    Remote hosts get spawn semantics (``core.startup``): the main script's
    source and the driver's preparation data, and the initializer pickled.
    """
    settings = {"initializer": owner.initializer_blob,
                "max_tasks_per_child": owner.max_tasks_per_child,
                "process_name": "SpawnProcess", "forward_output": True,
                "authkey": bytes(multiprocessing.current_process().authkey)}
    if owner.inherited_fds:
        return None, ("the pool's initargs hold multiprocessing objects (a Queue, a Pipe) that"
                      " only reach workers on this host")
    if owner.inherited is not None:  # fork semantics: pickle what local workers got in memory
        try:
            blob, fds = serialize.dumps_for_spawn(
                (owner.inherited["initializer"], owner.inherited["initargs"]),
                owner.main_references)
        except Exception as exc:  # noqa: BLE001 - a fork-context Lock, an open file...
            return None, (f"the pool's initializer and initargs cannot be sent to another host:"
                          f" {type(exc).__name__}: {exc}")
        for fd in fds:
            os.close(fd)
        if fds:
            return None, ("the pool's initargs hold multiprocessing objects (a Queue, a Pipe)"
                          " that only reach workers on this host")
        settings["initializer"] = blob
    preparation = startup.preparation_data("SpawnProcess", "spawn")
    main = None
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if path is not None and os.path.isfile(path):
        with open(path, "rb") as file:
            main = (os.path.basename(path), file.read())
    return {"settings": settings, "preparation": preparation, "main": main}, ""


def head_keys(listen: str, key_file: str | None = None):
    """The cluster keys for a head listening on ``listen``.

    Listening on loopback only, a missing key file is created (a cluster of
    one machine: nothing to copy). Any other address needs a key made on
    purpose with ``futurepool keygen`` and copied to the hosts that join.
    """
    path = security.key_file_path(key_file)
    if not os.path.exists(path):
        host = listen[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise security.KeyFileError(
                f"No cluster key file at {path}: listening on {listen} needs one. Create it"
                f" with `futurepool keygen --key-file {path}` and copy it to every host that"
                " joins (or set FUTUREPOOL_KEY_FILE).", path=path)
        security.create_key_file(path)
        LOGGER.warning("created the cluster key file %s", path)
    return security.load_keys(path)
