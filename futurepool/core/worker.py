"""The worker: resolve arguments, run the function, report the result.

A worker is forked by its node, connects a DEALER socket to its owner's
ROUTER, runs the pool's initializer, says READY, and then serves TASKS
batches in arrival order until told to STOP (or until its task quota for
``max_tasks_per_child`` is used up). One thread; SIGINT is ignored (the
driver handles Ctrl-C and stops workers itself).

Results are batched: while the next queued task's function is known to be
quick, results already computed wait to travel in one message. A function
not yet timed, or a slow one, first flushes what is held. Past speed does
not promise the next call's, so a flusher thread sends whatever is still
held ``_HOLD_SECONDS`` after holding began, even while the main thread is
stuck in a task. The socket and the outbox are shared by these two threads
under ``self.lock``.
"""

from __future__ import annotations

import collections
import faulthandler
import logging
import multiprocessing.util
import os
import threading
import time
import traceback

import zmq

from .. import config
from ..errors import ObjectStoreFullError, ProtocolError, ResultPicklingError
from ..protocol import faults, security
from ..protocol.channel import Channel
from ..protocol.framing import decode_header, pack_header
from ..protocol.messages import MessageType, ResultStatus
from ..store import serialize
from ..store.objects import WorkerStore
from ..store.segments import Location
from .output import OutputCapture
from .processes import EXIT_INITIALIZER_FAILED, EXIT_START_FAILED, INITIALIZING, RUNNING_SLOT
from .startup import importing, prepare_main

# The stdlib logs initializer failures here; code (and CPython's tests) watch it.
LOGGER = logging.getLogger("concurrent.futures")

_HOLD_SECONDS = 0.001
_QUICK_SECONDS = 0.0001
_FUNCTION_CACHE_SIZE = 512
#: How often an idle worker holding mappings checks for unlinked ones.
_IDLE_CHECK_MS = 200


def routing_id(worker_id: int) -> bytes:
    """A local worker's identity on its owner's ipc socket."""
    return b"w%d" % worker_id


