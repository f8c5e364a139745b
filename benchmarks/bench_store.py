"""Object store benchmark: large NumPy arrays through futurepool.Executor vs
ProcessPoolExecutor, loky and Ray.

Run from the repository root:

    python3 benchmarks/bench_store.py                  # all, median of 5
    python3 benchmarks/bench_store.py --quick --repeat 1
    python3 benchmarks/bench_store.py --impl ppe,futurepool --scenario large_arg,fan_in

Ray runs when the interpreter can import it (e.g. from a venv with ray
installed: /path/to/venv/bin/python benchmarks/bench_store.py).
See benchmarks/README.md for what each scenario measures.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import importlib.util
import json
import multiprocessing
import multiprocessing.forkserver
import statistics
import sys
import time

import _harness  # noqa: E402 - the script's own folder is sys.path[0]
import numpy as np

_harness.use_this_checkout()

import _tasks  # noqa: E402
from _harness import Skip, Suite, Target, _fmt  # noqa: E402

FUTURE_ARGS = "future_args"  # trait: futures may be passed as task arguments
PUT = "put"  # trait: put(value) stores a value once and returns a future of it

#: Tasks in the broadcast scenarios, and parts in fan_in.
BROADCAST_TASKS = 16
FAN_IN_PARTS = 32
#: Warm-up rounds allowed to reach every worker before the cell fails.
WARM_ROUNDS = 50
#: Seconds of rest before each timed region: futurepool and Ray free objects
#: asynchronously, and what the warm-up freed (a segment back to its writer's
#: pool, an object out of Ray's store) must be free before the timing starts.
SETTLE = 0.1


def _every_worker(ex, cell, fn, *args) -> None:
    """Run ``fn(*args)`` untimed until every worker has run it at least once.

    Whatever a worker does the first time (import NumPy, unpickle the
    function, build its cached arrays, map fresh shared memory) then stays
    out of the timed region, whichever worker the timed call goes to.
    """
    seen = set()
    for _ in range(WARM_ROUNDS):
        futures = [ex.submit(_tasks.on_worker, fn, *args) for _ in range(cell.workers)]
        seen.update(f.result(timeout=cell.left())[0] for f in futures)
        del futures  # results (maybe arrays in shared memory) are freed now
        if len(seen) >= cell.workers:
            return
    raise RuntimeError(
        f"warm-up reached {len(seen)} of {cell.workers} workers in {WARM_ROUNDS} rounds"
    )


def _warm(ex, cell) -> None:
    # Every worker imports NumPy (unpickling a small array) before any timing.
    _every_worker(ex, cell, _tasks.ends, np.arange(4.0))



class _RayFuture:
    """An ObjectRef with a Future's ``result(timeout)``."""

    __slots__ = ("ray", "ref")

    def __init__(self, ray, ref):
        self.ray, self.ref = ray, ref

    def result(self, timeout=None):
        return self.ray.get(self.ref, timeout=timeout)  # GetTimeoutError is a TimeoutError


class _RayExecutor:
    """One Ray session (``ray.init`` ... ``ray.shutdown``) behind the calls the
    scenarios make: ``submit(fn, *args)`` is ``ray.remote(fn).remote(*args)``
    with futures among the arguments passed as their ObjectRefs (Ray resolves
    them in the worker), ``put`` is ``ray.put``."""

    def __init__(self, ray, workers: int):
        self._ray = ray
        self._remote = {}
        try:
            ray.init(
                num_cpus=workers, include_dashboard=False, configure_logging=False,
                log_to_driver=False,
            )
        except BaseException:  # the harness closes only what was made: stop what started
            ray.shutdown()
            raise

    def submit(self, fn, /, *args):
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(fn)
        refs = [a.ref if isinstance(a, _RayFuture) else a for a in args]
        return _RayFuture(self._ray, remote.remote(*refs))

    def put(self, value):
        return _RayFuture(self._ray, self._ray.put(value))

    def shutdown(self, wait=True, *, cancel_futures=False):
        self._ray.shutdown()


#: futurepool's comparisons with Ray, printed under the table (a Target only
#: compares with the baseline): (scenario, Ray's number (None: its median,
#: else the name of an extra), futurepool's target ratio or None to report).
VS_RAY = [
    ("large_arg", None, None),
    ("large_arg", "put+call", 1.0),
    ("large_result", None, 1.0),
    ("broadcast_direct", None, None),
    ("broadcast_put", None, 1.0),
    ("fan_in", None, None),
]


