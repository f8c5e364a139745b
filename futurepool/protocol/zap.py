"""ZAP and socket monitors: who was refused, why, from where; and the client's view.

:class:`Authenticator` answers libzmq's ZAP requests (RFC 27) for the CURVE
servers of one context, admitting exactly the cluster's derived client keys
(:func:`~futurepool.protocol.security.admitted_keys`), and reads the server
sockets' monitors, which see the peers refused *before* ZAP is asked::

    peer                         libzmq (CURVE server)             here
    ───────────────────────────  ────────────────────────────────  ─────────────────────────
    no key / other key file  ──► HELLO does not decrypt: closed ──► monitor: refused, counted
    plain ZeroMQ, raw bytes  ──► greeting refused: closed        ──► monitor: refused, counted
    head key, other node key ──► ZAP request                     ──► ZAP: 400, counted
    the cluster's node key   ──► ZAP request                     ──► ZAP: 200, admitted

In every refused case not one application frame reaches the server socket.
Each refusal is logged at WARNING on the ``futurepool`` logger, rate-limited
per peer address (:class:`_RefusalLog`).

Threads: the authenticator is poll-driven, so the owner's I/O thread can own
it (STYLE: one thread per zmq socket): it polls :attr:`Authenticator.sockets`
and calls :meth:`Authenticator.handle`. :class:`AuthenticatorThread` runs one
standalone. :class:`HandshakeWatch` is the client's side: it tells a node
whose handshakes keep failing that authentication failed.

We do not use ``zmq.auth``: it is built around its own thread or event loop,
logs every request and refusal without a rate limit, cannot see refusals that
happen before ZAP, and handles mechanisms (PLAIN, NULL allow lists,
certificate directories) we want no part of.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as stdsocket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from .. import config
from .security import LOGGER, ZAP_DOMAIN, SecurityError

__all__ = ["ZAP_ENDPOINT", "Authenticator", "AuthenticatorThread", "HandshakeWatch"]

#: Where libzmq sends ZAP requests (RFC 27); one handler per context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"


# --- refusals: every one counted, logged at a bounded rate ----------------------------


class _RefusalLog:
    """At most one WARNING line per peer address per interval; the rest summarised.

    A node with the wrong key reconnects ten times a second and a scan comes
    from many addresses: neither may flood the log. Refusals not logged one
    by one are counted and reported in one summary line per interval.
    """

    _MAX_PEERS = 1024  # addresses remembered: a scan must not grow memory
    _MAX_LINES = 20  # lines per interval over all addresses, summary excluded

    def __init__(self, logger: logging.Logger, interval: float | None, clock=time.monotonic):
        self._logger = logger
        self._fixed_interval = interval
        self._clock = clock
        self._last_line: OrderedDict[str, float] = OrderedDict()
        self._window_start = clock()
        self._lines = 0
        self._quiet = 0
        self._quiet_peers: set[str] = set()

    @property
    def interval(self) -> float:
        if self._fixed_interval is not None:
            return self._fixed_interval
        return config.REFUSAL_LOG_INTERVAL

    def refused(self, peer: str | None, endpoint: str | None, reason: str) -> None:
        now = self._clock()
        self.tick(now)
        peer = peer or "an unknown address"
        last = self._last_line.get(peer)
        if (last is not None and now - last < self.interval) or self._lines >= self._MAX_LINES:
            self._quiet += 1
            if len(self._quiet_peers) < self._MAX_PEERS:
                self._quiet_peers.add(peer)
            return
        self._last_line[peer] = now
        self._last_line.move_to_end(peer)
        while len(self._last_line) > self._MAX_PEERS:
            self._last_line.popitem(last=False)
        self._lines += 1
        where = f" to {endpoint}" if endpoint else ""
        self._logger.warning("refused a connection from %s%s: %s", peer, where, reason)

    def tick(self, now: float | None = None) -> None:
        """Close the interval if it is over, with a summary of what was not logged."""
        now = self._clock() if now is None else now
        if now - self._window_start >= self.interval:
            self.flush()
            self._window_start = now
            self._lines = 0

    def flush(self) -> None:
        if self._quiet:
            self._logger.warning(
                "refused %d more connection(s) from %d address(es) without logging each"
                " (at most one line per address every %g s)",
                self._quiet, len(self._quiet_peers), self.interval)
        self._quiet = 0
        self._quiet_peers.clear()


# --- socket monitors ---------------------------------------------------------------------

_monitor_ids = iter(range(1, 1 << 62))

# libzmq's ZMQ_PROTOCOL_ERROR_* values that a misconfigured peer causes.
_CRYPTOGRAPHIC = 0x11000001
_MECHANISM_MISMATCH = 0x11000002


def _start_monitor(sock: zmq.Socket, events: int) -> str:
    """Start ``sock``'s monitor (from ``sock``'s thread); return the address to connect to."""
    address = f"inproc://futurepool.monitor.{os.getpid()}.{next(_monitor_ids)}"
    sock.monitor(address, events | zmq.EVENT_MONITOR_STOPPED)
    return address


def _connect_monitor(context: zmq.Context, address: str) -> zmq.Socket:
    monitor = context.socket(zmq.PAIR)
    monitor.linger = 0
    monitor.connect(address)
    return monitor


def _read_events(monitor: zmq.Socket, limit: int = 1000) -> list[dict]:
    events = []
    while len(events) < limit:
        try:
            events.append(parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK)))
        except zmq.Again:
            break
    return events


def _peer_of(fd: int) -> str | None:
    """The remote IP address of a connected socket fd of libzmq's, or ``None``.

    Works on a duplicate, so libzmq's descriptor is never closed here.
    """
    try:
        duplicate = os.dup(fd)
    except OSError:
        return None
    try:
        sock = stdsocket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return None
    with sock:
        try:
            name = sock.getpeername()
        except OSError:
            return None
    return name[0] if isinstance(name, tuple) else None


def _server_failure(event: int, value: int) -> str:
    """Why a CURVE server refused a connection before ZAP was asked."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == _CRYPTOGRAPHIC:
            return ("CURVE handshake failed: the peer does not hold this cluster's key"
                    " (a different key file, or not a futurepool node)")
        if value == _MECHANISM_MISMATCH:
            return "the peer does not use CURVE (a ZeroMQ peer without futurepool's security)"
        return f"ZeroMQ protocol error 0x{value:08x} in the handshake (not a futurepool node?)"
    return f"the handshake did not complete ({_errno_text(value)})"


