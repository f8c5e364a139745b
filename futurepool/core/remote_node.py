"""A remote node: ``futurepool worker --connect tcp://HEAD:PORT``.

::

    head                          this process (one thread)           node + workers
    ────────────────────          ─────────────────────────────       ───────────────────
    ROUTER tcp, CURVE ◄─ JOIN ─── DEALER tcp (CURVE client)
      ── WELCOME ───────────────► starts a session: LocalNode ──────► node (spawned)
      ◄─ WORKER_* events ──────── from the node's pipe
      ◄► HEARTBEAT, LEAVE, BYE    a silent head ends the session
      ◄── TASKS / RESULTS ─────────────────────────────────────────── DEALER per worker
                                                                      (CURVE, node key)

It dials out (its control needs no inbound port; its transfer endpoint,
``store.transfer``, listens so that other nodes pull its values directly,
unless ``--transfer-address none``: then the head relays them), registers
(JOIN names that endpoint), serves one session of one head
(its workers dial the head too, each with the node key: tasks and results
never wait for a hop through this process),
and when the head goes away (BYE, or silence past ``NODE_TIMEOUT``) it drops
that session's workers and segments and waits, reconnecting with back-off,
for the next head; ``--once`` exits instead. SIGTERM or Ctrl-C leave
gracefully: the head hears LEAVE at once, hands back what has not started,
and the node waits up to the grace period for running tasks to finish.

This process runs no user code and unpickles nothing from the head but the
session's settings (builtins): workers do the rest, in their own processes.
Everything here runs on its main thread, which owns its socket.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import tempfile
import time

import zmq

from .. import config
from ..errors import ProtocolError
from ..protocol import faults, security
from ..protocol.channel import Channel
from ..protocol.framing import decode_header, pack_header
from ..protocol.messages import MessageType
from ..protocol.zap import HandshakeWatch
from ..store import segments, serialize
from ..store.objects import NODE_SHIFT
from ..store.transfer import Endpoint, local_address
from .head import versions
from .local_node import LocalNode
from .resources import node_offer
from .startup import SPAWN

#: Exit codes of ``futurepool worker``.
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

#: Handshakes that fail in a row before a node gives up: the keys differ.
_AUTH_ATTEMPTS = 3


class Refused(Exception):
    """The head will not have this node (wrong key, other versions): stop, exit 1."""


class RemoteNode:
    """The ``futurepool worker`` process: serves one head after another."""

    def __init__(self, connect: str, keys, *, workers: int, once: bool = False,
                 grace: float | None = None, log=print, resources: dict | None = None):
        self.connect = connect
        # What this host offers to tasks that ask for resources (core.resources).
        self.resources = node_offer(resources)
        self.keys = keys
        self.workers = workers
        self.once = once
        self.grace = config.SHUTDOWN_TIMEOUT if grace is None else grace
        self.log = log
        self.stopping = False
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_w, False)

    def request_stop(self, *_args) -> None:
        """SIGTERM / Ctrl-C: leave gracefully (the signal's wakeup fd wakes the loop)."""
        self.stopping = True

    def run(self) -> int:
        backoff = 0.1
        while not self.stopping:
            try:
                served = self._session()
            except Refused as exc:
                self.log(f"futurepool worker: {exc}")
                return EXIT_REFUSED
            if self.stopping or (self.once and served):
                break
            if served:
                backoff = 0.1
            self._sleep(backoff)
            backoff = min(backoff * 2, config.RECONNECT_MAX_INTERVAL)
        return EXIT_OK

    def _sleep(self, seconds: float) -> None:
        poller = zmq.Poller()
        poller.register(self.wakeup_r, zmq.POLLIN)
        if poller.poll(seconds * 1000):
            _drain(self.wakeup_r)

    # -- one head's session ---------------------------------------------------------

    def _session(self) -> bool:
        """Join the head and serve it; whether a session was served at all."""
        ctx = zmq.Context(1)
        sock = ctx.socket(zmq.DEALER)
        watch = None
        session = None
        endpoint = None
        pulled = _Pulled()
        try:
            # This session's store, and its transfer endpoint (store.transfer): other
            # nodes pull what it holds from there; it is announced in JOIN.
            store = segments.new_settings(
                config.SHM_DIR, config.SPILL_DIR, config.SHM_PREFIX, config.STORE_CAPACITY,
                config.STORE_FRACTION, config.STORE_POOL_BYTES, config.INLINE_THRESHOLD,
                writers=self.workers + 1)
            endpoint = Endpoint(self.keys, store, head=False,
                                bind=transfer_bind(self.connect), on_done=pulled.done)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(config.RECONNECT_MAX_INTERVAL * 1000))
            # This session's name: the head knows this node by it after a re-dial (each
            # connection has a routing id of its own; core.head explains why).
            token = os.urandom(16).hex().encode()
            security.make_curve_client(sock, self.keys)
            watch = HandshakeWatch(sock)
            sock.connect(self.connect)
            hello = {"versions": versions(), "host": socket.gethostname(),
                     "workers": self.workers, "pid": os.getpid(), "token": token,
                     "resources": self.resources,
                     "transfer": endpoint.address or ""}
            if faults.flag("version-skew"):
                hello["versions"]["cloudpickle"] += "+skew"  # tests: a mismatched host
            join = [pack_header(MessageType.JOIN), serialize.dumps_plain(hello)]
            welcome = self._await_welcome(sock, watch, join)
            if welcome is None:
                return False
            head_host = self.connect[len("tcp://"):].rsplit(":", 1)[0]
            endpoint.join_hub(f"tcp://{head_host}:{welcome['transfer_port']}",
                              (welcome["first_worker_id"] >> NODE_SHIFT) - 1)
            session = _Session(self, sock, welcome, token, watch, store, endpoint, pulled)
            session.serve()
            return True
        finally:
            if session is not None:
                session.close()
            if endpoint is not None:
                endpoint.close()
            pulled.close()
            if watch is not None:
                watch.close()
            sock.close(linger=0)
            ctx.term()

    def _await_welcome(self, sock, watch, join: list) -> dict | None:
        """Send JOIN (again every RESEND_AFTER: it or the answer may be lost) until the
        head answers."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(watch.socket, zmq.POLLIN)
        poller.register(self.wakeup_r, zmq.POLLIN)
        plan = faults.plan()
        deadline = time.monotonic() + config.JOIN_TIMEOUT
        next_join = 0.0
        while not self.stopping:
            now = time.monotonic()
            if now >= next_join:
                next_join = now + config.RESEND_AFTER
                if plan is None or not plan.drop(MessageType.JOIN):
                    sock.send_multipart(join)
            left = deadline - now
            if left <= 0:
                if watch.failures:
                    raise Refused(f"authentication failed with the head at {self.connect}:"
                                  f" {watch.last_failure}. Check that this host has the"
                                  " head's key file (futurepool keygen; --key-file).")
                return None  # nobody there yet: back off, try again
            for what, _ in poller.poll(min(left, next_join - now, 0.5) * 1000):
                if what is watch.socket:
                    watch.handle()
                    if watch.failures >= _AUTH_ATTEMPTS and not watch.succeeded:
                        raise Refused(
                            f"authentication failed with the head at {self.connect}:"
                            f" {watch.last_failure}. Check that this host has the head's key"
                            " file (futurepool keygen; --key-file).")
                elif what == self.wakeup_r:
                    _drain(self.wakeup_r)
                else:
                    frames = sock.recv_multipart()
                    kind = decode_header(frames[0]).kind
                    if kind == MessageType.WELCOME:
                        return serialize.loads(frames[1])
                    if kind == MessageType.REFUSED:
                        raise Refused(f"the head at {self.connect} refused this node: "
                                      f"{frames[1].decode(errors='replace')}")
        return None


class _Session:
    """One head's session on this host: its node, its workers, its files."""

    def __init__(self, remote: RemoteNode, sock, welcome: dict, token: bytes, watch, store,
                 endpoint: Endpoint, pulled: _Pulled):
        self.remote = remote
        self.endpoint = endpoint
        self.pulled = pulled
        self.sock = sock
        self.token = token
        self.watch = watch
        self.welcome = welcome
        self.run_dir = tempfile.mkdtemp(prefix=f"futurepool-{os.getpid()}-",
                                        dir=config.TMPDIR if len(config.TMPDIR) < 60 else "/tmp")
        self.store = store
        settings = dict(welcome["settings"])
        settings.update(
            # Each worker dials the head itself, with the node key: tasks and results take
            # no extra hop through this process (measured: a relay hop costs ~230 µs).
            owner_address=remote.connect, cluster_keys=tuple(remote.keys),
            run_dir=self.run_dir, store=self.store,
            driver_pid=os.getpid(), workers=remote.workers,
            first_worker_id=welcome["first_worker_id"],
            # The driver's multiprocessing key, as spawned children get it: Manager
            # proxies in a task's arguments authenticate with it.
            authkey=welcome["settings"]["authkey"],
            preparation=self._preparation(welcome.get("preparation"), welcome.get("main")))
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        self.node = LocalNode(SPAWN)
        self.node.start(resource_tracker._resource_tracker._fd)
        self.node.configure(settings)
        self.last_heard = time.monotonic()
        self.leave_deadline: float | None = None
        # Exactly-once over TCP: what this node tells the head is numbered and kept
        # until acknowledged (protocol.channel).
        self.channel = Channel(config.RESEND_AFTER)
        self.faults = faults.plan()

    def _preparation(self, data: dict | None, main) -> dict | None:
        """The driver's preparation data, made true here: the main script written locally."""
        if data is None:
            return None
        data = dict(data)
        for key in ("dir", "orig_dir", "init_main_from_name", "init_main_from_path"):
            data.pop(key, None)
        data["sys_path"] = [p for p in data.get("sys_path", []) if os.path.isdir(p)]
        if main is not None:
            name, source = main
            path = os.path.join(self.run_dir, os.path.basename(name) or "main.py")
            with open(path, "wb") as file:
                file.write(source)
            data["init_main_from_path"] = path
            data["sys_path"].insert(0, self.run_dir)
        return data

    def serve(self) -> None:
        remote, sock, node = self.remote, self.sock, self.node
        poller = zmq.Poller()
        for what in (sock, node.event_fd, remote.wakeup_r, self.watch.socket, self.pulled.read_fd):
            poller.register(what, zmq.POLLIN)
        next_heartbeat = 0.0
        while True:
            for what, _ in poller.poll(config.HEARTBEAT_INTERVAL * 1000 / 2):
                if what is sock:
                    if not self._from_head():
                        return
                elif what == remote.wakeup_r:
                    _drain(remote.wakeup_r)
                elif what == self.pulled.read_fd:
                    _drain(self.pulled.read_fd)
                    done = self.pulled.take()
                    if done:
                        self._send(MessageType.PULLED, serialize.dumps_plain(done))
                elif what == node.event_fd:
                    if not self._from_node():
                        return
                elif what is self.watch.socket:
                    connected = self.watch.succeeded
                    self.watch.handle()
                    if self.watch.succeeded > connected:  # dialled again: say who we are,
                        sock.send_multipart([self.channel.plain(MessageType.ACK), self.token])
                        for frames in self.channel.rewind(time.monotonic()):  # and resend
                            sock.send_multipart(frames)
            now = time.monotonic()
            if remote.stopping and self.leave_deadline is None:
                self._send(MessageType.LEAVE)
                self.leave_deadline = now + remote.grace
            if self.leave_deadline is not None and now > self.leave_deadline:
                self._send(MessageType.BYE)
                return
            if now - self.last_heard > config.NODE_TIMEOUT:
                remote.log(f"futurepool worker: the head at {remote.connect} was silent for"
                           f" {now - self.last_heard:.1f} s; dropping its session")
                return
            if now >= next_heartbeat:
                next_heartbeat = now + config.HEARTBEAT_INTERVAL
                # It names the session: the head knows us by it on a new connection.
                sock.send_multipart([self.channel.plain(MessageType.HEARTBEAT), self.token])
                for frames in self.channel.due(now):
                    sock.send_multipart(frames)

    def _send(self, kind: MessageType, body: bytes = b"") -> None:
        header = self.channel.stamp(kind, 0, 0, body, time.monotonic())
        plan = self.faults
        if plan is not None:
            if plan.drop(kind):
                return  # tests: as if a broken connection lost it; the channel resends it
            time.sleep(plan.delay(kind))
        self.sock.send_multipart([header, body])

    def _from_head(self) -> bool:
        """Heartbeats and BYE: the only things the head sends this process."""
        sock = self.sock
        for _ in range(10000):
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                return True
            frames = sock.recv_multipart(zmq.NOBLOCK)
            self.last_heard = time.monotonic()
            try:
                header = decode_header(frames[0])
            except ProtocolError:
                continue
            for kind, body in self.channel.receive(header.seq, header.ack,
                                                   (header.kind, frames[1:])):
                if kind == MessageType.BYE:
                    return False
                if kind == MessageType.PULL:  # copy pieces here (store.transfer)
                    for pull_id, nbytes, sources in serialize.loads(body[0]):
                        self.endpoint.pull(pull_id, nbytes, sources)
                elif kind == MessageType.DROP:
                    self.endpoint.drop(serialize.loads(body[0]))
        return True

    def _from_node(self) -> bool:
        for kind, body in self.node.read_events():
            self._send(kind, serialize.dumps_plain(body))
        if self.node.gone:
            self.remote.log("futurepool worker: the node process died; dropping the session")
            return False
        return True

    def close(self) -> None:
        """Stop the workers (any still running are killed), remove the session's files."""
        node = self.node
        node.stop(signal.SIGKILL if self.leave_deadline is None else signal.SIGTERM)
        node.close_commands()
        node.wait(config.SHUTDOWN_TIMEOUT)
        node.close_events()
        self.endpoint.close()  # no pull writes into the store any more
        segments.remove_files(self.store.dirs, self.store.session + "-")
        shutil.rmtree(self.run_dir, ignore_errors=True)