class Worker:
    def __init__(self, worker_id: int, settings: dict, slot):
        self.worker_id = worker_id
        self.slot = slot  # shared with the node: what this worker is running
        self.settings = settings
        self.functions: collections.OrderedDict[bytes, object] = collections.OrderedDict()
        self.run_time: dict[bytes, float] = {}  # fn_id -> moving average of seconds
        self.queue: collections.deque = collections.deque()
        self.outbox: list = []
        self.held_since = 0.0
        self.lock = threading.Lock()  # the socket and the outbox
        self.holding = threading.Event()  # arms the flusher
        self.closing = False
        # Objects of tasks whose result is not sent yet: dropped right after
        # it is, so a crash in an argument's __del__ cannot cost the result.
        self.keepalive: list = []
        self.store = WorkerStore(settings["store"], worker_id)
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
        # On a remote host: what the worker prints goes to the driver (core.output).
        self.capture = OutputCapture(self._send_output) if settings.get("forward_output") \
            else None
        self.flusher = threading.Thread(target=self._flush_late, name="futurepool-flusher",
                                        daemon=True)
        self.flusher.start()

    def _send_output(self, stream: int, data: bytes) -> None:
        with self.lock:
            self._send_locked(MessageType.OUTPUT, stream, data)

    # -- the wire (callers hold self.lock) -------------------------------------------

    def _send_locked(self, kind: MessageType, count: int, body: bytes) -> None:
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

    def _resend_locked(self, now: float) -> None:
        """Over TCP: send again what the owner has not acknowledged in time."""
        self._greet_locked()
        if now < self.next_resend:
            return
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

    def _send_ack_locked(self) -> None:
        self.sock.send_multipart([self.channel.plain(MessageType.ACK, 0, self.worker_id), b""])

    def _receive(self):
        """The next message from the owner (blocking). Over TCP, overdue messages are
        sent again meanwhile."""
        sock, lock, channel = self.sock, self.lock, self.channel
        if channel is None:
            with lock:  # the outbox is empty: the flusher has nothing to send
                return sock.recv_multipart()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            with lock:
                wait = config.HEARTBEAT_INTERVAL
                if channel.unacked:  # wake when the oldest is due, not a tick later
                    wait = min(wait, max(0.01, next(iter(channel.unacked.values()))[4]
                                         - time.monotonic()))
                    self.next_resend = 0.0
                if channel.ack_pending:  # a duplicate came: the owner missed our ack
                    self._send_ack_locked()
                if sock in dict(poller.poll(wait * 1000)):
                    return sock.recv_multipart()
                self._resend_locked(time.monotonic())

    def _settle_channel(self) -> None:
        """Before exiting: wait (bounded) until the owner has what this worker sent."""
        deadline = time.monotonic() + 4 * config.RESEND_AFTER
        while self.channel.unacked and time.monotonic() < deadline:
            if self.sock.poll(config.HEARTBEAT_INTERVAL * 1000):
                header = decode_header(self.sock.recv_multipart()[0])
                self.channel.receive(header.seq, header.ack, None)
            self._resend_locked(time.monotonic())

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
        self.closing = True
        self.holding.set()
        self.flusher.join()
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
        self.store.close()

    def _flush_late(self) -> None:
        while True:
            self.holding.wait()
            if self.closing:
                return
            self.holding.clear()
            time.sleep(_HOLD_SECONDS)
            self.flush()

    # -- start-up -------------------------------------------------------------

    def prepare(self) -> bool:
        """Spawn semantics: import the main script as ``__mp_main__`` first, as the stdlib.

        A failure (the script raises, or starts an executor without the
        main-module guard) is sent to the owner, which fails the pool with it.
        """
        data = self.settings.get("preparation")
        if data is None:
            return True
        RUNNING_SLOT.pack_into(self.slot, 0, INITIALIZING, 0)
        try:
            prepare_main(data)
        except BaseException as exc:  # noqa: BLE001 - SystemExit in the script too
            traceback.print_exc()
            self._send_failure(MessageType.START_FAILED, exc)
            return False
        RUNNING_SLOT.pack_into(self.slot, 0, 0, 0)
        return True

    def _send_failure(self, kind: MessageType, exc: BaseException) -> None:
        with self.lock:
            self._send_locked(kind, 0, serialize.dumps_exception(exc))

    def initialize(self, inherited) -> bool:
        """Run the pool's initializer: from memory (fork semantics) or unpickled (spawn)."""
        blob = self.settings.get("initializer")
        if blob is None and (inherited is None or inherited.get("initializer") is None):
            return True
        RUNNING_SLOT.pack_into(self.slot, 0, INITIALIZING, 0)
        try:
            if blob is None:
                initializer, initargs = inherited["initializer"], inherited["initargs"]
            else:
                with importing("the pool's initializer"):
                    initializer, initargs = serialize.loads(blob)
            initializer(*initargs)
        except BaseException as exc:  # noqa: BLE001 - SystemExit in an initializer too
            LOGGER.critical("Exception in initializer:", exc_info=True)
            # The log may go to a multiprocessing queue (a QueueHandler set up
            # by the initializer): flush it before the pool is declared
            # broken, as the stdlib's worker has when its exit is noticed.
            multiprocessing.util._exit_function()
            self._send_failure(MessageType.INIT_FAILED, exc)
            return False
        RUNNING_SLOT.pack_into(self.slot, 0, 0, 0)
        return True

    # -- tasks ----------------------------------------------------------------

    def run_task(self, item) -> tuple:
        task_id, attempt, fn_id, fn_bytes, args_bytes, deps = item
        RUNNING_SLOT.pack_into(self.slot, 0, task_id, attempt)
        try:
            return self._run(task_id, attempt, fn_id, fn_bytes, args_bytes, deps)
        finally:
            RUNNING_SLOT.pack_into(self.slot, 0, 0, 0)

    def _run(self, task_id, attempt, fn_id, fn_bytes, args_bytes, deps) -> tuple:
        try:
            fn = self.functions.get(fn_id)
            if fn is None:
                if not fn_bytes:
                    return (task_id, attempt, ResultStatus.MISSING_FUNCTION, b"", 0.0), None
                with importing("the module of a task's function"):
                    fn = serialize.loads(fn_bytes)
                self.functions[fn_id] = fn
                if len(self.functions) > _FUNCTION_CACHE_SIZE:
                    self.functions.popitem(last=False)
            else:
                self.functions.move_to_end(fn_id)
            args, kwargs = serialize.loads_arguments(args_bytes, dict(deps), self.store.view)
        except BaseException as exc:  # noqa: BLE001 - a __setstate__ may raise anything
            return (task_id, attempt, ResultStatus.ARGS_FAILED,
                    serialize.dumps_exception(exc), 0.0), None
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in a task is its result
            took = time.perf_counter() - start
            return (task_id, attempt, ResultStatus.ERROR, serialize.dumps_exception(exc),
                    took), (args, kwargs)
        took = time.perf_counter() - start
        try:
            payload = serialize.dumps_result(result, self.store)
        except ObjectStoreFullError as exc:  # this future fails; the worker is fine
            return (task_id, attempt, ResultStatus.ERROR, serialize.dumps_exception(exc),
                    took), (args, kwargs, result)
        except Exception as exc:  # noqa: BLE001
            error = ResultPicklingError(
                f"Could not pickle the result of {serialize.describe_callable(fn)}():"
                f" {type(exc).__name__}: {exc}", _safe_repr(result), _safe_repr(exc))
            error.__cause__ = exc
            return (task_id, attempt, ResultStatus.ERROR, serialize.dumps_exception(error),
                    took), (args, kwargs, result)
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in __reduce__, as the stdlib
            return (task_id, attempt, ResultStatus.ERROR, serialize.dumps_exception(exc),
                    took), (args, kwargs, result)
        return (task_id, attempt, ResultStatus.OK, payload, took), (args, kwargs, result)

    def flush(self) -> None:
        if self.capture is not None and self.outbox:
            self.capture.sync()  # what the tasks printed arrives before their results
        with self.lock:
            if self.outbox:
                self._send_locked(MessageType.RESULTS, len(self.outbox),
                                  serialize.dumps_plain(self.outbox))
                self.outbox = []
            if self.channel is not None and self.channel.unacked:
                self._resend_locked(time.monotonic())

    def should_hold(self) -> bool:
        """Whether computed results may wait for the next queued task."""
        if not self.queue or not self.outbox:
            return False
        next_fn = self.queue[0][2]
        quick = self.run_time.get(next_fn, 1.0) < _QUICK_SECONDS
        return quick and time.perf_counter() - self.held_since < _HOLD_SECONDS

    def serve(self) -> None:
        tasks_left = self.settings.get("max_tasks_per_child") or 0
        sock, lock = self.sock, self.lock
        channel = self.channel
        with lock:
            self._send_locked(MessageType.READY, 0,
                              serialize.dumps_plain((self.worker_id, os.getpid(), tasks_left)))
        while True:
            if not self.queue:
                self.flush()
                self.keepalive.clear()
                reader = self.store.reader
                if reader.has_idle():
                    reader.release_idle()
                    # Unmap what gets unlinked meanwhile (its pages would stay allocated).
                    while reader.has_idle():
                        with lock:
                            if sock.poll(_IDLE_CHECK_MS):
                                break
                        reader.release_idle()
                frames = self._receive()
                if not self._accept(frames):
                    return
            while self.queue:
                # Take what else arrived without blocking, so batches stay full.
                while True:
                    with lock:
                        frames = sock.recv_multipart() if sock.get(zmq.EVENTS) & zmq.POLLIN \
                            else None
                    if frames is None:
                        break
                    if not self._accept(frames):
                        self.flush()
                        return
                item = self.queue.popleft()
                if channel is not None and channel.ack_pending and not self.outbox \
                        and self.run_time.get(item[2], 1.0) >= _QUICK_SECONDS:
                    with lock:  # no result will carry the ack soon: the owner would resend
                        self._send_ack_locked()
                outcome, keep = self.run_task(item)
                with lock:
                    if not self.outbox:
                        self.held_since = time.perf_counter()
                    self.outbox.append(outcome)
                self.keepalive.append(keep)
                del keep  # only keepalive may hold the task's objects
                fn_id = item[2]
                previous = self.run_time.get(fn_id)
                took = outcome[4]
                self.run_time[fn_id] = took if previous is None else 0.8 * previous + 0.2 * took
                if tasks_left:
                    tasks_left -= 1
                    if tasks_left == 0:  # max_tasks_per_child: leave for a fresh worker
                        self.flush()
                        return
                if not self.should_hold():
                    self.flush()
                    self.keepalive.clear()
                    if self.store.reader.has_idle():
                        self.store.reader.release_idle()
                elif len(self.outbox) == 1:
                    self.holding.set()

    def _accept(self, frames) -> bool:
        """Queue a message's tasks; False when the owner says STOP."""
        header = decode_header(frames[0])
        if self.channel is None:
            return self._take(header.kind, frames)
        with self.lock:  # over TCP: in order, once (a duplicate or an early one: nothing)
            messages = self.channel.receive(header.seq, header.ack, (header.kind, frames))
        return all([self._take(kind, frames) for kind, frames in messages])

    def _take(self, kind: MessageType, frames) -> bool:
        if kind == MessageType.STOP:
            return False
        if kind == MessageType.TASKS:
            self.queue.extend(serialize.loads(frames[1]))
        elif kind == MessageType.FREE:
            free = self.store.writer.free
            for location in serialize.loads(frames[1]):
                free(Location(*location))
        return True


def _safe_repr(value) -> str:
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        return f"<{type(value).__qualname__} object>"


def run_worker(worker_id: int, settings: dict, slot, inherited=None) -> int:
    """Body of a worker process; returns its exit code.

    ``inherited``: what a worker of a node forked from the driver takes from
    memory (the initializer and its arguments), or None.
    """
    # A segfault in a task then leaves the Python traceback in the worker's stderr.
    try:
        faulthandler.enable()
    except (ValueError, OSError, AttributeError):  # sys.stderr without a file descriptor:
        faulthandler.enable(file=2)  # a StringIO (pytest's capsys, notebooks): fd 2 then
    worker = Worker(worker_id, settings, slot)
    try:
        if not worker.prepare():
            return EXIT_START_FAILED
        if not worker.initialize(inherited):
            return EXIT_INITIALIZER_FAILED
        worker.serve()
    finally:
        worker.close()
    return 0