def _errno_text(value: int) -> str:
    return f"{errno.errorcode.get(value, value)}: {os.strerror(value)}"


class _Watched:
    """What the monitor of one server socket has said so far."""

    __slots__ = ("address", "failure", "handshaking", "peers", "stopped")

    def __init__(self, address: str):
        self.address = address
        self.peers: dict[int, str | None] = {}  # fd -> remote address, while connected
        self.handshaking: dict[int, None] = {}  # fds accepted, handshake not done, oldest first
        self.failure: str | None = None  # handshake failure awaiting its DISCONNECTED
        self.stopped = False


_SERVER_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_ZAP_COUNTED = ""  # a failure ZAP already counted: consume its DISCONNECTED silently


# --- the authenticator -----------------------------------------------------------------


class Authenticator:
    """ZAP handler for CURVE servers: admits the given client keys, refuses the rest.

    Binds a REP socket on ``inproc://zeromq.zap.01`` of ``context`` (one
    handler per context) and answers libzmq's requests (RFC 27): status 200
    for a CURVE client whose public key is in ``allowed``, 400 for anything
    else. :meth:`watch` adds a server socket's monitor, which sees the peers
    refused before ZAP is asked (no key, no CURVE, garbage).

    Every refusal is counted (:attr:`refused`) and logged at WARNING on the
    ``futurepool`` logger with the peer's address and the reason, at most once
    per address per ``config.REFUSAL_LOG_INTERVAL`` seconds. The address of a
    peer refused before ZAP is read from the connection's socket when the
    accept is reported; if the connection is already gone by then it is
    logged as "an unknown address".

    Poll-driven, for the owner's I/O thread: register :attr:`sockets` (and
    what :meth:`watch` returns) in its poller, call :meth:`handle` when one
    is readable and :meth:`tick` at least once a heartbeat. All calls from
    one thread, which must also own the watched server sockets.
    :class:`AuthenticatorThread` runs one on its own thread instead.

    Close the server sockets before the authenticator: where libzmq lacks
    ``ZAP_ENFORCE_DOMAIN``, a CURVE server without a ZAP handler admits any
    client that knows its public key.

    Attributes:
        admitted: ZAP requests answered with 200.
        refused: connections refused, by ZAP or before it.
        handshakes: completed handshakes seen by the monitors.
        last_refusal: ``(address or None, reason)`` of the latest refusal.

    .. versionadded:: 0.2
    """

    def __init__(self, context: zmq.Context, allowed: Iterable[bytes], *,
                 domain: bytes = ZAP_DOMAIN, logger: logging.Logger = LOGGER,
                 log_interval: float | None = None, clock=time.monotonic):
        self.context = context
        self._allowed = frozenset(z85.decode(key) if len(key) == 40 else bytes(key)
                                  for key in allowed)
        if not self._allowed:
            raise ValueError("allowed must hold at least one public key")
        if any(len(key) != 32 for key in self._allowed):
            raise ValueError("allowed keys must be 40 bytes of Z85 or 32 raw bytes")
        self._domain = domain
        self._log = _RefusalLog(logger, log_interval, clock)
        self.admitted = 0
        self.refused = 0
        self.handshakes = 0
        self.last_refusal: tuple[str | None, str] | None = None
        self._watched: dict[zmq.Socket, _Watched] = {}
        self._zap = context.socket(zmq.REP)
        self._zap.linger = 0
        try:
            self._zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._zap.close()
            if exc.errno == errno.EADDRINUSE:
                raise SecurityError("Another ZAP handler is already bound on this zmq context;"
                                    " use one Authenticator per context.") from None
            raise

    @property
    def sockets(self) -> list[zmq.Socket]:
        """The sockets to poll for input: the ZAP socket and every watched monitor."""
        return [self._zap, *self._watched]

    @property
    def closed(self) -> bool:
        return self._zap.closed

    def watch(self, server: zmq.Socket) -> zmq.Socket:
        """Count and log the connections ``server`` refuses before ZAP is asked.

        Call before ``server`` binds, so that no connection is missed.

        Returns:
            The monitor socket, to register in the caller's poller.
        """
        return self._attach(_start_monitor(server, _SERVER_EVENTS))

    def _attach(self, address: str) -> zmq.Socket:
        monitor = _connect_monitor(self.context, address)
        self._watched[monitor] = _Watched(address)
        return monitor

    def close_stopped(self) -> list[zmq.Socket]:
        """Close the monitors whose server socket was closed; return them (to unregister)."""
        stopped = [monitor for monitor, watched in self._watched.items() if watched.stopped]
        for monitor in stopped:
            del self._watched[monitor]
            monitor.close()
        return stopped

    def handle(self) -> int:
        """Answer every pending ZAP request and read every monitor event; never blocks.

        Returns:
            How many requests and events were processed.
        """
        done = 0
        while done < 1000:
            try:
                request = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._answer(request)
            done += 1
        for monitor, watched in self._watched.items():
            done += self._read_monitor(monitor, watched)
        self._log.tick()
        return done

    def tick(self) -> None:
        """Log the summary of refusals not logged one by one, once per interval."""
        self._log.tick()

    def close(self) -> None:
        """Close the ZAP socket and the monitors; log the last summary. Idempotent."""
        if self._zap.closed:
            return
        for monitor in self._watched:
            monitor.close()
        self._watched.clear()
        self._zap.close()
        self._log.flush()

    def __enter__(self) -> Authenticator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _refuse(self, peer: str | None, endpoint: str | None, reason: str) -> None:
        self.refused += 1
        self.last_refusal = (peer, reason)
        self._log.refused(peer, endpoint, reason)

    def _answer(self, frames: list[bytes]) -> None:
        # RFC 27: version, request id, domain, address, routing id, mechanism, credentials.
        request_id = frames[1] if len(frames) > 1 else b""
        user_id = b""
        if len(frames) < 6 or frames[0] != b"1.0":
            status, reason = b"500", "malformed ZAP request"
        else:
            domain, address, mechanism, credentials = frames[2], frames[3], frames[5], frames[6:]
            peer = address.decode("ascii", "replace") or None
            status, reason = b"400", None
            if mechanism != b"CURVE":
                reason = (f"the peer uses the {mechanism.decode('ascii', 'replace')} mechanism;"
                          " futurepool admits only CURVE")
            elif domain != self._domain:
                reason = f"ZAP domain {domain!r} is not {self._domain!r}"
            elif len(credentials) != 1 or credentials[0] not in self._allowed:
                shown = z85.encode(credentials[0])[:8].decode() if credentials and len(
                    credentials[0]) == 32 else "?"
                reason = (f"its CURVE key ({shown}...) is not this cluster's node key"
                          " (a different key file?)")
            else:
                status, user_id = b"200", z85.encode(credentials[0])
                self.admitted += 1
            if reason is not None:
                self._refuse(peer, None, reason)
        reply = [b"1.0", request_id, status, (reason or "OK").encode(), user_id, b""]
        try:
            self._zap.send_multipart(reply, zmq.NOBLOCK)
        except zmq.Again:  # libzmq's session went away; its handshake times out
            pass

    def _read_monitor(self, monitor: zmq.Socket, watched: _Watched) -> int:
        events = _read_events(monitor)
        # An ACCEPTED whose connection is already reported closed in this
        # batch has a descriptor that may be reused: do not ask it anything.
        gone: set[int] = set()
        trusted = [False] * len(events)
        for index in range(len(events) - 1, -1, -1):
            kind, value = events[index]["event"], events[index]["value"]
            if kind == zmq.EVENT_DISCONNECTED:
                gone.add(value)
            elif kind == zmq.EVENT_ACCEPTED:
                trusted[index] = value not in gone
                gone.discard(value)
        for index, event in enumerate(events):
            kind, value = event["event"], event["value"]
            endpoint = event["endpoint"].decode("utf-8", "replace") or None
            if kind == zmq.EVENT_ACCEPTED:
                watched.peers[value] = _peer_of(value) if trusted[index] else None
                watched.handshaking[value] = None
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                watched.failure = _server_failure(kind, value)
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                watched.failure = _ZAP_COUNTED
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshakes += 1
                watched.failure = None
                # The event names no connection: with several handshakes in
                # flight, take the oldest (only the log's wording depends on it).
                if watched.handshaking:
                    del watched.handshaking[next(iter(watched.handshaking))]
            elif kind == zmq.EVENT_DISCONNECTED:
                # libzmq reports a failed handshake, then closes that connection;
                # bytes that are not ZMTP at all close it with no report.
                peer = watched.peers.pop(value, None)
                unfinished = watched.handshaking.pop(value, 0) is None
                if watched.failure is None and unfinished:
                    watched.failure = ("the connection closed before the handshake completed"
                                       " (not a ZeroMQ peer, or one that gave up)")
                if watched.failure:
                    self._refuse(peer, endpoint, watched.failure)
                watched.failure = None
            elif kind == zmq.EVENT_MONITOR_STOPPED:
                watched.stopped = True
        return len(events)


