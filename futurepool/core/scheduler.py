"""Placement: which worker gets the next ready task, and how many it may hold.

Each worker holds a short queue so that round trips overlap with work. How
short adapts per function: once the owner has seen how long a function runs,
a worker may hold about ``config.QUEUED_WORK_TARGET`` seconds of it (so a
no-op gets up to ``MAX_QUEUE_DEPTH`` queued and a one-second task none
beyond the running one), which keeps both throughput for tiny tasks and
fair balancing for long ones. Among the workers with room, the least loaded
wins. All state here belongs to the owner's I/O thread.
"""

from __future__ import annotations

import collections

from .. import config


class WorkerSlot:
    """What the owner knows of one worker process."""

    __slots__ = ("worker_id", "routing_id", "pid", "inflight", "quota",
                 "functions", "alive")

    def __init__(self, worker_id: int, routing_id: bytes, pid: int, tasks_left: int):
        self.worker_id = worker_id
        self.routing_id = routing_id
        self.pid = pid
        self.inflight: collections.deque = collections.deque()  # tasks, in the order sent
        # Tasks it may still be sent (max_tasks_per_child), or None: unlimited.
        self.quota = tasks_left or None
        # Function ids it has cached, oldest first (mirrors the worker's LRU).
        self.functions: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.alive = True


class Scheduler:
    def __init__(self):
        self.workers: dict[int, WorkerSlot] = {}
        self.run_time: dict[bytes, float] = {}  # fn_id -> moving average, seconds

    def depth_for(self, fn_id: bytes) -> int:
        """Tasks of this function a worker may hold, the running one included."""
        seconds = self.run_time.get(fn_id)
        if seconds is None:
            return 1 + config.INITIAL_QUEUE_DEPTH
        extra = int(config.QUEUED_WORK_TARGET / max(seconds, 1e-6))
        return 1 + max(0, min(config.MAX_QUEUE_DEPTH, extra))

    def pick(self, fn_id: bytes) -> WorkerSlot | None:
        limit = self.depth_for(fn_id)
        best = None
        for worker in self.workers.values():
            load = len(worker.inflight)
            if not worker.alive or load >= limit:
                continue
            if worker.quota is not None and worker.quota <= 0:
                continue
            if best is None or load < len(best.inflight):
                best = worker
                if load == 0:
                    break
        return best

    def record(self, fn_id: bytes, seconds: float) -> None:
        previous = self.run_time.get(fn_id)
        self.run_time[fn_id] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def has_capacity(self) -> bool:
        return any(w.alive for w in self.workers.values())
