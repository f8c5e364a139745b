"""The node: one per host, it starts, watches and replaces worker processes.

::

    driver (owner's I/O thread)                      node (this module)
      cmd pipe  ── NODE_CONFIG, _SCALE, _STOP ────►  main loop (one thread)
      event pipe ◄── WORKER_STARTED, _EXITED ───────   ├─ os.fork() ─► worker 0 ─┐
                                                       ├─ os.fork() ─► worker 1 ─┤ zmq ipc
      owner ROUTER ◄──────────── READY / RESULTS ──────────────────────────────────┘ to owner
                                                       └─ adopted ◄── what a dead worker left
                                                          (SIGTERM, SIGKILL after ORPHAN_GRACE)

Who owns what: the node owns nothing but its children. It has no threads and
no zmq context, which is what makes ``os.fork()`` safe and cheap here (about
a millisecond, with the interpreter and our modules already loaded); the
workers build their own zmq context after the fork. User code never runs in
the node. How the node itself starts decides what workers inherit
(``core.startup``): under fork semantics it is forked from the driver, so
workers see the driver's memory; under spawn semantics it is a fresh
interpreter, and each worker imports the main script.

Who owns the processes a task starts (Linux): the worker that ran the task,
for as long as that worker lives, and nobody after it. The node and every
worker are child subreapers (``processes.set_child_subreaper``), so the
kernel keeps the books: a process orphaned below a live worker (a double
fork, ``cmd &`` in a shell, a dead intermediate) is re-parented to that
worker and stays out of our way; when a worker dies, for any reason, all it
still had below it is re-parented to the node. Hence a child of the node that
is not in ``Node.workers`` was left by a dead worker, and the node ends it:
SIGTERM when it first sees it, SIGKILL ``ORPHAN_GRACE`` seconds later, and
the same for that process's own children as they come up in turn. Process
groups, sessions and environment variables are not consulted: tasks change
them (``start_new_session=True``, ``setsid``, ``env=``). When the node stops
(shutdown, the driver's death, SIGTERM), it leaves only once it has no child
at all, so nothing a task started outlives the executor. The price: a
process orphaned below a live worker that then exits stays a zombie of that
worker until the worker exits (the worker cannot tell such adopted children
from its own, and reaping its own would steal their exit status from
``subprocess`` and ``multiprocessing``); ``max_tasks_per_child`` bounds that.
If the node itself is SIGKILLed, what dead workers left goes to init.

Time limits (``options(timeout=)``): a worker enforces its tasks' limits
itself (core.worker), but C code that holds the GIL shuts its threads out.
So a worker also writes into its slot when a task with a limit must be gone
for good, and each pass of the node's loop kills a worker still running that
task past that time, marking the slot so the death reads as a timeout.
Memory limits (``options(memory_limit=)``) likewise: the worker's watchdog
reads its own RSS every 10 ms, and while a task with a limit runs the node
reads that worker's every ``MEMORY_CHECK_INTERVAL`` too (``enforce_memory``),
killing it past the limit with the slot marked, so the owner fails the task
with TaskMemoryError before the kernel's OOM killer picks a victim.

Liveness, both ways, without heartbeat traffic:
* the driver holds the write end of the command pipe: end of file on it
  means the driver is gone, and the node kills its workers and exits;
* workers get ``PR_SET_PDEATHSIG``: if the node is killed, so are they;
* the driver sees end of file on the event pipe when the node dies.
"""

from __future__ import annotations

import gc
import math
import mmap
import multiprocessing
import multiprocessing.util
import os
import select
import shutil
import signal
import sys
import time
import traceback

