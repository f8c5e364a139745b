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
stuck in a task. The socket (``core.worker_link``: a DEALER to the owner,
and over TCP the channel that numbers and resends messages) and the outbox
are shared by the threads under ``self.lock``.

Interrupting a task (a ``timeout`` from ``options()``, or ``Future.stop()``)::

    main thread                     watchdog thread               node
    ───────────                     ───────────────               ────
    run_task: slot = (id, attempt)  every _WATCH_SECONDS while a
      setitimer(timeout) ─┐         task runs, under self.lock:
      fn(*args) ◄─ SIGALRM┤           read what arrived: INTERRUPT
         handler raises   │           for the running task ─► pthread_kill(main, SIGALRM)
         TaskTimeoutError │           anything else ─► inbox (main takes it, in order)
         or CancelledError│         past deadline + INTERRUPT_GRACE and
      report TIMED_OUT /  │           still the same task: slot.interrupt = why,
      STOPPED             │           SIGKILL itself ──────────────► reaps, reports the
                          └ one raise per task                       slot: owner fails the
                                                                     future as a timeout

The timer lives in the worker (``signal.setitimer``), so a limit works the
same on every host and counts from the moment the function is called. The
signal interrupts a blocking system call too (``time.sleep``, a read): the
handler raises, so the call fails with the exception (PEP 475) and the task's
``finally`` blocks run. The handler raises once per task; a task that catches
the exception and carries on, or that is stuck in C code that never returns
to the interpreter (but releases the GIL), is ended by the watchdog: it marks
the shared slot with the reason and kills its own process, the node reports
the death with the slot, and the owner fails the future with
``TaskTimeoutError`` (or leaves it cancelled, for a stop) instead of
``WorkerCrashedError``; the node starts a replacement. A stop for a task still
queued here drops it unstarted. C code that holds the GIL keeps both threads
of ours out until it returns: for a timeout, the node is the backstop (the
slot tells it when the task must be gone, and it kills the worker a
heartbeat after the watchdog would have); a stop waits for the C call.
Workers own SIGALRM: a task that sets its own handler (``signal.alarm``)
disables its timeout while that handler is in place.

