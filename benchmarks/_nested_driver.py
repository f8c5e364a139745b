"""Helper process of ``bench_nested.py``: a Ray or Dask driver, one per cell.

``python _nested_driver.py ray WORKERS`` runs ``ray.init(num_cpus=WORKERS)``;
``python _nested_driver.py dask WORKERS`` starts ``LocalCluster(n_workers=WORKERS,
threads_per_worker=1, processes=True)`` and a ``Client`` on it. Either prints
``{"hello": VERSION}``, then answers one JSON command per line of stdin with
one JSON line on stdout:

=====================================  ==============================================
command                                answer
=====================================  ==============================================
``{"op": "ready"}``                    once every worker ran one ``one()``, together
``{"op": "fib", "n": N}``              ``{"value": fib(N), "seconds": s}``: one task
                                       that recurses, every call a task
``{"op": "fan_out", "n": N}``          ``{"value": N, "seconds": s}``: one task that
                                       submits N children and sums their results
``{"op": "close"}``                    stops the system and exits
=====================================  ==============================================

Every command carries ``"timeout"`` (seconds), which bounds its waits; a
failure answers ``{"error": "..."}``. The benchmark kills this process, and
every process carrying its tag, when an answer does not come in time. The
script runs under whichever interpreter has the system installed (Ray's is a
venv of its own) and imports nothing of futurepool; ``_nested_tasks`` and
``_helpers`` (the loop that answers commands) come from ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import sys
import time

import _nested_tasks as tasks
from _helpers import serve


class RayDriver:
    def __init__(self, workers: int):
        import ray

        self.ray = ray
        ray.init(num_cpus=workers, include_dashboard=False, configure_logging=False,
                 log_to_driver=False, object_store_memory=100 * 1024 * 1024)
        self.workers = workers
        self.version = f"ray {ray.__version__}"

    def ready(self, timeout: float) -> None:
        one = tasks._ray()["one"]
        self.ray.get([one.remote() for _ in range(self.workers)], timeout=timeout)

    def fib(self, n: int, timeout: float) -> int:
        return self.ray.get(tasks._ray()["fib"].remote(n), timeout=timeout)

    def fan_out(self, n: int, timeout: float) -> int:
        return self.ray.get(tasks._ray()["fan_out"].remote(n), timeout=timeout)

    def close(self) -> None:
        self.ray.shutdown()


class DaskDriver:
    def __init__(self, workers: int):
        import distributed

        self.cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
            local_directory=os.environ.get("BENCH_NESTED_TMP"))
        self.client = distributed.Client(self.cluster)
        self.workers = workers
        self.version = f"distributed {distributed.__version__}"

    def ready(self, timeout: float) -> None:
        self.client.wait_for_workers(self.workers, timeout=timeout)
        futures = [self.client.submit(tasks.one, pure=False) for _ in range(self.workers)]
        self.client.gather(futures)

    def _one(self, fn, n: int, timeout: float):
        return self.client.submit(fn, n, pure=False).result(timeout=timeout)

    def fib(self, n: int, timeout: float) -> int:
        return self._one(tasks.dask_fib, n, timeout)

    def fan_out(self, n: int, timeout: float) -> int:
        return self._one(tasks.dask_fan_out, n, timeout)

    def close(self) -> None:
        self.client.close(timeout=5)
        self.cluster.close(timeout=5)


def _ready(driver, command: dict, timeout: float) -> None:
    driver.ready(timeout)


def _timed(op: str):
    """The op that runs ``driver.op(n)`` and answers its value and seconds."""

    def run(driver, command: dict, timeout: float) -> dict:
        t0 = time.perf_counter()
        value = getattr(driver, op)(command["n"], timeout)
        return {"value": value, "seconds": time.perf_counter() - t0}

    return run


#: The commands besides "close" (see the table above).
OPS = {"ready": _ready, "fib": _timed("fib"), "fan_out": _timed("fan_out")}


def main(argv: list[str]) -> int:
    role, workers = argv[0], int(argv[1])
    if role == "ray":
        return serve(RayDriver(workers), OPS, max_error=500)
    if role == "dask":
        return serve(DaskDriver(workers), OPS, max_error=500)
    print(f"unknown role {role!r}: ray or dask", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
