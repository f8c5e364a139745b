"""The owner: object table, dependencies and scheduling, driven by one I/O thread.

::

    user threads                       owner I/O thread (this module)          node + workers
    ─────────────                      ──────────────────────────────          ──────────────
    Executor.submit ─┐                 ┌─ admit: wait for dependencies
     (pickles fn,    ├─ commands ─────►│   (done-callbacks post 'dep')
      args; makes    │  deque + wake   ├─ ready deque ─ Scheduler.pick ─ TASKS ─► worker DEALERs
      the Future)    │  (eventfd)      │                                          │
    Future.cancel ───┘                 ├─ RESULTS ◄──────────────────────────────┘
                                       │   set the Future (bytes kept encoded)
    Executor.shutdown ── 'shutdown' ──►├─ WORKER_EXITED ◄── event pipe ───────── node
                                       └─ core.membership: fail the dead worker's task
                                          (after a grace), requeue the ones it had not
                                          started; restart a dead node

Who owns which state: every attribute below the "I/O thread only" line
belongs to the I/O thread; user threads only append to ``commands`` and
call :meth:`wake`, which never blocks (an eventfd write, and only when the
thread is about to sleep: cpython gh-105829 is the hang this avoids). The
zmq socket and the node's pipes are the I/O thread's alone. Futures are
completed by the I/O thread, so done-callbacks run there, as in the stdlib.

Roles: this module admits tasks, dispatches them and settles their results.
Its helpers, each holding the owner and running on its I/O thread, do the
rest: ``core.membership`` (workers, the local node and remote hosts coming
and going, and stopping them at close), ``core.relay`` (tasks that tasks
submit), ``core.directory`` (stored pieces across hosts) and ``core.head``
(the cluster's socket).

Lifetime: the thread holds the executor only by weak reference; when the
executor is collected, or ``shutdown`` is called, or the interpreter exits,
the thread finishes the outstanding tasks, stops the node (which stops its
workers), removes the run directory and exits.

Objects: a small result travels inline: the worker sends the pickled value,
the owner keeps the bytes in the Future, and a dependent task receives them
inside its TASKS message. A large one stays in the worker's store and only
its location travels (``store.objects``). Either way the Future is the
object table's entry: Python's reference counting frees a value when neither
the user nor a pending task holds its Future, and a stored piece's Block then
posts ``free`` here, which goes to the worker that wrote it. Across hosts,
``core.directory`` records the copies pulled to other hosts, holds a task
until its host has pulled what it lacks, places tasks where their bytes are,
and frees every copy with the piece.
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import CancelledError, InvalidStateError
from multiprocessing import resource_tracker

import zmq

from .. import config
from ..errors import (
    InitializerError,
    ObjectLostError,
    ObjectStoreFullError,
    ProtocolError,
    TaskTimeoutError,
    UnpicklingFailedError,
    WorkerCrashedError,
)
from ..protocol.framing import decode_header
from ..protocol.messages import MessageType, ResultStatus
from ..store import segments, serialize, shared
from ..store.objects import DriverStore, remote
from . import startup
from .calls import Task, culprit, pickling_error
from .directory import HEAD, ObjectDirectory
from .head import Head, head_keys
from .lifetime import RUN_DIR_PREFIX, close_fds, live_owners, sweep_run_dirs, weak_method
from .local_node import LocalNode, LocalWorkers
from .membership import Membership
from .output import OutputPrinter
from .processes import WorkerProcess
from .relay import RELAY_KINDS, Relay
from .resources import Placement
from .scheduler import Scheduler, WorkerSlot
from .startup import FORK, check_not_importing_main
from .write_back import write_back

LOGGER = logging.getLogger("futurepool")

#: Worker names by start method, as the stdlib's process classes name them.
_PROCESS_NAMES = {"fork": "ForkProcess", "spawn": "SpawnProcess",
                  "forkserver": "ForkServerProcess"}


class Owner:
    """Owns the tasks one executor submits; see the module docstring."""

    def __init__(self, executor, *, max_workers: int, semantics: str, start_method: str,
                 initializer=None, initargs=(), initializer_blob: bytes | None = None,
                 inherited_fds: list[int] = (), max_tasks_per_child: int | None = None,
                 max_retries: int = 0, initializer_name: str = "",
                 main_references=None, workers_on_demand: bool = False,
                 listen: str | None = None, key_file: str | None = None,
                 resources: dict | None = None):
        self.max_workers = max_workers
        self.semantics = semantics  # startup.FORK or startup.SPAWN
        self.start_method = start_method
        # Fork semantics hand the initializer over in memory; spawn pickles it.
        self.inherited = {"initializer": initializer, "initargs": tuple(initargs)} \
            if semantics == FORK and initializer is not None else None
        self.initializer_blob = initializer_blob
        self.initializer_name = initializer_name
        self.inherited_fds = tuple(inherited_fds)
        self.max_tasks_per_child = max_tasks_per_child
        self.max_retries = max_retries
        # Which __main__ functions and classes travel by name (fork: fixed when the
        # node is forked; until then everything travels by value).
        self.main_references = main_references
        # Helpers call back through weak methods: with no owner <-> helper cycle, a
        # shut-down executor's owner and thread are freed with the executor, as the
        # stdlib's are, not at the next cyclic collection.
        self.functions = serialize.FunctionCache(weak_method(self.dumps))
        # What Future.stop() calls: one per owner, shared by its futures.
        self.stop_hook = weak_method(self.request_stop)
        # Workers on demand (spawn semantics, as the stdlib): one more per submit that
        # finds no idle worker. ``requested`` is written by user threads only.
        self.on_demand = workers_on_demand
        self.requested = 0 if workers_on_demand else max_workers
        self.idle_workers = threading.Semaphore(0)
        self.pid = os.getpid()
        # pid -> WorkerProcess, for ``executor._processes``: the I/O thread writes.
        self.processes: dict[int, WorkerProcess] = {}
        self.processes_changed = threading.Condition()
        # The cluster: where to listen for remote nodes (None: this host only).
        self.listen = listen
        self.key_file = key_file
        self.head: Head | None = None
        # Where tasks that ask for resources may run (core.resources).
        self.placement = Placement(resources, bool(listen), max_workers > 0)
        self.output = OutputPrinter()  # what remote workers print
        self.started_at = time.time()
        self.completed = 0  # tasks whose worker reported an outcome
        self.submitted = 0  # tasks admitted (futurepool status)
        self.failed = 0  # futures failed with an exception (futurepool status)
        self.listening = threading.Event()  # set once bound (or failed: open_error)
        self.open_error: BaseException | None = None
        self.remote_start: tuple[dict | None, str] | None = None  # (what nodes get, or why not)
        self.store = DriverStore(segments.new_settings(
            config.SHM_DIR, config.SPILL_DIR, config.SHM_PREFIX, config.STORE_CAPACITY,
            config.STORE_FRACTION, config.STORE_POOL_BYTES, config.INLINE_THRESHOLD,
            writers=max_workers + 1), weak_method(self.free_piece))
        # Tasks that tasks submit: placed here, owned by their workers (core.relay).
        self.relay = Relay(self)
        # Shared with user threads.
        self.commands: collections.deque = collections.deque()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Closes our descriptors exactly once: at the end of the I/O thread, or
        # when an executor that never started is shut down or collected.
        self.release_fds = weakref.finalize(self, close_fds, [self.wake_fd, *inherited_fds])
        # post() may find the I/O thread asleep just before it wakes, exits and closes
        # wake_fd: the write and the close are serialized, or the write could land in
        # whatever file next gets that descriptor number.
        self.wake_lock = threading.RLock()  # (a finalizer may post while it is held)
        self.sleeping = False
        self.broken: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.executor_ref = weakref.ref(executor, self._executor_gone)
        # ---- I/O thread only below ----
        self.tasks: dict[int, Task] = {}          # admitted, not settled
        self.ready: collections.deque[Task] = collections.deque()
        self.scheduler = Scheduler()
        self.by_routing: dict[bytes, WorkerSlot] = {}
        self.timers: list = []
        self.timer_seq = itertools.count()
        self.stopping = False
        self.terminating = False  # terminate_workers(), kill_workers(), Ctrl-C
        self.node: LocalNode | None = None
        self.node_settings: dict | None = None
        self.ctx = self.sock = self.poller = None
        self.run_dir = None
        self.frees: dict[WorkerSlot, list] = {}  # pieces to free, by the worker that wrote them
        self.objects = ObjectDirectory(self)  # pieces across hosts (core.directory)
        self.membership = Membership(self)  # workers and nodes coming and going
        self.store.fetcher = weak_method(self.fetch_piece)

    # -- called from user threads ---------------------------------------------

    @property
    def forked_copy(self) -> bool:
        """Whether this is a copy in a process forked from the one that made it.

        Its threads and node belong to that process; a lock it held while
        forking (the executor's, during the node's fork) stays held here.
        """
        return self.pid != os.getpid()

    def start(self, all_workers: bool = False) -> None:
        """Start the node (forking the driver, under fork semantics), then the I/O thread.

        Runs in the first submitting thread, before any thread of ours
        exists for this executor, as the stdlib launches its forked workers.
        ``all_workers``: start every worker now, even where they would start
        on demand (``multiprocessing.Pool`` does).
        """
        check_not_importing_main("A futurepool executor")
        if all_workers:
            self.on_demand = False
            self.requested = self.max_workers
        base = config.TMPDIR if len(config.TMPDIR) < 60 else "/tmp"  # sockaddr_un: 108 bytes
        sweep_run_dirs(base)
        segments.sweep_dead_sessions(self.store.settings.dirs, config.SHM_PREFIX)
        self.run_dir = tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir=base)
        self.address = f"ipc://{self.run_dir}/owner"
        settings = {
            "authkey": bytes(multiprocessing.current_process().authkey),
            "owner_address": self.address,
            "run_dir": self.run_dir,
            "initializer": self.initializer_blob,
            "max_tasks_per_child": self.max_tasks_per_child,
            "store": self.store.settings,
            "driver_pid": os.getpid(),
            "process_name": _PROCESS_NAMES.get(self.start_method, "Process"),
        }
        if self.semantics == FORK:
            # Remote hosts import the script: by name only what both kinds of worker have.
            self.main_references = startup.MainReferences.for_fork(importable=bool(self.listen))
        else:
            settings["preparation"] = startup.preparation_data(settings["process_name"],
                                                               self.start_method)
        self.node_settings = settings
        # Workers share the driver's resource tracker, as the stdlib's children do, so
        # a SharedMemory a task attaches to is never unlinked under the caller (gh-82300).
        resource_tracker.ensure_running()
        self.node = LocalNode(self.semantics, self.inherited_fds, self.inherited)
        self.node.start(resource_tracker._resource_tracker._fd)
        self.thread = threading.Thread(target=self._run, name="futurepool-owner", daemon=False)
        self.thread.start()
        live_owners.add(self)

    def dumps(self, obj, buffer_callback=None) -> bytes:
        """Pickle user data for this executor's workers (``__main__`` by name where they can)."""
        return serialize.dumps(obj, buffer_callback, self.main_references)

    def adjust_workers(self) -> None:
        """A submit: start one more worker unless one is idle (the stdlib's rule)."""
        if self.idle_workers.acquire(blocking=False):
            return
        if self.requested < self.max_workers:
            self.requested += 1
            self.post(("scale", self.requested))

    def process_table(self, timeout: float = 5.0) -> dict:
        """pid -> WorkerProcess, once every requested worker has reported its start."""
        with self.processes_changed:
            self.processes_changed.wait_for(
                lambda: len(self.processes) == self.requested or self.stopping
                or self.broken is not None, timeout)
            return dict(self.processes)

    def post(self, command) -> None:
        self.commands.append(command)
        if self.sleeping:
            with self.wake_lock:
                if self.release_fds.alive:
                    os.eventfd_write(self.wake_fd, 1)

    def _release_fds(self) -> None:
        with self.wake_lock:
            self.release_fds()

    def make_task(self, future, fn, args, kwargs, options=None) -> Task:
        """Pickle a call (in the caller's thread); raises PicklingError naming the culprit.

        ``options``: a :class:`calls.TaskOptions` from ``options()``, or None.
        """
        try:
            fn_id, fn_bytes = self.functions.get(fn)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001
            raise pickling_error(  # noqa: B904 - its cause is set, or it is the original
                f"Could not pickle the function {serialize.describe_callable(fn)}", exc)
        shared_names = []
        try:
            data, deps = serialize.dumps_arguments(args, kwargs, self.store, self.dumps,
                                                   context=self, shared_names=shared_names)
        except (KeyboardInterrupt, ObjectStoreFullError):
            raise
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in a __reduce__ too
            raise pickling_error(culprit(fn, args, kwargs), exc)  # noqa: B904 - as above
        if options is None:
            task = Task(future, fn_id, fn_bytes, serialize.describe_callable(fn), data, deps,
                        self.max_retries)
        else:
            # A max_retries given with a timeout also re-runs timed-out attempts.
            retries = options.max_retries
            task = Task(future, fn_id, fn_bytes, serialize.describe_callable(fn), data, deps,
                        self.max_retries if retries is None else retries,
                        options.timeout or 0.0, retries is not None, options.request,
                        options.memory_limit or 0)
        if shared_names:
            task.shared = frozenset(shared_names)
        future._description = task.describe()
        future._stop_via = self.stop_hook
        future._task_id = task.task_id
        future._borrows = self.relay.driver_borrows  # futures a task returns
        return task

    def request_stop(self, task_id: int) -> None:
        """Future.stop() on a dispatched task (its future is already cancelled)."""
        self.post(("stop", task_id))

    def free_piece(self, location) -> None:
        """A stored piece lost its last holder (called from finalizers, any thread)."""
        self.post(("free", location))

    def fetch_piece(self, block):
        """A piece of another host, pulled into this host's store for ``result()``
        (blocking, in the caller's thread); its local Location. Raises ObjectLostError."""
        future = concurrent.futures.Future()
        self.post(("fetch", block, future))
        while True:  # each transfer gives up by itself (config.TRANSFER_TIMEOUT per copy)
            try:
                return future.result(timeout=config.HEARTBEAT_INTERVAL)
            except concurrent.futures.TimeoutError:
                if self.thread is None or not self.thread.is_alive():
                    raise ObjectLostError(
                        f"The stored value {block.location.name} lives on another host and"
                        " the executor stopped before it arrived.", block.location.name) from None

    def request_shutdown(self, cancel_futures: bool = False) -> None:
        self.post(("shutdown", cancel_futures))

    def request_terminate(self, sig: int) -> None:
        """Cancel pending tasks and stop the workers now with ``sig``."""
        self.post(("terminate", int(sig)))

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def close_unstarted(self) -> None:
        """Shutdown of an executor that never ran a task: fds and stored values to free."""
        self.store.pin_all()
        self.store.close()
        self._release_fds()

    def _executor_gone(self, _ref) -> None:
        self.post(("shutdown", False))

    # -- the I/O thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            try:
                self._open()
            except BaseException as exc:
                self.open_error = exc
                raise
            finally:
                self.listening.set()
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - never die silently, never leave futures hanging
            if exc is not self.open_error:
                LOGGER.critical("futurepool owner thread failed", exc_info=True)
            self._break(exc)
        finally:
            self._close()
            live_owners.discard(self)

    def _open(self) -> None:
        self.ctx = zmq.Context(1)
        self.sock = self.ctx.socket(zmq.ROUTER)
        # Unknown or gone peers raise instead of silently dropping (FAULTS.md 1.6).
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.wake_fd, zmq.POLLIN)
        self.local_workers = LocalWorkers(self.sock)
        if self.listen:
            self.head = Head(self, self.ctx, self.listen, head_keys(self.listen, self.key_file))
            for sock in self.head.sockets:
                self.poller.register(sock, zmq.POLLIN)
        self.membership.configure_node()

    def _loop(self) -> None:
        sock, wake_fd, poll = self.sock, self.wake_fd, self.poller.poll
        while True:
            if self.commands:
                self._drain_commands()
            if self.frees:  # (posted by finalizers, or sent by owners of nested results)
                self._send_frees()
            if self.ready:
                self._dispatch()
                if self.relay.blocked and self.ready:
                    self.relay.lend(self._lend)
            if self.relay.outgoing:
                self.relay.flush()
            if self.stopping and self._idle():
                return
            timeout = config.HEARTBEAT_INTERVAL
            if self.timers:
                timeout = max(0.0, min(timeout, self.timers[0][0] - time.monotonic()))
            self.sleeping = True
            if self.commands:
                timeout = 0
            events = poll(timeout * 1000)
            self.sleeping = False
            for what, _ in events:
                if what is sock:
                    self._drain_socket()
                elif what == wake_fd:
                    os.eventfd_read(wake_fd)
                elif self.node is not None and what == self.node.event_fd:
                    self.membership.read_node_events()
                elif self.head is not None:
                    self.head.handle(what)
            if self.timers:
                self._run_timers()
            if self.head is not None:
                self.head.tick(time.monotonic())

    def _idle(self) -> bool:
        if self.commands:
            return False
        if self.tasks:  # cancelled tasks still waiting on dependencies do not count
            for task_id in [t for t, task in self.tasks.items() if task.future.cancelled()]:
                del self.tasks[task_id]
        return not self.tasks

    # -- commands -------------------------------------------------------------

    def _drain_commands(self) -> None:
        commands = self.commands
        while commands:
            command = commands.popleft()
            kind = command[0]
            if kind == "task":
                self._admit(command[1])
            elif kind == "dep":
                self._dependency_done(command[1], command[2])
            elif kind == "free":
                self._free(command[1])
            elif kind == "pulled":  # from the head's transfer endpoint
                self.objects.pulled(HEAD, *command[1:])
            elif kind == "fetch":
                self.objects.fetch(command[1], command[2])
            elif kind == "stop":
                self._stop_task(command[1])
            elif kind == "relay":  # a future the driver borrowed: ask, or let go
                self.relay.driver_command(command[1], command[2])
            elif kind == "scale":
                if self.node is not None:
                    self.node.scale(command[1])
            elif kind == "shutdown":
                self.stopping = True
                if command[1]:
                    self._cancel_pending()
            elif kind == "terminate":
                self.stopping = self.terminating = True
                self._cancel_pending(commit_head=False)
                # Nothing will run what is left: fail it (running ones fail as
                # their workers die: Membership._bury).
                for task in self.ready:
                    self._settle_exception(task, CancelledError(
                        "the workers were stopped (terminate_workers(), kill_workers() or"
                        f" Ctrl-C) before {task.describe()} ran"))
                self.ready.clear()
                if self.node is not None:
                    self.node.stop(command[1])

    def _admit(self, task: Task) -> None:
        self.submitted += 1
        if self.broken is not None:
            self._settle_exception(task, self._broken_error())
            return
        self.tasks[task.task_id] = task
        if not task.deps:
            self.ready.append(task)
            return
        for dep in list(task.deps.values()):
            dep.add_done_callback(lambda f, t=task: self.post(("dep", t, f)))

    def _dependency_done(self, task: Task, dep) -> None:
        if task.future.done():
            return
        if dep.cancelled():
            task.future.cancel()
            self.tasks.pop(task.task_id, None)
            return
        exc = dep._exception
        if exc is not None:  # fails without running, with the same exception
            self._settle_exception(task, exc)
            return
        task.waiting -= 1
        if task.waiting == 0:
            self.ready.append(task)

    def _stop_task(self, task_id: int) -> None:
        """Interrupt a task its user stopped: in its worker if sent, else drop it here."""
        task = self.tasks.get(task_id)
        if task is None:
            return
        for worker in self.scheduler.workers.values():
            if task in worker.inflight:
                # It settles when the worker reports it STOPPED, or dies (Membership._bury).
                try:
                    worker.link.send(worker, MessageType.INTERRUPT, 1,
                                     serialize.dumps_plain((task.task_id, task.attempt)))
                except zmq.ZMQError:
                    pass  # gone: its node reports the death
                return
        del self.tasks[task_id]
        if task in self.ready:  # re-queued after its worker died
            self.ready.remove(task)

    def _cancel_pending(self, commit_head: bool = True) -> None:
        """Cancel what has not started; as in the stdlib, what fits the pool has.

        The stdlib commits up to ``max_workers + 1`` calls to its workers'
        queue as soon as they are submitted; here tasks are sent when a worker
        has room, so first send what can be sent, then (``commit_head``)
        count the head of the queue, up to the pool's free capacity, as
        started too.
        """
        self._dispatch()
        busy = sum(len(w.inflight) for w in self.scheduler.workers.values())
        slots = self.max_workers + (self.head.slots if self.head is not None else 0)
        free = max(0, slots - busy) if commit_head else 0
        for task in itertools.islice(self.ready, free):
            if not task.started and task.future.set_running_or_notify_cancel():
                task.started = True
        for task in list(self.tasks.values()):
            if not task.started and task.future.cancel():
                del self.tasks[task.task_id]
        self.ready = collections.deque(t for t in self.ready if t.task_id in self.tasks)

    # -- stored pieces --------------------------------------------------------

    def _free(self, location) -> None:
        if location is None:  # the driver's own pieces, deferred by their Blocks
            self.store.writer.drain_frees()
            return
        self.objects.free(location)  # its copies on other hosts
        if location.writer == shared.EXPORT_WRITER:  # the user's segment: theirs to remove
            self.store.exports.pop(location.name, None)
            return
        slot = self.scheduler.workers.get(location.writer)
        if slot is None or not slot.alive:  # its writer is gone: nobody will reuse it
            if remote(location):
                self.objects.orphan(location)  # its node removes it
            else:
                segments.unlink(location, self.store.settings.dirs)
        else:
            self.frees.setdefault(slot, []).append(tuple(location))

    def _send_frees(self) -> None:
        frees, self.frees = self.frees, {}
        for slot, locations in frees.items():
            try:
                slot.link.send(slot, MessageType.FREE, len(locations),
                               serialize.dumps_plain(locations))
            except zmq.ZMQError:  # it just left
                for location in locations:
                    segments.unlink(segments.Location(*location), self.store.settings.dirs)

    def _wrap_pieces(self, payload):
        """A worker's encoded result, its stored pieces as Blocks (freed when dropped)."""
        if type(payload) is bytes:
            return payload
        inband, pieces = payload
        wrap = self.store.wrap
        if type(inband) is not bytes:
            inband = wrap(segments.Location(*inband))
        return inband, tuple(wrap(segments.Location(*piece)) for piece in pieces)

    # -- dispatch -------------------------------------------------------------

    def _dispatch(self) -> None:
        batches: dict[WorkerSlot, list] = {}
        ready, pick, estimate = self.ready, self.scheduler.pick, self.scheduler.estimate
        now = time.monotonic()
        fitting = None  # for tasks that ask for resources: what each node holds now
        waiting = []  # those that fit nowhere now: they keep their place in the queue
        while ready:
            task = ready[0]
            task.estimate = estimate(task.fn_id)
            worker = pick(task.estimate, now, self.objects.affinity(task))
            if worker is None:  # no worker takes anything now, whatever it asks for
                break
            if task.resources is not None:  # only where its node has room
                fitting = fitting or self.placement.round(self.scheduler)
                worker = fitting.pick(task, now, worker)
                if worker is None:
                    ready.popleft()
                    if task.future.cancelled():  # cancelled while it waited
                        self.tasks.pop(task.task_id, None)
                    else:
                        waiting.append(task)
                    continue
            ready.popleft()
            item = self._assign(task, worker, now)
            if item is not None:
                batches.setdefault(worker, []).append(item)
        if waiting:
            ready.extendleft(reversed(waiting))
        for worker, items in batches.items():
            self._send_tasks(worker, items)

    def _assign(self, task: Task, worker: WorkerSlot, now: float):
        """``task`` goes to ``worker``: its TASKS item (None: cancelled meanwhile, or held
        until its node has pulled the stored pieces it lacks: core.directory)."""
        if not task.started:
            if not task.future.set_running_or_notify_cancel():
                self.tasks.pop(task.task_id, None)
                return None
            task.started = True
        elif task.future.cancelled():  # re-queued, then stopped: Future.stop()
            self.tasks.pop(task.task_id, None)
            return None
        if task.fn_id in worker.functions:
            fn_bytes = b""
            worker.functions.move_to_end(task.fn_id)
        else:
            fn_bytes = task.fn_bytes
            worker.functions[task.fn_id] = None
            if len(worker.functions) > 512:
                worker.functions.popitem(last=False)
        deps = tuple((oid, dep._payload()) for oid, dep in task.deps.items())
        if not worker.inflight:
            worker.progress_at = now
        worker.inflight.append(task)
        worker.backlog += task.estimate
        if worker.quota is not None:
            worker.quota -= 1
        return self.objects.place(worker, task, (task.task_id, task.attempt, task.fn_id,
                                                 fn_bytes, task.args, deps, task.timeout,
                                                 task.limits()))

    def _send_tasks(self, worker: WorkerSlot, items: list, kind=MessageType.TASKS) -> None:
        try:
            worker.link.send(worker, kind, len(items), serialize.dumps_plain(items))
        except zmq.ZMQError:  # the worker is gone; its node will tell us how
            worker.alive = False
            self._requeue(worker, len(items))

    def _lend(self, task: Task, worker: WorkerSlot) -> None:
        """A blocked worker runs ``task``, which it owns, inline (core.relay)."""
        task.estimate = self.scheduler.estimate(task.fn_id)
        item = self._assign(task, worker, time.monotonic())
        if item is not None:
            self._send_tasks(worker, [item], MessageType.LEND)

    def _held_failed(self, worker: WorkerSlot, task: Task, error: BaseException) -> None:
        """A task held for its pieces cannot get them (core.directory): it fails, unrun."""
        if task in worker.inflight:
            worker.inflight.remove(task)
            worker.backlog -= task.estimate
            if worker.quota is not None:
                worker.quota += 1
        self._settle_exception(task, error)

    def _requeue(self, worker: WorkerSlot, count: int) -> None:
        """Put the last ``count`` tasks sent to ``worker`` back at the head of the queue."""
        for _ in range(min(count, len(worker.inflight))):
            task = worker.inflight.pop()
            worker.backlog -= task.estimate
            self.ready.appendleft(task)
            if worker.quota is not None:
                worker.quota += 1

    # -- messages from workers ------------------------------------------------

    def _drain_socket(self) -> None:
        sock = self.sock
        for _ in range(10000):
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                return
            frames = sock.recv_multipart(zmq.NOBLOCK)
            try:
                self._handle(frames)
            except ProtocolError as exc:
                LOGGER.warning("dropped a malformed message from %r: %s", frames[0], exc)

    def _handle(self, frames) -> None:
        if len(frames) < 3:
            raise ProtocolError(f"{len(frames)} frames")
        kind, count, ident, _seq, _ack = decode_header(frames[1])
        self._worker_message(self.local_workers, frames[0], kind, count, ident, frames[2])

    def _worker_message(self, link, routing_id: bytes, kind, count: int, worker_id: int,
                        body) -> None:
        """A message from a worker (``worker_id``: its header's ident), through ``link``."""
        if kind == MessageType.RESULTS:
            worker = self.scheduler.workers.get(worker_id)
            if worker is not None and worker.link is link:
                self._results(worker, serialize.loads(body))
        elif kind == MessageType.READY:
            worker_id, pid, tasks_left = serialize.loads(body)
            self.membership.worker_ready(link, routing_id, worker_id, pid, tasks_left)
        elif kind == MessageType.INIT_FAILED:
            self.membership.initializer_failed(worker_id, serialize.loads_exception(body))
        elif kind == MessageType.START_FAILED:
            self.membership.start_failed(worker_id, None, serialize.loads_exception(body))
        elif kind == MessageType.OUTPUT and link.remote:
            self.output.write(link.host, worker_id, count, body)
        elif kind in RELAY_KINDS:  # tasks that tasks submit, and their futures
            worker = self.scheduler.workers.get(worker_id)
            if worker is not None and worker.link is link:
                self.relay.message(worker, kind, body)
        else:
            raise ProtocolError(f"unexpected {kind.name} from a worker")

    def _results(self, worker: WorkerSlot, results) -> None:
        self._settle_results(worker, results)
        if not worker.alive and worker.link.remote and not worker.inflight:
            self.membership.release_if_drained(worker.link)

    def _settle_results(self, worker: WorkerSlot, results) -> None:
        inflight = worker.inflight
        worker.progress_at = time.monotonic()
        for result in results:
            task_id, attempt, status, payload, took = result[:5]
            if status == ResultStatus.OK and type(payload) is not bytes:
                payload = self._wrap_pieces(payload)  # a result we drop below is freed
            if inflight and inflight[0].task_id == task_id:
                task = inflight.popleft()
            else:
                task = next((t for t in inflight if t.task_id == task_id), None)
                if task is None:
                    continue  # fenced: from an attempt we gave up on
                inflight.remove(task)
            worker.backlog -= task.estimate
            if not inflight:
                worker.backlog = 0.0  # no drift from float sums
            if task.task_id == worker.lent:
                worker.lent = 0
            if attempt != task.attempt:
                continue
            if self.on_demand:  # a worker is free again (the stdlib's idle semaphore)
                self.idle_workers.release()
            self.completed += 1
            if len(result) > 5:  # it changed mirrors of shared memory: written back first
                write_back(self, task, self._wrap_pieces(result[5]),
                           lambda w=worker, t=task, s=status, p=payload, d=took:
                           self._settle(w, t, s, p, d))
                continue
            self._settle(worker, task, status, payload, took)

    def _settle(self, worker: WorkerSlot, task: Task, status, payload, took) -> None:
        """Complete ``task``'s future with an outcome of its current attempt."""
        if status == ResultStatus.OK:
            self.scheduler.record(task.fn_id, took)
            self.tasks.pop(task.task_id, None)
            self.objects.lineage.produced(task, payload)  # core.lineage
            try:
                task.future._set_encoded_result(payload)
            except InvalidStateError:
                pass  # stopped (Future.stop) as it finished: it stays cancelled
            except BaseException:  # noqa: BLE001 - a callback must not stop us
                LOGGER.exception("setting the result of %s", task.describe())
        elif status == ResultStatus.ERROR:
            self.scheduler.record(task.fn_id, took)
            self._settle_exception(task, serialize.loads_exception(payload))
        elif status == ResultStatus.ARGS_FAILED:
            original = serialize.loads_exception(payload)
            if isinstance(original, ObjectLostError):
                self._settle_exception(task, original)
                return
            hint = ""
            if isinstance(original, ModuleNotFoundError) and worker.link.remote:
                hint = (f" The module {original.name!r} must be installed on"
                        f" {worker.link.host} too: only the main script is shipped.")
            error = UnpicklingFailedError(
                f"The arguments of {task.describe()} could not be unpickled in worker"
                f" {worker.worker_id} on {worker.link.describe()}:"
                f" {type(original).__name__}: {original}. The task did not run; the"
                f" worker and the pool are fine.{hint}", what="arguments")
            error.__cause__ = original
            self._settle_exception(task, error)
        elif status == ResultStatus.TIMED_OUT:
            if self._retry_timeout(task):
                return
            error = TaskTimeoutError(task.describe(), task.timeout)
            if payload:  # what the task raised when interrupted, with its traceback
                error.__cause__ = serialize.loads_exception(payload)
            self._settle_exception(task, error)
        elif status == ResultStatus.STOPPED:
            self.tasks.pop(task.task_id, None)  # its future was cancelled by stop()
        elif status == ResultStatus.MISSING_FUNCTION:
            worker.functions.pop(task.fn_id, None)
            self.ready.appendleft(task)
            if worker.quota is not None:
                worker.quota += 1

    def _retry_timeout(self, task: Task) -> bool:
        """Re-run a timed-out (or memory-killed) task if its options gave it retries."""
        if not task.retry_timeouts or task.retries_left <= 0 or task.future.done():
            return False
        task.retries_left -= 1
        task.attempt += 1
        self.ready.appendleft(task)
        return True

    def _settle_exception(self, task: Task, exc: BaseException) -> None:
        self.tasks.pop(task.task_id, None)
        self.failed += 1
        try:
            task.future.set_exception(exc)
        except BaseException:  # noqa: BLE001 - already cancelled, or a callback failed
            LOGGER.debug("could not fail %s", task.describe(), exc_info=True)

    # -- timers ---------------------------------------------------------------

    def _add_timer(self, delay: float, action) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.timer_seq), action))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            heapq.heappop(self.timers)[2]()

    # -- breaking and closing -------------------------------------------------

    def _break(self, error: BaseException) -> None:
        """The pool cannot run tasks any more: fail everything, stop."""
        self.broken = error
        self.stopping = True
        self._drain_commands()
        for task in list(self.tasks.values()):
            if not task.future.done():
                self._settle_exception(task, self._broken_error())
        self.tasks.clear()
        self.ready.clear()

    def _broken_error(self) -> BaseException:
        """A fresh exception per future (one object raised in many threads tangles tracebacks)."""
        error = self.broken
        if isinstance(error, (InitializerError, WorkerCrashedError)):
            fresh = InitializerError(*error.args) if isinstance(error, InitializerError) \
                else WorkerCrashedError(error.task, error.worker_id, error.pid, error.host,
                                        error.exitcode, error.signal_name, detail=error.detail)
            fresh.__cause__ = error.__cause__
            return fresh
        return CancelledError(f"the pool stopped: {error!r}")

    def _close(self) -> None:
        self.stopping = True
        # The node removes the session's segments as it exits: keep what the
        # user can still read mapped first (the pages outlive the unlink).
        self.store.pin_all()
        if self.node is not None:
            self.membership.stop_node()
        if self.head is not None:
            self.head.transfer.close()  # nothing is written into the store any more
        self.store.close()
        if self.node is not None:
            self.node.close_events()
        if self.head is not None:
            self.head.close()
        if self.sock is not None:
            self.sock.close(linger=0)
            self.ctx.term()
        self._release_fds()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        # Whatever is still pending can never complete now.
        for task in list(self.tasks.values()):
            if not task.future.done():
                self._settle_exception(task, CancelledError("the executor was shut down"))
        self.tasks.clear()
