"""Placement: which worker gets the next ready task, and how many it may hold.

Each worker holds a short queue so that round trips overlap with work. How
short is measured in estimated seconds, per function: once the owner has
seen how long a function runs, a worker may hold about
``config.QUEUED_WORK_TARGET`` seconds of work (so no-ops queue up to
``MAX_QUEUE_DEPTH`` deep, and nothing waits behind a one-second task). That
keeps throughput for tiny tasks, fair balancing for long ones, and, as in
the stdlib, calls behind a busy worker still pending and cancellable.
Among the workers with room, the least loaded wins. All state here belongs
to the owner's I/O thread.
"""

from __future__ import annotations

import collections

from .. import config

#: Seconds assumed for a function never timed: long enough that nothing is
#: queued behind it until its first result says otherwise.
UNKNOWN_RUN_TIME = 1.0


class WorkerSlot:
    """What the owner knows of one worker process."""

    __slots__ = ("worker_id", "routing_id", "pid", "inflight", "quota",
                 "functions", "alive", "backlog", "progress_at", "link", "frames", "lent")

    def __init__(self, worker_id: int, routing_id: bytes, pid: int, tasks_left: int, link=None):
        self.worker_id = worker_id
        self.routing_id = routing_id
        # How the owner reaches it: the local node's ipc socket, or a remote node's link.
        self.link = link
        self.pid = pid
        self.inflight: collections.deque = collections.deque()  # tasks, in the order sent
        # Tasks it may still be sent (max_tasks_per_child), or None: unlimited.
        self.quota = tasks_left or None
        # Function ids it has cached, oldest first (mirrors the worker's LRU).
        self.functions: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.alive = True
        self.backlog = 0.0  # estimated seconds of the tasks in flight
        self.progress_at = 0.0  # when its current task became the head of its queue
        # Nested ownership (core.relay): the tasks blocked on futures they own, oldest
        # first, as ((task id, attempt), {awaited}); and the task lent to it (0: none).
        self.frames: list = []
        self.lent = 0


class Scheduler:
    def __init__(self):
        self.workers: dict[int, WorkerSlot] = {}
        self.run_time: dict[bytes, float] = {}  # fn_id -> moving average, seconds

    def estimate(self, fn_id: bytes) -> float:
        return self.run_time.get(fn_id, UNKNOWN_RUN_TIME)

    def pick(self, estimate: float, now: float, held: dict | None = None,
             links=None) -> WorkerSlot | None:
        """The worker that may take a task of ``estimate`` seconds now: least loaded, or
        with ``held`` (bytes of the task's stored pieces per host), on the host holding
        the most of them, then least loaded (core.directory: the rest is pulled).

        ``links``: only workers of these nodes (where a task's resources fit).

        ``links``: only workers of these nodes (where a task's resources fit).

        An idle worker always may. A busy one only while its queue stays
        within ``QUEUED_WORK_TARGET`` seconds of estimated work, and while its
        current task has not overstayed its estimate: calls queued behind a
        task that turns out slow could not be cancelled or run elsewhere.
        """
        target = config.QUEUED_WORK_TARGET
        limit = config.MAX_QUEUE_DEPTH
        best = None
        best_bytes = -1
        for worker in self.workers.values():
            if not worker.alive or worker.frames or (worker.quota is not None
                                                     and worker.quota <= 0):
                continue  # (a blocked worker only runs what it owns: core.relay)
            if links is not None and worker.link not in links:
                continue
            inflight = worker.inflight
            if inflight:
                if worker.backlog + estimate > target or len(inflight) > limit:
                    continue
                if now - worker.progress_at > target + 4 * inflight[0].estimate:
                    continue
            if held is not None:
                link = worker.link
                here = held.get(link.index if link.remote else -1, 0)
                if here > best_bytes or (here == best_bytes and worker.backlog < best.backlog):
                    best, best_bytes = worker, here
                continue
            if best is None or worker.backlog < best.backlog:
                best = worker
                if not inflight:
                    break
        return best

    def record(self, fn_id: bytes, seconds: float) -> None:
        previous = self.run_time.get(fn_id)
        self.run_time[fn_id] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def has_capacity(self) -> bool:
        return any(w.alive for w in self.workers.values())
