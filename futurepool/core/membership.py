"""Membership: what the owner does as workers, nodes and remote hosts come and go.

::

    local node ── event pipe ───┐
    core.head (remote nodes) ───┼─► Membership (owner I/O thread)
    the owner: READY,           │    ├─ scheduler.workers: a WorkerSlot per READY worker
     START_FAILED, INIT_FAILED ─┘    ├─ executor._processes: a WorkerProcess per local pid
                                     ├─ a dead worker's tasks, after a grace: requeued,
                                     │   retried, or failed (WorkerCrashedError,
                                     │   TaskTimeoutError, TaskMemoryError)
                                     └─ the local node: restarted, or stopped at close

A worker arrives when it says READY (a :class:`WorkerSlot` for the scheduler);
a local one's process is announced by its node first (WORKER_STARTED, for
``executor._processes``). A worker leaves when its node reports its exit
(WORKER_EXITED, with what its shared slot said it ran), when the local node
itself dies (restarted up to three times), or when its remote host leaves
(LEAVE: it drains; what has not started runs elsewhere) or is lost (silent
past its deadline). Results a dead worker sent just before dying may still
be in flight, so its tasks are settled ``config.DEATH_GRACE`` later
(:meth:`Membership._bury`): the running one is retried or failed with the
cause, the ones it had not started are requeued. A worker that could not
import the main script, or whose initializer failed, breaks the pool.

Who calls: the owner (its poll loop, for the node's event pipe; its message
handler, for READY and start failures; ``_close``, to stop the node) and
``core.head`` (remote nodes joining, leaving, lost, and their workers'
exits). Everything here runs on the owner's I/O thread, and every piece of
state it touches is the owner's (task table, ready queue, scheduler, node)
except the two counters below, which are this object's and that thread's
alone. ``executor._processes`` is shared with user threads under
``owner.processes_changed``.
"""

from __future__ import annotations

import os
import time
from multiprocessing import resource_tracker

import zmq

from .. import config
from ..errors import InitializerError, TaskMemoryError, TaskTimeoutError, WorkerCrashedError
from ..protocol.framing import pack_header
from ..protocol.messages import MessageType
from ..store import segments
from .calls import Task
from .local_node import LocalNode
from .processes import (
    EXIT_INITIALIZER_FAILED,
    EXIT_START_FAILED,
    INITIALIZING,
    INTERRUPT_MEMORY,
    INTERRUPT_TIMEOUT,
    WorkerProcess,
)
from .scheduler import WorkerSlot

_HOST = os.uname().nodename


