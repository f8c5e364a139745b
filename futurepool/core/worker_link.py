"""A worker's link to its owner: one DEALER socket, and over TCP a reliable channel.

::

    Worker (main thread, flusher, watchdog)      WorkerLink                  owner / head
    ───────────────────────────────────────      ──────────                  ────────────
    send_locked(kind, count, body) ──────────►   header (+ seq/ack, TCP) ──► ROUTER
    pull_locked() / receive(timeout) ◄────────   inbox, then the socket ◄──  TASKS, LEND,
                                                 (TCP: in order, once)       INTERRUPT, ...

Locally the socket dials the owner's ipc ROUTER with a fixed routing id
(:func:`routing_id`). On a remote host it dials the head over CURVE with the
node key, numbers what it sends and keeps it until acknowledged
(``protocol.channel``), resends what is overdue, and after every (re)connect
says who it is and which session it serves (``_greet_locked``), since the
head routes by connection, not by a fixed identity.

Who owns which state: the socket and everything here are shared by the
worker's threads (main, flusher, watchdog) under the worker's ``lock``, which
also guards the worker's outbox: every ``*_locked`` method expects its caller
to hold it; :meth:`WorkerLink.receive` takes it itself. Only the main thread
calls :meth:`WorkerLink.close`, after the other two threads have stopped.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from .. import config
from ..errors import ProtocolError
from ..protocol import faults, security
from ..protocol.channel import Channel
from ..protocol.framing import decode_header, pack_header
from ..protocol.messages import MessageType

# The worker's logger (core.worker): the stdlib logs its workers' failures there.
LOGGER = logging.getLogger("concurrent.futures")


def routing_id(worker_id: int) -> bytes:
    """A local worker's identity on its owner's ipc socket."""
    return b"w%d" % worker_id


class WorkerLink:
    """The socket a worker talks to its owner through; see the module docstring."""

    def __init__(self, worker_id: int, settings: dict, lock: threading.Lock):
        self.worker_id = worker_id
        self.lock = lock  # the worker's: this socket and its outbox
        # Read but not taken yet (under lock): what the watchdog read while a task ran,
        # and what lend() left for the serve loop. pull_locked() returns these first.
        self.inbox: list = []
        self.ctx = zmq.Context(1)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        keys = settings.get("cluster_keys")
        # Over TCP, messages are numbered and kept until acknowledged (protocol.channel).
        self.channel: Channel | None = None
        self.faults = None
        self.next_resend = 0.0
        self.monitor = None
        if keys is None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id(worker_id))
        else:
            # A remote host's worker dials the head itself, with the node key. The head
            # gives each connection a routing id of its own (identities reused across
            # re-dials are handed over unreliably by libzmq: zeromq/libzmq#2892); after
            # every handshake the worker says who it is and which session it serves.
            security.make_curve_client(self.sock, security.ClusterKeys(*keys))
            self.channel = Channel(config.RESEND_AFTER)
            self.faults = faults.plan()
            self.hello = settings["session"].encode()
            self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            self.handshakes = 0
        self.sock.connect(settings["owner_address"])
        if self.channel is not None:  # queued: the first thing the head hears from us
            self.sock.send_multipart([self.channel.plain(MessageType.ACK, 0, worker_id),
                                      self.hello])

    # -- callers hold self.lock ---------------------------------------------------------

    def send_locked(self, kind: MessageType, count: int, body: bytes) -> None:
        channel = self.channel
        if channel is None:
            self.sock.send_multipart([pack_header(kind, count, self.worker_id), body])
            return
        header = channel.stamp(kind, count, self.worker_id, body, time.monotonic())
        plan = self.faults
        if plan is not None:
            if plan.drop(kind):
                return  # tests: as if a broken connection lost it; the channel resends it
            if plan.delay(kind):
                time.sleep(plan.delay(kind))
        self.sock.send_multipart([header, body])

    def resend_locked(self, now: float) -> None:
        """Over TCP: send again what the owner has not acknowledged in time."""
        if now < self.next_resend:
            return
        self._greet_locked()  # (a zmq poll: not on every flush)
        self.next_resend = now + config.HEARTBEAT_INTERVAL
        for header, body in self.channel.due(now):
            self.sock.send_multipart([header, body])

    def _greet_locked(self) -> None:
        """After each (re)connection: who this worker is, for the head to route to it."""
        monitor = self.monitor
        handshakes = 0
        while monitor.poll(0):
            monitor.recv_multipart()
            handshakes += 1
        self.handshakes += handshakes
        if handshakes and self.handshakes > 1:  # the first was introduced at connect
            self.sock.send_multipart([self.channel.plain(MessageType.ACK, 0, self.worker_id),
                                      self.hello])
            # What the broken connection held may be lost: send it now, not when due.
            for header, body in self.channel.rewind(time.monotonic()):
                self.sock.send_multipart([header, body])

    def send_ack_locked(self) -> None:
        self.sock.send_multipart([self.channel.plain(MessageType.ACK, 0, self.worker_id), b""])

    def pull_locked(self) -> list:
        """What arrived, as ``(header, frames)``, in order (over TCP: once each)."""
        sock, channel = self.sock, self.channel
        messages = self.inbox
        self.inbox = []
        while sock.get(zmq.EVENTS) & zmq.POLLIN:
            frames = sock.recv_multipart()
            try:
                header = decode_header(frames[0])
            except ProtocolError as exc:  # logged and dropped, as every reader does
                LOGGER.warning("futurepool worker %d dropped a malformed message: %s",
                               self.worker_id, exc)
                continue
            if channel is None:
                messages.append((header, frames))
            else:  # in order, once (a duplicate or an early one: nothing)
                messages.extend(channel.receive(header.seq, header.ack, (header, frames)))
        return messages

    # -- the main thread (takes self.lock itself) -----------------------------------------

    def receive(self, timeout: float | None = None) -> list:
        """The next messages from the owner (blocking, or ``[]`` after ``timeout``
        seconds). Over TCP, overdue messages are sent again meanwhile."""
        sock, lock, channel = self.sock, self.lock, self.channel
        if channel is None:
            with lock:  # the outbox is empty: the flusher has nothing to send
                if self.inbox:
                    return self.pull_locked()
                if timeout is not None:
                    return self.pull_locked() if sock.poll(timeout * 1000) else []
                frames = sock.recv_multipart()
                return [(decode_header(frames[0]), frames)]
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with lock:
                if self.inbox:
                    return self.pull_locked()
                wait = config.HEARTBEAT_INTERVAL
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return []
                if channel.unacked:  # wake when the oldest is due, not a tick later
                    wait = min(wait, max(0.01, next(iter(channel.unacked.values()))[4]
                                         - time.monotonic()))
                    self.next_resend = 0.0
                if channel.ack_pending:  # a duplicate came: the owner missed our ack
                    self.send_ack_locked()
                ready = dict(poller.poll(wait * 1000))
                if sock in ready:
                    messages = self.pull_locked()
                    if messages:
                        return messages
                if self.monitor in ready:  # dialled again: introduce ourselves at once
                    self._greet_locked()
                self.resend_locked(time.monotonic())

    def _settle_channel(self) -> None:
        """Before exiting: wait (bounded) until the owner has what this worker sent."""
        deadline = time.monotonic() + 4 * config.RESEND_AFTER
        while self.channel.unacked and time.monotonic() < deadline:
            if self.sock.poll(config.HEARTBEAT_INTERVAL * 1000):
                header = decode_header(self.sock.recv_multipart()[0])
                self.channel.receive(header.seq, header.ack, None)
            self.resend_locked(time.monotonic())

    def close(self) -> None:
        """Over TCP, wait (bounded) for the owner's acks; then close, lingering so
        the last results reach the owner before the process exits."""
        if self.channel is not None:
            try:
                self._settle_channel()
            except (zmq.ZMQError, ProtocolError):
                pass  # the head is gone, or sent garbage: nothing more to deliver
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
        # Linger so the last results reach the owner before the process exits.
        self.sock.close(linger=5000)
        self.ctx.term()