A task with a ``memory_limit`` is watched by the same watchdog: every
``_WATCH_SECONDS`` it reads the worker's resident memory (``/proc/self/statm``,
a few microseconds) and, past the limit, marks the slot ``INTERRUPT_MEMORY``
with the peak it saw and kills its own process; no interrupt first (a task
that has to free memory in ``finally`` blocks would only grow meanwhile).
The node watches too, for C code that holds the GIL (core.node). A task
given GPUs (``resources={"gpu": n}``) runs with ``CUDA_VISIBLE_DEVICES``
naming them, restored when it ends (core.resources.TaskLimits).
"""

from __future__ import annotations

import collections
import faulthandler
import logging
import multiprocessing.util
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import CancelledError

import zmq

from .. import config
from ..errors import ObjectStoreFullError, ResultPicklingError, TaskTimeoutError
from ..protocol.messages import MessageType, ResultStatus
from ..store import serialize, shared
from ..store.objects import WorkerStore
from ..store.segments import Location
from . import nested
from .output import OutputCapture
from .processes import (
    EXIT_INITIALIZER_FAILED,
    EXIT_START_FAILED,
    INITIALIZING,
    INTERRUPT_MEMORY,
    INTERRUPT_STOP,
    INTERRUPT_TIMEOUT,
    MEMORY_SLOT,
    MEMORY_SLOT_OFFSET,
    MEMORY_WATCH_SIGNAL,
    RUNNING_SLOT,
    SLOT_INTERRUPT,
    SLOT_INTERRUPT_OFFSET,
    SLOT_KILL_AT,
    SLOT_KILL_AT_OFFSET,
)
from .resources import TaskLimits
from .startup import importing, prepare_main
from .worker_link import WorkerLink

# The stdlib logs initializer failures here; code (and CPython's tests) watch it.
LOGGER = logging.getLogger("concurrent.futures")

_HOLD_SECONDS = 0.001
_QUICK_SECONDS = 0.0001
_FUNCTION_CACHE_SIZE = 512
#: How often an idle worker holding mappings checks for unlinked ones.
_IDLE_CHECK_MS = 200
#: How often the watchdog looks for an INTERRUPT, and at a deadline, while a task runs.
_WATCH_SECONDS = 0.01
#: How often an idle watchdog looks whether a task started (a stop's extra delay).
_WATCH_IDLE_SECONDS = 0.05
#: Tasks one worker may have blocked on its stack, each running a lent task on top; a
#: task blocked deeper waits without lending its worker (others run what it awaits).
_MAX_LEND_DEPTH = 400
#: Python frames one level of lending adds (measured: 8), with room for the task's own.
_FRAMES_PER_LEND = 24
#: The interval timer fires on time; the monotonic clock may read a hair earlier.
_CLOCK_SLACK = 0.005


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
        shared.set_mirror_stem(self.store.settings.session)
        # Tasks that submit tasks own their futures here (core.nested).
        self.nested = nested.install(self)
        self.lending = False  # the main thread waits in lend(): it reads the socket
        self.deferred: list = []  # messages lend() leaves for the serve loop (STOP)
        self.stops: set = set()  # blocked tasks below the running one that were stopped
        # The blocked tasks under the running one, oldest first: [(id, attempt), kill_at],
        # and those whose timeout passed while a task above them ran.
        self.frames: list = []
        self.recursion_limit = sys.getrecursionlimit()  # the task's own, before lending
        self.expired: set = set()
        # The socket to the owner (core.worker_link), shared under self.lock.
        self.link = WorkerLink(worker_id, settings, self.lock)
        # On a remote host: what the worker prints goes to the driver (core.output).
        self.capture = OutputCapture(self._send_output) if settings.get("forward_output") \
            else None
        self.flusher = threading.Thread(target=self._flush_late, name="futurepool-flusher",
                                        daemon=True)
        self.flusher.start()
        # Interrupts (module docstring). The main thread writes the per-task state;
        # the watchdog and the SIGALRM handler only read it.
        # Tasks are being served: the watchdog watches. Idle, it looks every
        # _WATCH_IDLE_SECONDS; ``wakeup`` only hurries it at close.
        self.serving = False
        self.wakeup = threading.Event()
        self.current = None   # (task_id, attempt) inside run_task
        self.in_call = False  # inside the task's function: the handler may raise
        self.raised = False   # the handler raised into this task already
        self.deadline = 0.0   # monotonic time the running task's timeout falls due
        self.interrupted = 0  # INTERRUPT_* the running task got, 0: none
        self.stopping = None  # (task_id, attempt) the watchdog was told to stop
        self.kill_at = None   # (task_id, attempt, why, monotonic time)
        self.limit = (0, None, 0.0)  # (task_id, fn, timeout): what TaskTimeoutError names
        self.timer_armed = False  # the interval timer may still fire (see _run)
        self.limits = TaskLimits()  # the running task's memory_limit and GPUs
        self.node_pid = os.getppid()
        self.main_thread = threading.get_ident()
        signal.signal(signal.SIGALRM, self._on_alarm)
        self.watchdog = threading.Thread(target=self._watch, name="futurepool-watchdog",
                                         daemon=True)
        self.watchdog.start()

    def _send_output(self, stream: int, data: bytes) -> None:
        with self.lock:
            self.link.send_locked(MessageType.OUTPUT, stream, data)

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
        self.closing = True
        self.holding.set()
        self.wakeup.set()
        self.flusher.join()
        self.watchdog.join(1.0)
        self.link.close()
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
        RUNNING_SLOT.pack_into(self.slot, 0, INITIALIZING, 0, 0, 0.0)
        try:
            prepare_main(data)
        except BaseException as exc:  # noqa: BLE001 - SystemExit in the script too
            traceback.print_exc()
            self._send_failure(MessageType.START_FAILED, exc)
            return False
        RUNNING_SLOT.pack_into(self.slot, 0, 0, 0, 0, 0.0)
        return True

    def _send_failure(self, kind: MessageType, exc: BaseException) -> None:
        with self.lock:
            self.link.send_locked(kind, 0, serialize.dumps_exception(exc))

    def initialize(self, inherited) -> bool:
        """Run the pool's initializer: from memory (fork semantics) or unpickled (spawn)."""
        blob = self.settings.get("initializer")
        if blob is None and (inherited is None or inherited.get("initializer") is None):
            return True
        RUNNING_SLOT.pack_into(self.slot, 0, INITIALIZING, 0, 0, 0.0)
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
        RUNNING_SLOT.pack_into(self.slot, 0, 0, 0, 0, 0.0)
        return True

    # -- tasks ----------------------------------------------------------------

    def run_task(self, item) -> tuple:
        task_id, attempt, fn_id, fn_bytes, args_bytes, deps, timeout, limits = item
        RUNNING_SLOT.pack_into(self.slot, 0, task_id, attempt, 0, 0.0)
        self.raised = False
        self.interrupted = 0
        self.current = (task_id, attempt)
        if limits is not None:  # memory_limit, GPUs (core.resources)
            self.limits.begin(self.current, limits)
            if limits[0]:  # the node watches too: wake it (core.node.enforce_memory)
                MEMORY_SLOT.pack_into(self.slot, MEMORY_SLOT_OFFSET, limits[0], 0)
                if os.getppid() == self.node_pid:  # (not whoever adopted us if it died)
                    os.kill(self.node_pid, MEMORY_WATCH_SIGNAL)
        shared.begin_task()
        try:
            outcome, keep = self._run(task_id, attempt, fn_id, fn_bytes, args_bytes, deps,
                                      timeout)
            return self._with_write_back(outcome), keep
        finally:
            if limits is not None:
                self.limits.end(limits)
                MEMORY_SLOT.pack_into(self.slot, MEMORY_SLOT_OFFSET, 0, 0)
            self.current = None
            self.kill_at = None
            RUNNING_SLOT.pack_into(self.slot, 0, 0, 0, 0, 0.0)

    def _with_write_back(self, outcome: tuple) -> tuple:
        """The outcome, with what the task changed in mirrors of another host's shared
        memory (store.shared) when it had any: the owner writes it back first."""
        ran = outcome[2] not in (ResultStatus.ARGS_FAILED, ResultStatus.MISSING_FUNCTION)
        try:
            patches = shared.end_task(ran, lambda p: serialize.dumps_result(p, self.store))
            return outcome if patches is None else (*outcome, patches)
        except Exception as exc:  # noqa: BLE001 - the task's future says so; we go on
            if outcome[2] != ResultStatus.OK:
                return outcome
            if type(outcome[3]) is not bytes:  # its result's pieces will not be sent
                inband, pieces = outcome[3]
                for piece in (inband, *pieces) if type(inband) is not bytes else pieces:
                    self.store.discard(piece)
            return (outcome[0], outcome[1], ResultStatus.ERROR, serialize.dumps_exception(
                RuntimeError(f"the changes task {outcome[0]} made to shared memory could not"
                             f" be sent back: {type(exc).__name__}: {exc}")), outcome[4])

    def _run(self, task_id, attempt, fn_id, fn_bytes, args_bytes, deps, timeout) -> tuple:
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
        if timeout:
            self.deadline = time.monotonic() + timeout
            self.kill_at = (task_id, attempt, INTERRUPT_TIMEOUT,
                            self.deadline + config.INTERRUPT_GRACE)
            # The node's backstop, a heartbeat later than the watchdog (node.py).
            SLOT_KILL_AT.pack_into(self.slot, SLOT_KILL_AT_OFFSET,
                                   self.kill_at[3] + config.HEARTBEAT_INTERVAL)
            self.limit = (task_id, fn, timeout)
        elif self.timer_armed:  # an earlier task's timer must not fire into this one
            self._disarm()
        if self.interrupted:  # stopped while its arguments were loaded: do not call it
            return self._interrupted(task_id, attempt, None, 0.0), (args, kwargs)
        try:
            self.in_call = True  # before the timer: the handler raises in here only
            if timeout:
                # Not disarmed when the call returns (a system call per task saved):
                # the next task re-arms or disarms it, going idle disarms it, and a
                # late tick finds this task ended and does nothing (_on_alarm).
                signal.setitimer(signal.ITIMER_REAL, timeout)
                self.timer_armed = True
            result = fn(*args, **kwargs)
            self.in_call = False
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in a task is its result
            self.in_call = False
            took = time.perf_counter() - start
            if self.interrupted:
                return self._interrupted(task_id, attempt, exc, took), (args, kwargs)
            return (task_id, attempt, ResultStatus.ERROR, serialize.dumps_exception(exc),
                    took), (args, kwargs)
        took = time.perf_counter() - start
        if self.interrupted:  # it caught the interrupt and returned: stopped all the same
            return self._interrupted(task_id, attempt, None, took), (args, kwargs, result)
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

    # -- interrupts (module docstring) ---------------------------------------------

    def _on_alarm(self, _signum, _frame) -> None:
        """SIGALRM, in the main thread: the timer, or the watchdog passing on a stop."""
        current = self.current
        if current is None:
            return  # between tasks: late for one that already ended
        if self.stopping == current:
            why = INTERRUPT_STOP
        elif self.kill_at is not None and time.monotonic() >= self.deadline - _CLOCK_SLACK:
            why = INTERRUPT_TIMEOUT
        else:
            return  # late for an earlier task
        if not self.interrupted:
            self.interrupted = why
            SLOT_INTERRUPT.pack_into(self.slot, SLOT_INTERRUPT_OFFSET, why)
        if self.in_call and not self.raised:
            self.raised = True
            if why == INTERRUPT_STOP:
                raise CancelledError(f"task {current[0]} was stopped by Future.stop()")
            task_id, fn, timeout = self.limit
            raise TaskTimeoutError(f"task {task_id} ({serialize.describe_callable(fn)})",
                                   timeout)

    def _disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.timer_armed = False

    def _interrupted(self, task_id, attempt, exc, took) -> tuple:
        """The outcome of an interrupted task, whatever it raised or returned."""
        if self.nested.pending:  # what it submitted stops with it
            self.nested.cancel_children((task_id, attempt))
        if self.interrupted == INTERRUPT_STOP:
            return (task_id, attempt, ResultStatus.STOPPED, b"", took)
        payload = serialize.dumps_exception(exc) if exc is not None else b""
        return (task_id, attempt, ResultStatus.TIMED_OUT, payload, took)

    def _watch(self) -> None:
        """The watchdog thread: INTERRUPT messages during a task, and the kill past a grace."""
        while not self.closing:
            if not self.serving:
                # Not woken per task (a wake-up and a GIL hand-off each): it looks
                # again soon enough for a stop or a kill.
                self.wakeup.wait(_WATCH_IDLE_SECONDS)
                continue
            time.sleep(_WATCH_SECONDS)
            if self.closing:
                return
            if self.current is None:
                continue  # between tasks the main thread reads the socket itself
            kill = self.kill_at
            if kill is not None and time.monotonic() >= kill[3] \
                    and self.current == (kill[0], kill[1]):
                # Say why in the slot first: the node reports it with the death.
                SLOT_INTERRUPT.pack_into(self.slot, SLOT_INTERRUPT_OFFSET, kill[2])
                os.kill(os.getpid(), signal.SIGKILL)
            limits = self.limits
            if limits.memory_limit and limits.over(self.current):
                # Past its memory_limit: say so in the slot (with the peak), then die.
                MEMORY_SLOT.pack_into(self.slot, MEMORY_SLOT_OFFSET, limits.memory_limit,
                                      limits.peak)
                SLOT_INTERRUPT.pack_into(self.slot, SLOT_INTERRUPT_OFFSET, INTERRUPT_MEMORY)
                os.kill(os.getpid(), signal.SIGKILL)
            if self.lending or not self.lock.acquire(timeout=_WATCH_SECONDS):
                continue  # (lending, the main thread reads the socket itself)
            nested_messages = []
            below = []
            try:
                messages = self.link.pull_locked()
                for header, frames in messages:
                    kind = header.kind
                    if kind in _NESTED_KINDS:  # other threads of the task may wait on them
                        nested_messages.append((kind, frames))
                    elif kind != MessageType.INTERRUPT or not self._stop_running(frames):
                        task = tuple(serialize.loads(frames[1])) \
                            if kind == MessageType.INTERRUPT else None
                        if task is not None and any(f[0] == task for f in self.frames):
                            below.append(task)  # blocked under the running task
                        else:
                            self.link.inbox.append((header, frames))
            except zmq.ZMQError:
                pass  # the socket is closing: the main thread meets it too
            finally:
                self.lock.release()
            for kind, frames in nested_messages:
                self._nested_message(kind, frames)
            for task in below:
                self._stop_below(task)
            if self.frames:
                self._expire_frames()

    def _stop_running(self, frames) -> bool:
        """An INTERRUPT: stop the running task if it is the one; whether it was."""
        task = tuple(serialize.loads(frames[1]))
        if task != self.current:
            return False
        if self.stopping != task:
            self.stopping = task
            self.kill_at = (*task, INTERRUPT_STOP, time.monotonic() + config.INTERRUPT_GRACE)
            signal.pthread_kill(self.main_thread, signal.SIGALRM)
        return True

    def _drop_queued(self, task) -> None:
        """An INTERRUPT read by the main thread: the task has not started; drop it."""
        for item in self.queue:
            if item[0] == task[0] and item[1] == task[1]:
                self.queue.remove(item)
                with self.lock:
                    if not self.outbox:
                        self.held_since = time.perf_counter()
                    self.outbox.append((task[0], task[1], ResultStatus.STOPPED, b"", 0.0))
                return

    def wake_flusher(self) -> None:
        """Something of ``nested`` is waiting to go out: the flusher sends it soon."""
        if not self.holding.is_set():
            self.holding.set()

    # -- nested ownership (core.nested) ---------------------------------------------

    def _nested_message(self, kind: MessageType, frames) -> None:
        """What the head sends us as an owner or borrower (no lock of ours held)."""
        items = serialize.loads(frames[1])
        if kind == MessageType.OUTCOMES:
            self.nested.settle(items)
        elif kind == MessageType.VALUE:
            self.nested.borrows.valued(items)
        elif kind == MessageType.GET:
            self.nested.answer(items)
        elif kind == MessageType.RELEASE:
            self.nested.released(items)
        elif kind == MessageType.OWNER_DIED:
            self.nested.borrows.owners_died(items, lambda owner: f"worker {owner}")

    def _stop_below(self, task) -> None:
        """A blocked task under the running one was stopped: it raises when it is on top
        again, and what it submitted is stopped now (which ends the tasks above it)."""
        self.stops.add(task)
        self.nested.cancel_children(task)

    def _expire_frames(self) -> None:
        """(Watchdog) a blocked task's timeout passed while a task above it runs: stop
        what it submitted; its timer fires when it is on top again (``_run_inline``)."""
        now = time.monotonic()
        for task, kill in list(self.frames):
            if kill is not None and kill[2] == INTERRUPT_TIMEOUT and task not in self.expired \
                    and now >= kill[3] - config.INTERRUPT_GRACE:
                self.expired.add(task)
                self.nested.cancel_children(task)

    def lend(self, awaited: list, done, timeout) -> bool:
        """The running task waits until ``done()``: lend this worker meanwhile.

        Tells the head (WAITING: the futures awaited, by our ids), hands back
        the tasks queued behind the blocked one (they run elsewhere), and runs
        what the head lends us (LEND: tasks this worker owns, which would
        otherwise wait) inline, in this thread, until ``done()`` or
        ``timeout``. Returns False when it cannot lend (not the task's own
        thread): the caller then waits as usual.
        """
        frame = self.current
        if frame is None or threading.get_ident() != self.main_thread \
                or len(self.frames) >= _MAX_LEND_DEPTH:
            return False
        # Each task lent runs on top of the blocked ones, in this thread's stack.
        needed = self.recursion_limit + _FRAMES_PER_LEND * (len(self.frames) + 1)
        if sys.getrecursionlimit() < needed:
            sys.setrecursionlimit(needed)
        deadline = None if timeout is None else time.monotonic() + timeout
        self.flush()  # the awaited tasks reach the head before we say we wait
        with self.lock:
            self.lending = True
            messages = self.link.pull_locked()
            returned = [(item[0], item[1]) for item in self.queue]
            self.queue.clear()
            self.link.send_locked(MessageType.WAITING, len(awaited),
                                  serialize.dumps_plain((frame, awaited, returned)))
        self.frames.append((frame, self.kill_at))
        try:
            while True:
                self._lend_messages(messages, frame)
                if done():
                    return True
                wait = 0.05
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return True
                self.flush()
                messages = self.link.receive(wait)
        finally:
            self.frames.pop()
            self.expired.discard(frame)
            with self.lock:
                self.link.send_locked(MessageType.RESUMED, 0, b"")
                self.link.inbox[:0] = self.deferred
                self.deferred = []
                self.lending = False

    def _lend_messages(self, messages, frame) -> None:
        returned = []
        for header, frames in messages:
            kind = header.kind
            if kind == MessageType.LEND:
                for item in serialize.loads(frames[1]):
                    self._run_inline(item)
            elif kind == MessageType.TASKS:  # sent before the head heard we wait
                returned.extend((item[0], item[1]) for item in serialize.loads(frames[1]))
            elif kind in _NESTED_KINDS:
                self._nested_message(kind, frames)
            elif kind == MessageType.INTERRUPT:
                task = tuple(serialize.loads(frames[1]))
                if task == frame:
                    self._stop_running(frames)  # raises CancelledError here (SIGALRM)
                elif any(f[0] == task for f in self.frames):
                    self._stop_below(task)  # a task further down our stack
            elif kind == MessageType.FREE:
                self._take(kind, frames)
            else:  # STOP: for the serve loop, once the task is done
                self.deferred.append((header, frames))
        if returned:
            with self.lock:
                self.link.send_locked(MessageType.RETURN, len(returned),
                                  serialize.dumps_plain(returned))
        if frame in self.stops:  # stopped while a task above it ran
            self.stops.discard(frame)
            self.stopping = frame
            self.interrupted = INTERRUPT_STOP
            SLOT_INTERRUPT.pack_into(self.slot, SLOT_INTERRUPT_OFFSET, INTERRUPT_STOP)
            self.raised = True
            raise CancelledError(f"task {frame[0]} was stopped by Future.stop()")
        if frame in self.expired:  # its timeout passed while a task above it ran
            self.expired.discard(frame)
            self.interrupted = INTERRUPT_TIMEOUT
            SLOT_INTERRUPT.pack_into(self.slot, SLOT_INTERRUPT_OFFSET, INTERRUPT_TIMEOUT)
            self.raised = True
            task_id, fn, timeout = self.limit
            raise TaskTimeoutError(f"task {task_id} ({serialize.describe_callable(fn)})",
                                   timeout)

    def _run_inline(self, item) -> None:
        """Run a lent task on top of the blocked one, and restore the blocked one's state."""
        limits = self.limits
        saved = (self.current, self.raised, self.interrupted, self.in_call, self.kill_at,
                 self.deadline, self.limit, self.stopping)
        saved_limits = (limits.memory_limit, limits.peak, limits.task)
        slot = RUNNING_SLOT.unpack_from(self.slot, 0)
        self.lending = False  # the watchdog reads the socket while it runs
        try:
            outcome, keep = self.run_task(item)
        finally:
            self.lending = True
            (self.current, self.raised, self.interrupted, self.in_call, self.kill_at,
             self.deadline, self.limit, self.stopping) = saved
            limits.memory_limit, limits.peak, limits.task = saved_limits
            RUNNING_SLOT.pack_into(self.slot, 0, *slot)
            if self.kill_at is not None and self.kill_at[2] == INTERRUPT_TIMEOUT \
                    and self.current not in self.expired:
                # The blocked task's own time limit runs on.
                signal.setitimer(signal.ITIMER_REAL, max(0.001, self.deadline - time.monotonic()))
                self.timer_armed = True
        with self.lock:
            if not self.outbox:
                self.held_since = time.perf_counter()
            self.outbox.append(outcome)
        self.keepalive.append(keep)
        self.flush()

    def flush(self) -> None:
        if self.capture is not None and self.outbox:
            self.capture.sync()  # what the tasks printed arrives before their results
        with self.lock:
            if self.nested.outgoing:  # what tasks submitted goes before their results
                for kind, items in self.nested.take_outgoing().items():
                    self.link.send_locked(kind, len(items), serialize.dumps_plain(items))
            if self.outbox:
                self.link.send_locked(MessageType.RESULTS, len(self.outbox),
                                  serialize.dumps_plain(self.outbox))
                self.outbox = []
            if self.link.channel is not None and self.link.channel.unacked:
                self.link.resend_locked(time.monotonic())

    def should_hold(self) -> bool:
        """Whether computed results may wait for the next queued task."""
        if not self.queue or not self.outbox:
            return False
        next_fn = self.queue[0][2]
        quick = self.run_time.get(next_fn, 1.0) < _QUICK_SECONDS
        return quick and time.perf_counter() - self.held_since < _HOLD_SECONDS

    def serve(self) -> None:
        self.nested.serving = True  # current_executor() works from now on
        tasks_left = self.settings.get("max_tasks_per_child") or 0
        link, lock = self.link, self.lock
        channel = link.channel
        with lock:
            link.send_locked(MessageType.READY, 0,
                             serialize.dumps_plain((self.worker_id, os.getpid(), tasks_left)))
        while True:
            if not self.queue:
                self.serving = False
                if self.timer_armed:
                    self._disarm()
                self.flush()
                self.keepalive.clear()
                reader = self.store.reader
                if reader.has_idle():
                    reader.release_idle()
                    # Unmap what gets unlinked meanwhile (its pages would stay allocated).
                    while reader.has_idle():
                        with lock:
                            if link.inbox or link.sock.poll(_IDLE_CHECK_MS):
                                break
                        reader.release_idle()
                if not self._accept(link.receive()):
                    return
            if self.queue:
                self.serving = True  # the watchdog notices within _WATCH_IDLE_SECONDS
            while self.queue:
                # Take what else arrived without blocking, so batches stay full.
                with lock:
                    messages = link.pull_locked()
                if messages and not self._accept(messages):
                    self.flush()
                    return
                if not self.queue:  # what was queued got stopped (INTERRUPT)
                    break
                item = self.queue.popleft()
                if channel is not None and channel.ack_pending and not self.outbox \
                        and self.run_time.get(item[2], 1.0) >= _QUICK_SECONDS:
                    with lock:  # no result will carry the ack soon: the owner would resend
                        link.send_ack_locked()
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

    def _accept(self, messages) -> bool:
        """Queue the messages' tasks; False when the owner says STOP."""
        return all([self._take(header.kind, frames) for header, frames in messages])

    def _take(self, kind: MessageType, frames) -> bool:
        if kind == MessageType.STOP:
            return False
        if kind == MessageType.TASKS or kind == MessageType.LEND:
            self.queue.extend(serialize.loads(frames[1]))
        elif kind in _NESTED_KINDS:
            self._nested_message(kind, frames)
        elif kind == MessageType.FREE:
            free = self.store.writer.free
            for location in serialize.loads(frames[1]):
                free(Location(*location))
        elif kind == MessageType.INTERRUPT:
            self._drop_queued(tuple(serialize.loads(frames[1])))
        return True


#: What the head sends this worker as the owner (or borrower) of nested futures.
_NESTED_KINDS = frozenset({MessageType.OUTCOMES, MessageType.GET, MessageType.VALUE,
                           MessageType.RELEASE, MessageType.OWNER_DIED})


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