class AuthenticatorThread:
    """An :class:`Authenticator` on a thread of its own, for code without an I/O loop.

    The ZAP socket is bound before the constructor returns (so a CURVE
    server configured afterwards is covered from its first connection).
    Stop it after closing the server sockets it serves.

    .. versionadded:: 0.2
    """

    def __init__(self, context: zmq.Context, allowed: Iterable[bytes], **kwargs):
        self.authenticator = Authenticator(context, allowed, **kwargs)
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._attach: list[tuple[str, threading.Event]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="futurepool-zap", daemon=True)
        self._thread.start()

    @property
    def refused(self) -> int:
        return self.authenticator.refused

    @property
    def admitted(self) -> int:
        return self.authenticator.admitted

    @property
    def handshakes(self) -> int:
        return self.authenticator.handshakes

    @property
    def last_refusal(self) -> tuple[str | None, str] | None:
        return self.authenticator.last_refusal

    def watch(self, server: zmq.Socket, timeout: float | None = 5.0) -> None:
        """As :meth:`Authenticator.watch`; call from the thread that owns ``server``.

        Raises:
            TimeoutError: the authenticator thread did not attach within ``timeout`` s.
        """
        if self._stopping.is_set():
            raise RuntimeError("the authenticator thread is stopped")
        attached = threading.Event()
        with self._lock:
            self._attach.append((_start_monitor(server, _SERVER_EVENTS), attached))
        os.eventfd_write(self._wake, 1)
        if not attached.wait(timeout):
            raise TimeoutError(f"the authenticator thread did not attach a monitor in {timeout} s")

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread, closing the ZAP socket and monitors. Idempotent.

        Raises:
            TimeoutError: the thread did not end within ``timeout`` seconds.
        """
        if not self._stopping.is_set():
            self._stopping.set()
            os.eventfd_write(self._wake, 1)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the authenticator thread did not stop in {timeout} s")
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    close = stop

    def __enter__(self) -> AuthenticatorThread:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self) -> None:
        auth = self.authenticator
        poller = zmq.Poller()
        poller.register(self._wake, zmq.POLLIN)
        for sock in auth.sockets:
            poller.register(sock, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                # Wake at least once a second so the refusal summary is timely.
                poller.poll(1000)
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                with self._lock:
                    attach, self._attach = self._attach, []
                for address, attached in attach:
                    poller.register(auth._attach(address), zmq.POLLIN)
                    attached.set()
                try:
                    auth.handle()
                except Exception:  # a bug here must not take ZAP down: log, keep serving
                    LOGGER.exception("the ZAP authenticator failed to handle a request")
                for monitor in auth.close_stopped():
                    poller.unregister(monitor)
        finally:
            auth.close()


# --- the client's view ---------------------------------------------------------------


class HandshakeWatch:
    """What a CURVE client's connection attempts came to, from its socket monitor.

    A node with the wrong key never completes a handshake: the head cannot
    decrypt its HELLO and closes the connection (the node sees the close),
    or, for a key that reaches ZAP, answers status 400. This counts the
    attempts that connected but did not complete, so the caller can stop
    and say "authentication failed" instead of retrying forever.
    Poll-driven like :class:`Authenticator`; call from ``client``'s thread.

    Attributes:
        socket: the monitor socket, to poll for input.
        succeeded: handshakes completed.
        failures: attempts that failed since the last success.
        last_failure: why the latest attempt failed, or ``None``.

    .. versionadded:: 0.2
    """

    _EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
               | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def __init__(self, client: zmq.Socket):
        self.socket = _connect_monitor(client.context, _start_monitor(client, self._EVENTS))
        self.succeeded = 0
        self.failures = 0
        self.last_failure: str | None = None

    def handle(self) -> int:
        """Read every pending event; never blocks. Returns how many were read."""
        events = _read_events(self.socket)
        for event in events:
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded += 1
                self.failures = 0
                self.last_failure = None
                continue
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                reason = f"the head refused this host's key (ZAP status {value})"
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                reason = ("the server could not prove it holds this cluster's key (a different"
                          " key file, or not a futurepool head)" if value == _CRYPTOGRAPHIC
                          else f"ZeroMQ protocol error 0x{value:08x} in the CURVE handshake")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                reason = ("the server closed the connection during the CURVE handshake"
                          f" ({_errno_text(value)}): most likely it holds a different key file")
            else:
                continue
            self.failures += 1
            self.last_failure = reason
        return len(events)

    def close(self) -> None:
        self.socket.close()