class StoreSuite(Suite):
    """A Suite that also compares futurepool with Ray, under the table and in the JSON."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vs_ray: list[dict] = []

    def _print_table(self, scenarios, impls, results) -> None:
        super()._print_table(scenarios, impls, results)
        ran = {s.name: s for s in scenarios}
        lines = []
        for name, key, threshold in VS_RAY:
            s = ran.get(name)
            fp = results.get(name, {}).get("futurepool") if s else None
            ray = results.get(name, {}).get("ray") if s else None
            if fp is None or ray is None or fp.median is None or ray.median is None:
                continue
            if key is not None and not ray.extras.get(key):
                continue
            theirs = ray.median if key is None else statistics.median(ray.extras[key])
            ratio = fp.median / theirs if s.higher_is_better else theirs / fp.median
            met = None if threshold is None else ratio >= threshold
            self.vs_ray.append({
                "scenario": name, "ray": key or "median", "futurepool_value": fp.median,
                "ray_value": theirs, "ratio": ratio, "target": threshold, "target_met": met,
            })
            verdict = "" if threshold is None else (
                f"  target >={threshold:g}x {'PASS' if met else 'MISS'}")
            lines.append(
                f"  {name:16} futurepool {_fmt(fp.median, s.unit):>11} vs Ray"
                f" {key or '':8} {_fmt(theirs, s.unit):>11}: {ratio:5.2f}x{verdict}"
            )
        if lines:
            print("futurepool vs Ray (> 1 means futurepool is better):")
            print("\n".join(lines))
            print(flush=True)

    def _write_json(self, args, scenarios, impls, results, interrupted) -> None:
        super()._write_json(args, scenarios, impls, results, interrupted)
        with open(args.json) as f:
            out = json.load(f)
        out["futurepool_vs_ray"] = self.vs_ray
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


suite = StoreSuite(
    "futurepool object store benchmark", baseline="ppe", subject="futurepool",
    warm=_warm, close=_harness.close_executor,
)
suite.header_extra.append(
    f"multiprocessing default start method: {multiprocessing.get_start_method()};"
    f" NumPy {np.__version__}"
)


def _load_ppe(workers):
    method = multiprocessing.get_start_method()
    if method != "fork" or importlib.util.find_spec("ray") is None:
        return (
            lambda: cf.ProcessPoolExecutor(max_workers=workers),
            f"concurrent.futures.ProcessPoolExecutor, default context ({method})",
        )
    # Workers forked from a process that has run ray.init() (even after
    # ray.shutdown()) crash now and then (SIGSEGV): with Ray installed, they
    # come from a fork server started now, before any Ray cell. The data path
    # (pipes, pickling) is the same as with fork.
    context = multiprocessing.get_context("forkserver")
    multiprocessing.forkserver.ensure_running()
    return (
        lambda: cf.ProcessPoolExecutor(max_workers=workers, mp_context=context),
        "concurrent.futures.ProcessPoolExecutor, forkserver context (not the default fork:"
        " Ray is installed, and workers forked after ray.init() crash)",
    )


def _load_ray(workers):
    try:
        import ray
    except ImportError:
        raise Skip("ray is not installed (pip install ray)") from None
    return (
        lambda: _RayExecutor(ray, workers),
        f"ray {ray.__version__}: ray.init(num_cpus={workers}, include_dashboard=False)"
        " per cell, ray.shutdown() after it; @ray.remote tasks",
    )


suite.implementation("ppe", "PPE", _load_ppe)
suite.implementation("loky", "loky", _harness.load_loky_executor)
suite.implementation("futurepool", "futurepool", _harness.load_futurepool,
                     traits=[FUTURE_ARGS, PUT])
suite.implementation("ray", "Ray", _load_ray, traits=[FUTURE_ARGS, PUT])


# --- helpers -----------------------------------------------------------------------


def _arange(n: int):
    """0.0, 1.0, ... n-1: a sum that is exact in float64, so a wrong transfer shows."""
    return np.arange(n, dtype=np.float64)


def _check(got, want, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, expected {want!r}")


def _timed(call):
    """``(call(), seconds)``, after the warm-up's garbage is collected and freed."""
    gc.collect()
    time.sleep(SETTLE)
    t0 = time.perf_counter()
    out = call()
    return out, time.perf_counter() - t0


# --- scenarios ---------------------------------------------------------------------


@suite.scenario("large_arg", unit="GB/s", higher_is_better=True, timeout=120,
                target=Target(15), show=("put+call",))
def large_arg(cell):
    """A 200 MB float64 array (20 MB with --quick) as the argument of one task
    that returns its sum: submit(total, a).result(); GB/s. Implementations
    with put() also report put+call: submit(total, put(a)).result(), the put
    inside the timed region."""
    n = cell.size(25_000_000, 2_500_000)
    ex = cell.make(warm=True)
    # Separate arrays for the warm-up and each timed call: a store that
    # recognises an array it already holds must not skip the copy.
    spare, a, b = _arange(n), _arange(n), _arange(n)
    want = n * (n - 1) / 2
    _every_worker(ex, cell, _tasks.total, spare)
    got, elapsed = _timed(lambda: ex.submit(_tasks.total, a).result(timeout=cell.left()))
    _check(got, want, "sum")
    extras = {}
    if PUT in cell.impl.traits:
        _every_worker(ex, cell, _tasks.total, ex.put(spare))
        got, put_call = _timed(
            lambda: ex.submit(_tasks.total, ex.put(b)).result(timeout=cell.left())
        )
        _check(got, want, "sum after put")
        extras["put+call"] = a.nbytes / put_call / 1e9
    return a.nbytes / elapsed / 1e9, extras


