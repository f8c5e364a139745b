"""Executor benchmark: futurepool.Executor vs ProcessPoolExecutor and loky.

Run from the repository root:

    python3 benchmarks/bench_executor.py                  # all, median of 5
    python3 benchmarks/bench_executor.py --quick --repeat 1
    python3 benchmarks/bench_executor.py --impl ppe,loky --scenario latency --json out.json

See benchmarks/README.md for what each scenario measures.
"""

from __future__ import annotations

import multiprocessing
import sys
import time

import _harness  # noqa: E402 - the script's own folder is sys.path[0]

_harness.use_this_checkout()

import _tasks  # noqa: E402
from _harness import Suite, Target  # noqa: E402

FUTURE_ARGS = "future_args"  # trait: futures may be passed as task arguments





suite = Suite(
    "futurepool executor benchmark", baseline="ppe", subject="futurepool",
    warm=_harness.warm_executor,
    close=_harness.close_executor,
)
suite.header_extra.append(
    f"multiprocessing default start method: {multiprocessing.get_start_method()}"
)


suite.implementation("ppe", "PPE", _harness.load_ppe)
suite.implementation("loky", "loky", _harness.load_loky_executor)
suite.implementation("futurepool", "futurepool", _harness.load_futurepool, traits=[FUTURE_ARGS])


@suite.scenario("throughput", unit="tasks/s", higher_is_better=True, timeout=60, target=Target(2.0))
def throughput(cell):
    """10,000 no-op tasks submitted, then all waited with concurrent.futures.wait
    (1,000 with --quick); tasks per second, submit of the first to the last done."""
    n = cell.size(10_000, 1_000)
    ex = cell.make(warm=True)
    return _harness.submit_all(ex, _tasks.noop, n, cell)


@suite.scenario(
    "latency", unit="µs", higher_is_better=False, timeout=60, target=Target(1.0), show=("p90",)
)
def latency(cell):
    """Sequential submit(noop).result(), 2,000 times (200 with --quick);
    median round trip in microseconds, p90 alongside."""
    n = cell.size(2_000, 200)
    ex = cell.make(warm=True)
    return _harness.round_trips(ex, _tasks.noop, n, cell)


@suite.scenario(
    "startup", unit="s", higher_is_better=False, timeout=30, target=Target(0.10, on="value")
)
def startup(cell):
    """Seconds from constructing a fresh executor to the first result of one
    no-op task; shutdown happens after the timed region."""
    t0 = time.perf_counter()
    ex = cell.make()
    ex.submit(_tasks.noop).result(timeout=cell.left())
    return time.perf_counter() - t0


@suite.scenario("map", unit="items/s", higher_is_better=True, timeout=60, target=Target(1.5))
def map_(cell):
    """list(ex.map(square, range(100_000), chunksize=1000)) (20,000 items with
    --quick); items per second."""
    n = cell.size(100_000, 20_000)
    ex = cell.make(warm=True)
    t0 = time.perf_counter()
    out = list(ex.map(_tasks.square, range(n), chunksize=1000, timeout=cell.left()))
    elapsed = time.perf_counter() - t0
    if len(out) != n or out[-1] != (n - 1) ** 2:
        raise AssertionError(f"map returned {len(out)} items, last {out[-1:]!r}")
    return n / elapsed


@suite.scenario("chain", unit="s", higher_is_better=False, timeout=60, target=Target(1.0))
def chain(cell):
    """200 dependent tasks, each adding 1 to the previous value (50 with
    --quick); seconds. futurepool passes the previous future as the argument
    and fetches only the last result; implementations whose futures cannot be
    arguments wait for each result in the caller and resubmit it."""
    n = cell.size(200, 50)
    ex = cell.make(warm=True)
    t0 = time.perf_counter()
    if FUTURE_ARGS in cell.impl.traits:
        f = ex.submit(_tasks.inc, 0)
        for _ in range(n - 1):
            f = ex.submit(_tasks.inc, f)
        value = f.result(timeout=cell.left())
    else:
        value = 0
        for _ in range(n):
            value = ex.submit(_tasks.inc, value).result(timeout=cell.left())
    elapsed = time.perf_counter() - t0
    if value != n:
        raise AssertionError(f"chain of {n} gave {value!r}")
    return elapsed


if __name__ == "__main__":
    sys.exit(suite.main())