from .. import config
from ..protocol.framing import PipeReader, write_pipe_message
from ..protocol.messages import MessageType
from ..store import segments, serialize, shared
from .processes import (
    EXIT_INITIALIZER_FAILED,
    INITIALIZING,
    INTERRUPT_MEMORY,
    INTERRUPT_TIMEOUT,
    MEMORY_SLOT,
    MEMORY_SLOT_OFFSET,
    MEMORY_WATCH_SIGNAL,
    NODE_PROCESS_NAME,
    RUNNING_SLOT,
    SLOT_INTERRUPT,
    SLOT_INTERRUPT_OFFSET,
    SLOT_SIZE,
    WORKER_PROCESS_NAME,
    child_pids,
    describe_status,
    set_child_subreaper,
    set_parent_death_signal,
    set_process_name,
)
from .resources import rss_of
from .startup import become_worker_process
from .worker import run_worker

#: Seconds a process left by a dead worker has between SIGTERM and SIGKILL.
#: SIGTERM first because that is when such processes clean up: a nested
#: executor's node removes its shared-memory segments and run directory, and
#: a stdlib pool's workers die of it at once, after which the multiprocessing
#: resource tracker (which ignores SIGTERM) sees end of file and unlinks what
#: they leaked. A SIGKILL would skip both. One second is enough for that and
#: short enough that the leftovers of recycled workers do not pile up and
#: shutdown stays prompt; a process without a handler costs nothing extra.
ORPHAN_GRACE = 1.0