class Membership:
    """The owner's workers and nodes arriving and leaving; see the module docstring."""

    def __init__(self, owner):
        self.owner = owner
        # Workers in a row that died before saying READY (the pool breaks at
        # config.MAX_START_FAILURES with no worker left), and local nodes started
        # after the first died (worker ids of the n-th start at n << 20).
        self.start_failures = 0
        self.node_restarts = 0

    # -- local workers and their node ------------------------------------------

    def configure_node(self) -> None:
        """The node waits for this: the socket is bound, workers may dial it."""
        owner = self.owner
        owner.poller.register(owner.node.event_fd, zmq.POLLIN)
        # Worker ids name sockets and segments: a restarted node must not reuse any.
        owner.node.configure({**owner.node_settings, "workers": owner.requested,
                              "first_worker_id": self.node_restarts << 20})

    def worker_ready(self, link, routing_id: bytes, worker_id: int, pid: int,
                     tasks_left: int) -> None:
        """A worker said READY through ``link``: the scheduler may send it tasks."""
        owner = self.owner
        slot = WorkerSlot(worker_id, routing_id, pid, tasks_left, link)
        if not link.remote:
            owner.by_routing[routing_id] = slot
        owner.scheduler.workers[worker_id] = slot
        self.start_failures = 0

    def read_node_events(self) -> None:
        """What the local node reported: workers started and exited, or its own death."""
        owner = self.owner
        for kind, body in owner.node.read_events():
            if kind == MessageType.WORKER_STARTED:
                self.worker_started(*body)
            elif kind == MessageType.WORKER_EXITED:
                self.worker_exited(*body)
        if owner.node.gone:
            self._node_died()

    def worker_started(self, worker_id: int, pid: int) -> None:
        """A local worker's process is up: it joins ``executor._processes``."""
        owner = self.owner
        name = f"{owner.node_settings['process_name']}-{worker_id + 1}"
        with owner.processes_changed:
            owner.processes[pid] = WorkerProcess(worker_id, pid, name)
            owner.processes_changed.notify_all()

    def process_gone(self, pid, exitcode, signal_name, worker_id=None) -> None:
        """A local worker's process ended: its handle in ``executor._processes`` learns how."""
        owner = self.owner
        with owner.processes_changed:
            process = owner.processes.get(pid)
            if process is not None and worker_id in (None, process.worker_id):
                del owner.processes[pid]
                process._exited(exitcode, signal_name)
                owner.processes_changed.notify_all()

    def start_failed(self, worker_id: int, pid, exc: BaseException) -> None:
        """A worker could not import the main script (spawn semantics): the pool is broken."""
        owner = self.owner
        if owner.broken is not None:
            return
        error = WorkerCrashedError(
            "starting a worker", exitcode=EXIT_START_FAILED,
            detail=f"Worker {worker_id} could not start: importing the main script as"
                   f" __mp_main__, as workers of the '{owner.start_method}' start method do,"
                   f" raised {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        owner._break(error)

    def initializer_failed(self, worker_id: int, exc: BaseException) -> None:
        """The pool's initializer raised in a worker: the pool is broken, as the stdlib's."""
        owner = self.owner
        if owner.broken is not None:
            return
        error = InitializerError(
            f"The pool's initializer {owner.initializer_name} failed in worker {worker_id}"
            f" with {type(exc).__name__}: {exc}. As with the stdlib's ProcessPoolExecutor, a"
            " pool whose initializer fails cannot run tasks: fix the initializer and create a"
            " new executor.")
        error.__cause__ = exc
        owner._break(error)

    def worker_exited(self, worker_id, pid, exitcode, signal_name, running_id=None,
                      running_attempt=0, interrupt=0, peak=0, detail="") -> None:
        """A worker died; ``running_id`` is what its slot said it ran (None: unknown).

        ``interrupt``: why that task was being interrupted (processes.INTERRUPT_*):
        its worker killed itself because the task outlived the grace, or was
        killed past its memory limit (``peak``: the bytes it was seen to hold).
        """
        owner = self.owner
        self.process_gone(pid, exitcode, signal_name, worker_id)
        slot = owner.scheduler.workers.get(worker_id)
        if exitcode == EXIT_START_FAILED:
            # Its START_FAILED message, with the real exception, may still be in flight.
            owner._add_timer(config.DEATH_GRACE, lambda: self.start_failed(
                worker_id, pid, RuntimeError("the worker exited while importing the main"
                                             " script")))
            return
        if exitcode == EXIT_INITIALIZER_FAILED or running_id == INITIALIZING:
            how = "failed" if exitcode == EXIT_INITIALIZER_FAILED else \
                f"ended its process with {signal_name or f'EXIT({exitcode})'}"
            # Its INIT_FAILED message, with the real exception, may still be in flight.
            owner._add_timer(config.DEATH_GRACE, lambda: self.initializer_failed(
                worker_id, RuntimeError(f"the initializer {how}")))
            return
        if slot is None:  # died before saying READY
            self.start_failures += 1
            hopeless = self.start_failures >= config.MAX_START_FAILURES
            if hopeless and not owner.scheduler.has_capacity():
                owner._break(WorkerCrashedError(
                    "starting a worker", worker_id, pid, _HOST, exitcode, signal_name,
                    detail=f"{self.start_failures} workers in a row died before they could take"
                           " a task; the pool's initializer, if any, is the likely cause. See"
                           " their stderr above."))
            return
        slot.alive = False
        # Results it sent just before dying may still be in flight: wait a moment.
        owner._add_timer(config.DEATH_GRACE, lambda: self._bury(
            slot, exitcode, signal_name, detail, running_id, running_attempt, interrupt, peak))

    def _bury(self, slot: WorkerSlot, exitcode, signal_name, detail, running_id,
              running_attempt, interrupt=0, peak=0) -> None:
        owner = self.owner
        if owner.scheduler.workers.get(slot.worker_id) is slot:
            del owner.scheduler.workers[slot.worker_id]
        if owner.by_routing.get(slot.routing_id) is slot:
            del owner.by_routing[slot.routing_id]
        owner.frees.pop(slot, None)
        host = slot.link.host
        if not slot.link.remote:
            # What it kept for reuse or was writing when it died; stored results
            # the owner holds stay readable (the files outlive their writer).
            segments.remove_files(owner.store.settings.dirs,
                                  f"{owner.store.settings.session}-{slot.worker_id}-",
                                  keep=owner.store.live_names())
        blocked = owner.relay.blocked_tasks(slot)  # running too, under the last one
        owner.relay.worker_gone(slot)
        if not slot.inflight:
            return
        if owner.terminating:  # stopped on purpose: nothing is retried or moved
            detail = "The workers were stopped by terminate_workers(), kill_workers() or Ctrl-C."
            for task in slot.inflight:
                owner._settle_exception(task, WorkerCrashedError(
                    task.describe(), slot.worker_id, slot.pid, host, exitcode, signal_name,
                    detail=detail))
            slot.inflight.clear()
            return
        if running_id is None:  # the node died too: blame the oldest task sent
            running = slot.inflight.popleft()
        else:
            running = next((t for t in slot.inflight
                            if t.task_id == running_id and t.attempt == running_attempt), None)
            if running is not None:
                slot.inflight.remove(running)
        crashed = [task for task in slot.inflight if (task.task_id, task.attempt) in blocked]
        for task in crashed:
            slot.inflight.remove(task)
        # Never started (or finished, result lost with the worker): run them elsewhere.
        owner._requeue(slot, len(slot.inflight))
        for task in crashed:
            self._crashed(task, slot, exitcode, signal_name, detail)
        if running is None:
            return
        if running.future.done():  # stopped by Future.stop(): it is cancelled already
            owner.tasks.pop(running.task_id, None)
            return
        if interrupt == INTERRUPT_TIMEOUT:  # killed past its timeout's grace
            if not owner._retry_timeout(running):
                owner._settle_exception(running, TaskTimeoutError(
                    running.describe(), running.timeout, killed=True))
            return
        if interrupt == INTERRUPT_MEMORY:  # killed past its memory_limit
            if not owner._retry_timeout(running):
                owner._settle_exception(running, TaskMemoryError(
                    running.describe(), running.memory_limit, peak, host))
            return
        self._crashed(running, slot, exitcode, signal_name, detail)

    def _crashed(self, task: Task, slot: WorkerSlot, exitcode, signal_name, detail) -> None:
        """``task`` was running in ``slot``'s worker, which died: retry it, or fail it."""
        owner = self.owner
        if task.future.done():
            owner.tasks.pop(task.task_id, None)
            return
        task.deaths += 1
        if task.retries_left > 0:
            task.retries_left -= 1
            task.attempt += 1
            owner.ready.appendleft(task)
            return
        owner._settle_exception(task, WorkerCrashedError(
            task.describe(), slot.worker_id, slot.pid, slot.link.host, exitcode, signal_name,
            deaths=task.deaths, detail=detail))

    def _node_died(self) -> None:
        """The local node process died: its workers with it; a new node, up to 3 times."""
        owner = self.owner
        owner.poller.unregister(owner.node.event_fd)
        owner.node.close_events()
        owner.node.close_commands()
        code = owner.node.process.wait()
        for pid in list(owner.processes):
            self.process_gone(pid, None, "SIGKILL")
        for slot in list(owner.scheduler.workers.values()):
            self.worker_exited(slot.worker_id, slot.pid, None, "SIGKILL",
                               detail=f"Its node process (pid {owner.node.pid}) died"
                                      f" ({code}), taking its workers with it.")
        if owner.terminating or (owner.stopping and not owner.tasks):
            return
        self.node_restarts += 1
        if self.node_restarts > 3:
            owner._break(WorkerCrashedError("the pool", detail="The node process died 4 times."))
        else:
            self._restart_node()

    def _restart_node(self) -> None:
        """A new node after the last one died (forked from here under fork semantics)."""
        owner = self.owner
        owner.node = LocalNode(owner.semantics, owner.inherited_fds, owner.inherited)
        owner.node.start(resource_tracker._resource_tracker._fd)
        self.configure_node()

    # -- remote nodes (core.head calls these) ---------------------------------

    def node_joined(self, node) -> None:
        """A remote node joined (core.head); its workers say READY by themselves."""
        self._count_workers()

    def _count_workers(self) -> None:
        """``executor._max_workers``: this host's workers and every joined node's."""
        owner = self.owner
        executor = owner.executor_ref()
        if executor is not None and owner.head is not None:
            executor._max_workers = owner.max_workers + owner.head.slots

    def _remote_slots(self, node) -> list[WorkerSlot]:
        return [slot for slot in self.owner.scheduler.workers.values() if slot.link is node]

    def node_leaving(self, node) -> None:
        """It is draining (SIGTERM): nothing new for it; what has not started runs elsewhere."""
        for slot in self._remote_slots(node):
            slot.alive = False
            self._hand_back(slot, keep_running=True)
        self._count_workers()
        self.release_if_drained(node)

    def _hand_back(self, slot: WorkerSlot, keep_running: bool) -> None:
        """Queue ``slot``'s tasks elsewhere, as new attempts (a late result is dropped)."""
        owner = self.owner
        keep = 1 if keep_running and slot.inflight else 0
        while len(slot.inflight) > keep:
            task = slot.inflight.pop()
            slot.backlog -= task.estimate
            task.attempt += 1
            owner.ready.appendleft(task)

    def release_if_drained(self, node) -> None:
        """A leaving node whose workers have nothing left in flight may go (core.head)."""
        if node.leaving and not any(slot.inflight for slot in self._remote_slots(node)):
            self.owner.head.release(node)

    def node_lost(self, node, why: str) -> None:
        """Silent past its deadline, or gone: its workers are dead to us."""
        owner = self.owner
        detail = f"It ran on {node.describe()}, which was lost: {why}."
        owner.objects.host_lost(node.index, node.describe())
        for slot in self._remote_slots(node):
            if node.leaving:  # it said so first: nothing of it counts as a crash
                self._hand_back(slot, keep_running=False)
            self.worker_exited(slot.worker_id, slot.pid, None, None, None, 0, detail=detail)
        self._count_workers()

    # -- closing ----------------------------------------------------------------

    def stop_node(self) -> None:
        """Let the workers leave by themselves, then the node; kill what lingers.

        Workers exit cleanly on STOP (flushing, e.g., multiprocessing queues
        that tasks wrote to); a worker that says READY only now is told too.
        """
        owner = self.owner
        if owner.sock is not None:
            for slot in owner.by_routing.values():
                self._send_stop(slot.routing_id)
        node = owner.node
        node.stop()
        deadline = time.monotonic() + config.SHUTDOWN_TIMEOUT
        while owner.sock is not None and node.process.poll() is None \
                and time.monotonic() < deadline:
            if owner.sock.poll(10):
                try:
                    frames = owner.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                if len(frames) >= 2 and frames[0] not in owner.by_routing:
                    owner.by_routing[frames[0]] = None
                    self._send_stop(frames[0])
        node.close_commands()
        node.wait(config.SHUTDOWN_TIMEOUT + 1)
        # The node reported every exit before it left: let the process handles know.
        if not node.gone:
            for kind, body in node.read_events():
                if kind == MessageType.WORKER_EXITED:
                    self.process_gone(*body[1:4])
        for pid in list(owner.processes):
            self.process_gone(pid, None, None)

    def _send_stop(self, routing_id: bytes) -> None:
        try:
            self.owner.sock.send_multipart([routing_id, pack_header(MessageType.STOP)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # already gone