@suite.scenario("large_result", unit="GB/s", higher_is_better=True, timeout=120,
                target=Target(10))
def large_result(cell):
    """A task returns a 200 MB float64 array (20 MB with --quick) that the
    worker built and cached before; the caller's result() (ray.get) returns it;
    GB/s."""
    nbytes = cell.size(200_000_000, 20_000_000)
    ex = cell.make(warm=True)
    _every_worker(ex, cell, _tasks.cached_array, nbytes)  # built, and sent once, on each
    a, elapsed = _timed(lambda: ex.submit(_tasks.cached_array, nbytes).result(timeout=cell.left()))
    if a.nbytes != nbytes or a[0] != 0.0 or a[-1] != 0.0:
        raise AssertionError(f"got {a.nbytes} bytes, a[0]={a[0]!r}, a[-1]={a[-1]!r}")
    return nbytes / elapsed / 1e9


def _broadcast(ex, cell, a, put: bool) -> float:
    """Seconds for BROADCAST_TASKS ends(a) calls, submitted at once, to be done;
    with ``put``, the tasks get ``ex.put(a)``, put in the timed region."""
    want = float(a[0] + a[-1] + len(a))

    def run():
        arg = ex.put(a) if put else a
        futures = [ex.submit(_tasks.ends, arg) for _ in range(BROADCAST_TASKS)]
        return [f.result(timeout=cell.left()) for f in futures]

    got, elapsed = _timed(run)
    for g in got:
        _check(g, want, "ends")
    return elapsed


@suite.scenario("broadcast_direct", unit="s", higher_is_better=False, timeout=120,
                target=Target(0.10, on="value"))
def broadcast_direct(cell):
    """One 100 MB float64 array (10 MB with --quick) passed directly to 16
    tasks (16 submits of the same array) that read it lightly; seconds from
    the first submit to the last result."""
    n = cell.size(12_500_000, 1_250_000)
    ex = cell.make(warm=True)
    spare, a = _arange(n), _arange(n)
    _every_worker(ex, cell, _tasks.ends, spare)
    return _broadcast(ex, cell, a, put=False)


@suite.scenario("broadcast_put", unit="s", higher_is_better=False, timeout=120)
def broadcast_put(cell):
    """As broadcast_direct, but the array is stored once with put() (futurepool
    ex.put, Ray ray.put), inside the timed region, and the 16 tasks get the
    returned future (ObjectRef). PPE and loky have no put: they pass the array
    directly, as in broadcast_direct."""
    n = cell.size(12_500_000, 1_250_000)
    ex = cell.make(warm=True)
    spare, a = _arange(n), _arange(n)
    if PUT in cell.impl.traits:
        _every_worker(ex, cell, _tasks.ends, ex.put(spare))
        return _broadcast(ex, cell, a, put=True)
    _every_worker(ex, cell, _tasks.ends, spare)
    return _broadcast(ex, cell, a, put=False)


@suite.scenario("fan_in", unit="s", higher_is_better=False, timeout=120,
                target=Target(0.10, on="value"))
def fan_in(cell):
    """32 tasks each return a cached 8 MB float64 array (1 MB with --quick),
    then one task sums all 32; seconds from the first submit to the sum.
    futurepool and Ray pass the 32 futures (ObjectRefs) to the last task;
    PPE and loky fetch the 32 results in the caller and resubmit them."""
    nbytes = cell.size(8_000_000, 1_000_000)
    ex = cell.make(warm=True)
    _every_worker(ex, cell, _tasks.fill_cache, nbytes, FAN_IN_PARTS)
    want = float(nbytes // 8 * sum(range(FAN_IN_PARTS)))

    def run():
        parts = [ex.submit(_tasks.cached_array, nbytes, i) for i in range(FAN_IN_PARTS)]
        if FUTURE_ARGS not in cell.impl.traits:
            parts = [p.result(timeout=cell.left()) for p in parts]
        return ex.submit(_tasks.total_all, *parts).result(timeout=cell.left())

    _check(run(), want, "untimed round")  # every path once, results freed
    got, elapsed = _timed(run)
    _check(got, want, "sum")
    return elapsed


if __name__ == "__main__":
    sys.exit(suite.main())