class Node:
    def __init__(self, settings: dict, cmd: PipeReader, event_fd: int, inherited=None):
        self.settings = settings
        # Fork semantics: what the workers take from memory (initializer, initargs, the
        # driver's signal handlers); None for a spawned node.
        self.inherited = inherited
        self.target = settings["workers"]  # how many workers to keep (NODE_SCALE changes it)
        self.cmd_fd = cmd.fd
        self.event_fd = event_fd
        # pid -> (worker_id, start time, running-task slot)
        self.workers: dict[int, tuple[int, float, mmap.mmap]] = {}
        self.next_worker_id = settings.get("first_worker_id", 0)
        self.stopping = False
        self.no_respawn = False  # an initializer failed: the pool is broken
        self.quick_deaths = 0
        self.respawn_at: float | None = None
        # Children that are not workers: what dead workers left (see "who owns
        # the processes a task starts"); pid -> monotonic time SIGKILL is due.
        self.orphans: dict[int, float] = {}
        self.adopts_orphans = False  # serve() sets it when we are a child subreaper
        self.orphan_grace = ORPHAN_GRACE  # 0 once a stop is overdue: SIGKILL on sight
        # The reader that read NODE_CONFIG: a NODE_STOP may already be in its buffer.
        self.cmd = cmd
        self.wakeup_r, self.wakeup_w = os.pipe()

    # -- workers --------------------------------------------------------------

    def spawn_worker(self) -> None:
        worker_id = self.next_worker_id
        self.next_worker_id += 1
        node_pid = os.getpid()
        slot = mmap.mmap(-1, SLOT_SIZE)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                self._become_worker(node_pid, worker_id)
                code = run_worker(worker_id, self.settings, slot, self.inherited)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - report, then leave without cleanup
                traceback.print_exc()
            finally:
                # As multiprocessing's workers do: run its finalizers, which
                # flush the feeder threads of queues the tasks wrote to.
                multiprocessing.util._exit_function()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.workers[pid] = (worker_id, time.monotonic(), slot)
        self.report(MessageType.WORKER_STARTED, (worker_id, pid))

    def _become_worker(self, node_pid: int, worker_id: int) -> None:
        set_parent_death_signal()
        if os.getppid() != node_pid:  # the node died before prctl took effect
            os._exit(1)
        # What a task orphans while this worker lives stays below it, so the node
        # never takes it for the leftovers of a dead worker (module docstring).
        set_child_subreaper()
        signal.set_wakeup_fd(-1)
        for fd in (self.cmd_fd, self.event_fd, self.wakeup_r, self.wakeup_w):
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(MEMORY_WATCH_SIGNAL, signal.SIG_DFL)
        if self.inherited is not None:  # as the stdlib's forked workers, keep the driver's
            for signum, handler in self.inherited.get("signal_handlers", {}).items():
                signal.signal(signum, handler)
        # Ctrl-C is the driver's to handle; it stops us (FAULTS.md 44).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        gc.enable()
        set_process_name(WORKER_PROCESS_NAME)
        become_worker_process(f"{self.settings['process_name']}-{worker_id + 1}",
                              self.settings["driver_pid"])

    def reap(self) -> bool:
        """Wait for every child that has exited; whether we still have a child."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            worker_id, started, slot = self.workers.pop(pid, (None, 0.0, None))
            if worker_id is None:  # left by a dead worker: no report, no respawn
                self.orphans.pop(pid, None)
                continue
            task_id, attempt, interrupt, _kill_at = RUNNING_SLOT.unpack_from(slot)
            _limit, peak = MEMORY_SLOT.unpack_from(slot, MEMORY_SLOT_OFFSET)
            slot.close()
            shared.remove_mirrors(self.settings["store"].session, pid)  # if it died in a task
            exitcode, signame = describe_status(status)
            self.report(MessageType.WORKER_EXITED,
                        (worker_id, pid, exitcode, signame, task_id, attempt, interrupt,
                         peak if interrupt == INTERRUPT_MEMORY else 0))
            if exitcode == EXIT_INITIALIZER_FAILED or task_id == INITIALIZING:
                self.no_respawn = True  # a failing initializer breaks the pool: no storm
                continue
            # Crashing right after start again and again is backed off; leaving
            # on purpose (max_tasks_per_child, exit code 0) is not.
            if exitcode != 0 and time.monotonic() - started < 1.0:
                self.quick_deaths += 1
            else:
                self.quick_deaths = 0
            if self.quick_deaths > 3:
                delay = min(1.0, 0.05 * 2 ** self.quick_deaths)
                self.respawn_at = max(self.respawn_at or 0.0, time.monotonic() + delay)

    def end_orphans(self) -> None:
        """Signal the children that are not workers: SIGTERM at first sight, SIGKILL when due.

        Each of them is our child and not yet reaped (only :meth:`reap`
        reaps, in this thread), so its pid cannot have been reused: signalling
        it by pid is safe. Its children come up to us as it dies and are
        handled on a later pass.
        """
        if not self.adopts_orphans:
            return
        now = time.monotonic()
        for pid in child_pids() - self.workers.keys():
            due = self.orphans.get(pid)
            if due is None:
                self.orphans[pid] = now + self.orphan_grace
                sig = signal.SIGTERM if self.orphan_grace > 0 else signal.SIGKILL
            elif due <= now:
                self.orphans[pid] = math.inf  # once is enough
                sig = signal.SIGKILL
            else:
                continue
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # cannot happen to an unreaped child; harmless
                pass

    def enforce_deadlines(self) -> float:
        """Kill workers still running a task past its ``kill_at``; the next one due (or inf).

        The backstop of a worker's own watchdog (core.worker), which cannot
        run while C code holds the GIL. The kill is marked as a timeout in
        the slot, so the owner fails the task with TaskTimeoutError.
        """
        now = time.monotonic()
        due = math.inf
        for pid, (_worker_id, _started, slot) in self.workers.items():
            task_id, _attempt, interrupt, kill_at = RUNNING_SLOT.unpack_from(slot)
            if not kill_at or not task_id:
                continue
            if kill_at > now:
                due = min(due, kill_at)
                continue
            if not interrupt:
                SLOT_INTERRUPT.pack_into(slot, SLOT_INTERRUPT_OFFSET, INTERRUPT_TIMEOUT)
            _kill(pid)
        return due

    def enforce_memory(self) -> float:
        """Kill workers past their task's ``memory_limit``; when to look again (or inf).

        The backstop of a worker's own watchdog (core.worker), which reads its
        memory every 10 ms but cannot while C code holds the GIL (a large
        allocation, a copy). Each look is one small read of ``/proc``, and
        the node only looks this often while a task with a limit runs (the
        worker wakes it with ``MEMORY_WATCH_SIGNAL`` when one starts).
        """
        due = math.inf
        for pid, (_worker_id, _started, slot) in self.workers.items():
            limit, _peak = MEMORY_SLOT.unpack_from(slot, MEMORY_SLOT_OFFSET)
            if not limit:
                continue
            due = time.monotonic() + config.MEMORY_CHECK_INTERVAL
            rss = rss_of(pid)
            task_id, _attempt, interrupt, _kill_at = RUNNING_SLOT.unpack_from(slot)
            if rss is None or rss <= limit or not task_id or interrupt:
                continue
            SLOT_INTERRUPT.pack_into(slot, SLOT_INTERRUPT_OFFSET, INTERRUPT_MEMORY)
            MEMORY_SLOT.pack_into(slot, MEMORY_SLOT_OFFSET, limit, rss)
            _kill(pid)
        return due

    def top_up(self) -> None:
        """Start workers until there are as many as configured (unless backing off)."""
        if self.stopping or self.no_respawn:
            return
        if self.respawn_at is not None:
            if time.monotonic() < self.respawn_at:
                return
            self.respawn_at = None
        while len(self.workers) < self.target:
            self.spawn_worker()

    def report(self, kind: MessageType, body) -> None:
        try:
            write_pipe_message(self.event_fd, kind, serialize.dumps_plain(body))
        except OSError:  # the driver is gone; the command pipe will say so too
            self.stopping = True

    def stop_workers(self, sig: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # -- main loop ------------------------------------------------------------

    def run(self) -> int:
        # A NODE_SCALE or NODE_STOP may have come with the configuration. The workers
        # asked for start even so: a pool's workers always run its initializer.
        self.read_commands(start_before_stop=True)
        self.top_up()
        poller = select.poll()
        poller.register(self.cmd_fd, select.POLLIN)
        poller.register(self.wakeup_r, select.POLLIN)
        deadline = None
        kill_due = math.inf  # the next task deadline a worker must be killed at
        while True:
            timeout = config.HEARTBEAT_INTERVAL
            if self.respawn_at is not None:
                timeout = min(timeout, self.respawn_at - time.monotonic())
            if self.orphans:  # wake for the next SIGKILL that falls due
                timeout = min(timeout, min(self.orphans.values()) - time.monotonic())
            timeout = min(timeout, kill_due - time.monotonic())
            for fd, _ in poller.poll(max(0.0, timeout) * 1000):
                if fd == self.wakeup_r:
                    os.read(self.wakeup_r, 4096)
                elif not self.stopping:
                    self.read_commands()
            if self.stopping and deadline is None:
                poller.unregister(self.cmd_fd)
                deadline = time.monotonic() + config.SHUTDOWN_TIMEOUT
            # A worker's leftovers are re-parented to us before its exit can be
            # reaped: the pass that reaps a worker also sees what it left.
            children_left = self.reap()
            self.end_orphans()
            kill_due = min(self.enforce_deadlines(), self.enforce_memory())
            if self.stopping:
                # Not before the last child is gone: the workers, and what they left.
                if not children_left:
                    return 0
                if time.monotonic() > deadline:
                    self.stop_workers(signal.SIGKILL)
                    self.orphan_grace = 0.0
                    self.orphans = dict.fromkeys(self.orphans, 0.0)  # due now
                    deadline = time.monotonic() + config.SHUTDOWN_TIMEOUT
            else:
                self.top_up()

    def read_commands(self, start_before_stop: bool = False) -> None:
        try:
            for kind, ident, _body in self.cmd.read():
                if kind == MessageType.NODE_STOP:
                    if start_before_stop:
                        self.top_up()
                    self.begin_stop(ident)  # 0: the owner told the workers to STOP
                elif kind == MessageType.NODE_SCALE:
                    self.target = ident
        except Exception:  # noqa: BLE001 - a corrupt pipe means the driver is gone
            self.cmd.closed = True
        if self.cmd.closed and not self.stopping:  # driver died: nobody wants results
            self.begin_stop(signal.SIGKILL)
            # Its run directory (ipc socket) would be left behind.
            shutil.rmtree(self.settings["run_dir"], ignore_errors=True)

    def begin_stop(self, sig: int) -> None:
        """Stop: with ``sig`` now, or (0) wait for the workers to leave by themselves."""
        self.stopping = True
        if sig:
            self.stop_workers(sig)


def main() -> None:
    """Entry point of a spawned node (``start_node``; spawn semantics).

    ``sys.argv[1:4]`` are the command and event pipe descriptors and the
    driver's resource tracker descriptor (-1: none).
    """
    cmd_fd, event_fd, tracker_fd = (int(arg) for arg in sys.argv[1:4])
    if tracker_fd >= 0:  # workers share the driver's tracker, as spawned children do
        from multiprocessing import resource_tracker
        resource_tracker._resource_tracker._fd = tracker_fd
    sys.exit(serve(cmd_fd, event_fd))


def serve(cmd_fd: int, event_fd: int, inherited=None) -> int:
    """The node's life: wait for its configuration, keep workers, clean up; exit code.

    ``inherited`` is set when this process was forked from the driver (fork
    semantics): the initializer and the driver's signal handlers, in memory.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_process_name(NODE_PROCESS_NAME)
    os.set_blocking(cmd_fd, False)
    cmd = PipeReader(cmd_fd)
    settings = _read_settings(cmd)
    multiprocessing.current_process().authkey = settings["authkey"]
    node = Node(settings, cmd, event_fd, inherited)
    # Before the first worker: from now on what workers leave comes to us, not init.
    node.adopts_orphans = set_child_subreaper()
    os.set_blocking(node.wakeup_w, False)
    signal.set_wakeup_fd(node.wakeup_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # A worker starting a task with a memory_limit: look at it now (enforce_memory).
    signal.signal(MEMORY_WATCH_SIGNAL, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: node.begin_stop(signal.SIGTERM))
    code = node.run()
    try:
        cmd.read()
    except Exception:  # noqa: BLE001 - a corrupt pipe: the driver is gone all the same
        cmd.closed = True
    if cmd.closed:  # the driver went away (maybe while we stopped): nobody removes its files
        shutil.rmtree(settings["run_dir"], ignore_errors=True)
    # Every worker is gone: nothing of the session's store is written any more.
    store = settings["store"]
    segments.remove_files(store.dirs, store.session + "-")
    shared.remove_mirrors(store.session)
    return code


def serve_forked(cmd_fd: int, event_fd: int, inherited: dict) -> int:
    """Entry point of a node forked from the driver (fork semantics); its exit code.

    The driver's memory came along, but none of its threads: this process
    runs only the code below, in a session of its own (a terminal's Ctrl-C
    is the driver's). The driver's Python signal handlers are set aside for
    the workers; the garbage collector leaves the inherited objects alone,
    so their pages stay shared with the driver.
    """
    os.setsid()
    signal.set_wakeup_fd(-1)
    handlers = {}
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (ValueError, OSError):
            continue
        if callable(handler) and signum not in (signal.SIGINT, signal.SIGCHLD):
            handlers[signum] = handler
            signal.signal(signum, signal.SIG_DFL)
    inherited["signal_handlers"] = handlers
    gc.disable()
    gc.freeze()
    return serve(cmd_fd, event_fd, inherited)


def _read_settings(reader: PipeReader) -> dict:
    """Wait for NODE_CONFIG; what follows it stays in ``reader`` for the main loop."""
    poller = select.poll()
    poller.register(reader.fd, select.POLLIN)
    deadline = time.monotonic() + config.START_TIMEOUT
    while time.monotonic() < deadline:
        poller.poll(1000)
        if reader.next_message_is(MessageType.NODE_CONFIG):
            kind, _ident, body = reader.pop()
            return serialize.loads(body)
        if reader.closed:
            break
    sys.exit(1)


def _kill(pid: int) -> None:
    """SIGKILL a worker (the slot says why first): our unreaped child, so the pid is its own."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