class _Pulled:
    """Pulls the transfer endpoint finished, for the session's thread to report (PULLED)."""

    def __init__(self):
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._done: collections.deque = collections.deque()

    def done(self, pull_id: int, location, why: str) -> None:  # the endpoint's thread
        self._done.append((pull_id, None if location is None else tuple(location), why))
        try:
            os.write(self._write_fd, b"!")
        except (BlockingIOError, OSError):
            pass

    def take(self) -> list:
        done = []
        while self._done:
            done.append(self._done.popleft())
        return done

    def close(self) -> None:
        if self.read_fd >= 0:
            os.close(self.read_fd)
            os.close(self._write_fd)
            self.read_fd = self._write_fd = -1


def transfer_bind(connect: str) -> str | None:
    """Where this node's transfer endpoint listens (config.TRANSFER_ADDRESS), or None."""
    wanted = config.TRANSFER_ADDRESS.strip()
    if wanted.lower() == "none":
        return None
    if not wanted:
        wanted = local_address(connect)
    if wanted.startswith("tcp://"):
        return wanted if wanted.rsplit(":", 1)[-1].isdigit() and wanted.count(":") >= 2 \
            else wanted + ":0"
    return f"tcp://[{wanted}]:0" if ":" in wanted else f"tcp://{wanted}:0"


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def main(connect: str, key_file: str | None, workers: int, once: bool, grace: float | None,
         log=print, resources: dict | None = None) -> int:
    """``futurepool worker``: returns the exit code."""
    try:
        keys = security.load_keys(key_file)
    except security.SecurityError as exc:
        log(f"futurepool worker: {exc}")
        return EXIT_REFUSED
    segments.sweep_dead_sessions((config.SHM_DIR, config.SPILL_DIR), config.SHM_PREFIX)
    node = RemoteNode(connect, keys, workers=workers, once=once, grace=grace, log=log,
                      resources=resources)
    os.set_blocking(node.wakeup_r, False)
    signal.set_wakeup_fd(node.wakeup_w)
    signal.signal(signal.SIGTERM, node.request_stop)
    signal.signal(signal.SIGINT, node.request_stop)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    return node.run()


__all__ = ["main", "RemoteNode"]
