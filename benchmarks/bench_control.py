"""Control benchmark: how late timeouts take effect, and what options() costs (issue 12).

Run from the repository root:

    python3 benchmarks/bench_control.py                    # all, median of 3
    python3 benchmarks/bench_control.py --quick --repeat 1 # smoke run, ~10 s
    python3 benchmarks/bench_control.py --scenario late-sleep --json out.json

Scenarios (futurepool only: nothing else has per-task timeouts that stop work):

* ``late-python``, ``late-sleep``, ``late-kill``: 100 tasks (20 with
  --quick) submitted at once through ``options(timeout=0.1)``, each stuck
  in a pure-Python loop, in ``time.sleep``, or catching the interrupt and
  sleeping on (so its worker is killed after ``config.INTERRUPT_GRACE``).
  For each, the delay from its deadline (its start in the worker, which the
  task records with the system-wide monotonic clock, plus the limit) to the
  moment its future settled (a done-callback, which runs in the owner's
  thread as it settles); median in ms, with min, p95 and max. Target: under
  1 s (``late-kill`` includes the 0.5 s grace by design).
* ``options-cost``: no-op throughput through ``options(timeout=60).submit``
  over plain ``submit``, on one executor, alternating 5 rounds of each
  (2,000 tasks a round; 500 with --quick); the ratio, with both rates
  alongside. Target: >= 0.9 (under 10% cost).
* ``resources-cost``: the same for ``options(resources={"mem": "1MB"})``,
  whose tasks are placed by what their node holds (room for thousands: the
  cost of placing, not of waiting; no target, informational).
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import sys
import tempfile
import time

import _harness  # noqa: E402 - the script's own folder is sys.path[0]

_harness.use_this_checkout()

import _tasks  # noqa: E402
from _harness import Suite, Target  # noqa: E402

#: The limit each measured task gets: short, so 100 of them take seconds.
LIMIT = 0.1
#: Alternating rounds (plain submit, then through options) of the *-cost scenarios.
ROUNDS = 5


suite = Suite(
    "futurepool control benchmark", baseline="futurepool", subject="futurepool",
    warm=_harness.warm_executor,
    close=_harness.close_executor,
)
suite.implementation("futurepool", "futurepool", _harness.load_futurepool)


def _lateness(cell, task) -> tuple[float, dict]:
    """Submit ``task`` n times with a timeout; median ms from deadline to settled, and more."""
    n = cell.size(100, 20)
    ex = cell.make(warm=True)
    view = ex.options(timeout=LIMIT)
    settled: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-control-") as folder:
        futures = []
        for i in range(n):
            future = view.submit(task, os.path.join(folder, str(i)))
            future.add_done_callback(lambda f, i=i: settled.setdefault(i, time.monotonic()))
            futures.append(future)
        done, not_done = concurrent.futures.wait(futures, timeout=cell.left())
        if not_done:
            raise TimeoutError(f"{len(not_done)} of {n} timeouts did not settle in time")
        for future in futures:
            if not isinstance(future.exception(0), TimeoutError):
                raise AssertionError(f"expected a TaskTimeoutError, got {future.exception(0)!r}")
        late = []
        for i in range(n):
            with open(os.path.join(folder, str(i))) as file:
                started = float(file.read())
            late.append((settled[i] - started - LIMIT) * 1e3)
    p95 = statistics.quantiles(late, n=20, method="inclusive")[-1]
    return statistics.median(late), {"min": min(late), "p95": p95, "max": max(late)}


@suite.scenario("late-python", unit="ms", higher_is_better=False, timeout=120,
                target=Target(1000, on="value"), show=("min", "p95", "max"))
def late_python(cell):
    """Timeouts of tasks in a pure-Python loop: ms from deadline to settled."""
    return _lateness(cell, _tasks.spin_noting_start)


@suite.scenario("late-sleep", unit="ms", higher_is_better=False, timeout=120,
                target=Target(1000, on="value"), show=("min", "p95", "max"))
def late_sleep(cell):
    """Timeouts of tasks in time.sleep: ms from deadline to settled."""
    return _lateness(cell, _tasks.sleep_noting_start)


@suite.scenario("late-kill", unit="ms", higher_is_better=False, timeout=180,
                target=Target(1000, on="value"), show=("min", "p95", "max"))
def late_kill(cell):
    """Timeouts of tasks that swallow the interrupt (killed after the grace):
    ms from deadline to settled."""
    return _lateness(cell, _tasks.swallow_noting_start)


def _cost(cell, name: str, **options) -> tuple[float, dict]:
    """No-op tasks/s through ``options(**options).submit`` over plain submit, in
    ROUNDS alternating rounds on one executor: the ratio of the medians, and both
    rates (``submit`` and ``name``)."""
    n = cell.size(2_000, 500)
    ex = cell.make(warm=True)
    view = ex.options(**options)
    plain, through = [], []
    for _ in range(ROUNDS):
        plain.append(_harness.submit_all(ex, _tasks.noop, n, cell))
        through.append(_harness.submit_all(view, _tasks.noop, n, cell))
    rate, rate_with = statistics.median(plain), statistics.median(through)
    return rate_with / rate, {"submit": rate, name: rate_with}


@suite.scenario("options-cost", unit="x", higher_is_better=True, timeout=120,
                target=Target(0.9, on="value"), show=("submit", "options"))
def options_cost(cell):
    """No-op tasks/s through options(timeout=60).submit over plain submit
    (alternating rounds on one executor); rates in tasks/s alongside."""
    return _cost(cell, "options", timeout=60)


@suite.scenario("resources-cost", unit="x", higher_is_better=True, timeout=120,
                show=("submit", "resources"))
def resources_cost(cell):
    """No-op tasks/s through options(resources={"mem": "1MB"}).submit over plain
    submit (alternating rounds on one executor); rates in tasks/s alongside. Each
    such task is placed by what its node's queued and running tasks hold; the
    host has room for thousands, so this is the cost of placing, not of waiting."""
    return _cost(cell, "resources", resources={"mem": "1MB"})


if __name__ == "__main__":
    sys.exit(suite.main())
