"""Shared machinery for the ``bench_*.py`` scripts.

A script builds one :class:`Suite`, registers implementations with
``suite.implementation(...)`` and scenarios with ``@suite.scenario(...)``, and
calls ``suite.main()``. The suite then:

* runs each scenario ``--repeat`` times, interleaving implementations
  (A, B, C, A, B, C, ...) so that drifts in CPU frequency or background load
  hit every implementation alike, and reports medians and the spread;
* bounds every cell: scenarios pass ``cell.left()`` to each wait
  (``future.result(timeout=cell.left())``), and a SIGALRM backstop interrupts
  whatever blocks without a deadline (a constructor, a shutdown);
* closes every object a cell made, then checks with psutil that the processes
  that appeared during the cell are gone, killing and reporting any that are
  not; at exit it checks that no child process is left at all;
* prints a table (rows: scenarios; columns: implementations, then a ratio per
  non-baseline implementation oriented so that > 1 means better than the
  baseline, then the subject's target) and optionally writes JSON.

Scenario functions measure their own timed region and return either a number
or ``(number, {extra_name: number})``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

try:
    import psutil
except ImportError:  # the leak checks are skipped, and the header says so
    psutil = None

#: Seconds past a scenario's timeout before the SIGALRM backstop interrupts it.
RUN_SLACK = 2.0
#: Seconds a cell may spend closing (shutting down) its objects.
CLOSE_TIMEOUT = 10.0
#: Seconds the interpreter may spend exiting (atexit handlers, joins of
#: library threads) before the benchmark forces the exit.
EXIT_TIMEOUT = 15.0
#: Seconds to wait for a cell's processes to exit after they were closed.
EXIT_GRACE = 5.0
#: Command-line fragments of long-lived helpers that multiprocessing and loky
#: start once per interpreter; they exit when this process does.
HELPER_MARKERS = ("resource_tracker", "semaphore_tracker", "forkserver")


class Skip(Exception):
    """Raised by an implementation loader when it cannot run here."""


class CellTimeout(BaseException):
    """The SIGALRM backstop fired. A BaseException, so that library code
    catching ``Exception`` does not swallow it."""


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def use_this_checkout() -> None:
    """Import this checkout's futurepool, and _tasks / _harness, here and in workers.

    The checkout wins over an installed futurepool. PYTHONPATH carries both
    folders to workers that an implementation starts as a fresh program
    rather than by fork (spawn passes sys.path itself).
    """
    for path in (HERE, ROOT):
        if path in sys.path:
            sys.path.remove(path)
    sys.path[:0] = [HERE, ROOT]
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE, ROOT] + inherited)


def warm_executor(ex, cell) -> None:
    """One no-op per worker, submitted together: with spawn/forkserver the stdlib
    starts workers lazily, and one warm task would leave the second worker's
    start-up inside the timed region."""
    import _tasks  # here, not at import: setup() puts it on the path first

    futures = [ex.submit(_tasks.noop) for _ in range(cell.workers)]
    for f in futures:
        f.result(timeout=cell.left())


def close_executor(ex, failed: bool) -> None:
    """Close an executor-like cell object; after a failure, without waiting for its queue."""
    if not failed:
        ex.shutdown(wait=True)
        return
    # Don't wait for thousands of queued tasks; the harness kills what is left.
    try:
        ex.shutdown(wait=False, cancel_futures=True)
    except TypeError:  # loky has no cancel_futures
        ex.shutdown(wait=False)


def submit_all(ex, fn, n: int, cell) -> float:
    """Submit ``n`` calls of ``fn``, then wait for all of them; tasks per second.

    Raises TimeoutError if some are not done within ``cell.left()``, or the
    first task's exception."""
    import concurrent.futures

    t0 = time.perf_counter()
    futures = [ex.submit(fn) for _ in range(n)]
    _, not_done = concurrent.futures.wait(futures, timeout=cell.left())
    elapsed = time.perf_counter() - t0
    if not_done:
        raise TimeoutError(f"{len(not_done)} of {n} tasks not done within the timeout")
    for f in futures:
        if f.exception(timeout=0) is not None:
            raise f.exception()
    return n / elapsed


def round_trips(ex, fn, n: int, cell) -> tuple[float, dict]:
    """``n`` sequential ``ex.submit(fn).result()``, each timed: :func:`latency_stats`."""
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        ex.submit(fn).result(timeout=cell.left())
        samples.append(clock() - t0)
    return latency_stats(samples)


def latency_stats(samples: list) -> tuple[float, dict]:
    """Seconds -> (median µs, {"p90": µs}): a latency scenario's return value."""
    p90 = statistics.quantiles(samples, n=10, method="inclusive")[-1]
    return statistics.median(samples) * 1e6, {"p90": p90 * 1e6}


def load_ppe(workers):
    """Implementation loader: ``concurrent.futures.ProcessPoolExecutor``, default context."""
    import concurrent.futures
    import multiprocessing

    return (
        lambda: concurrent.futures.ProcessPoolExecutor(max_workers=workers),
        "concurrent.futures.ProcessPoolExecutor, default context"
        f" ({multiprocessing.get_start_method()})",
    )


def load_loky_executor(workers):
    """Implementation loader: a fresh ``loky.ProcessPoolExecutor`` per cell."""
    try:
        import loky
    except ImportError:
        raise Skip("loky is not installed (pip install loky)") from None
    return (
        lambda: loky.ProcessPoolExecutor(max_workers=workers),
        f"loky {loky.__version__} ProcessPoolExecutor (fresh, not the reusable one)",
    )


def load_futurepool(workers, kind: str = "Executor"):
    """Implementation loader: ``futurepool.Executor`` (or ``.Pool``) of this checkout."""
    import futurepool

    make = getattr(futurepool, kind)  # AttributeError (reported as skipped) before it exists
    version = getattr(futurepool, "__version__", "?")
    if kind == "Pool":
        def factory():
            return make(workers)
    else:
        def factory():
            return make(max_workers=workers)
    return factory, f"futurepool {version} {kind} from {os.path.dirname(futurepool.__file__)}"


@dataclasses.dataclass(frozen=True)
class Target:
    """What the subject implementation should reach in a scenario.

    ``on="ratio"``: the ratio vs the baseline (> 1 = better) must be at least
    ``threshold``. ``on="value"``: the absolute value must be at least
    (higher-is-better scenarios) or at most (lower-is-better) ``threshold``.
    """

    threshold: float
    on: str = "ratio"
    #: What the table shows instead of the threshold, e.g. "<=1.3x PPE's time"
    #: for ``Target(1 / 1.3)`` in a lower-is-better scenario.
    label: str = ""

    def text(self, scenario: Scenario) -> str:
        if self.label:
            return self.label
        if self.on == "ratio":
            return f">={self.threshold:g}x"
        sign = ">=" if scenario.higher_is_better else "<="
        return f"{sign}{_fmt(self.threshold, scenario.unit)}"

    def met(self, scenario: Scenario, value: float | None, ratio: float | None) -> bool | None:
        if self.on == "ratio":
            return None if ratio is None else ratio >= self.threshold
        if value is None:
            return None
        return value >= self.threshold if scenario.higher_is_better else value <= self.threshold


@dataclasses.dataclass
class Implementation:
    name: str  # used on the command line
    label: str  # column header
    load: Callable[[int], tuple[Callable[[], Any], str]]  # workers -> (factory, note)
    traits: frozenset = frozenset()
    factory: Callable[[], Any] | None = None
    note: str = ""


@dataclasses.dataclass
class Scenario:
    name: str
    run: Callable[[Cell], Any]
    unit: str
    higher_is_better: bool
    description: str
    timeout: float
    target: Target | None = None
    show: tuple = ()  # extras printed next to the value, same unit
    rows: tuple = ()  # extras with a row of their own (ratios, no target)
    units: dict = dataclasses.field(default_factory=dict)  # a row's unit, if not the scenario's

    def rows_of(self, results: dict) -> list:
        """``[(scenario, {impl: Result})]``: this scenario's own row, then one
        per name in ``rows``, named ``scenario.extra``, made of that extra's
        samples from the same runs."""
        out = [(self, results)]
        for extra in self.rows:
            row = dataclasses.replace(
                self, name=f"{self.name}.{extra}", target=None, show=(), rows=(), units={},
                unit=self.units.get(extra, self.unit),
                description=f"{extra}, measured in the same runs as {self.name}",
            )
            out.append((row, {
                impl: Result(samples=r.extras.get(extra, []), error=r.error)
                for impl, r in results.items()
            }))
        return out


@dataclasses.dataclass
class Result:
    samples: list = dataclasses.field(default_factory=list)
    extras: dict = dataclasses.field(default_factory=dict)  # name -> [samples]
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples and not self.error else None

    @property
    def spread(self) -> float | None:
        """Half the min-max range, relative to the median."""
        m = self.median
        return (max(self.samples) - min(self.samples)) / (2 * m) if m else None


class Cell:
    """What a scenario function gets: the implementation, sizes, a deadline."""

    def __init__(
        self, suite: Suite, impl: Implementation, quick: bool, timeout: float, workers: int
    ):
        self.suite, self.impl, self.quick, self.workers = suite, impl, quick, workers
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.made: list = []

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def left(self) -> float:
        """Seconds left before the scenario's timeout; TimeoutError once past."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"scenario timeout of {self.timeout:g} s exceeded")
        return left

    def make(self, warm: bool = False):
        """A new object under test, closed by the suite after the scenario."""
        obj = self.impl.factory()
        self.made.append(obj)
        if warm:
            self.suite.warm(obj, self)
        return obj


class Suite:
    def __init__(
        self,
        title: str,
        *,
        baseline: str,
        subject: str,
        warm: Callable[[Any, Cell], None],
        close: Callable[[Any, bool], None],
    ):
        self.title, self.baseline, self.subject = title, baseline, subject
        self.warm, self.close = warm, close
        self.impls: dict[str, Implementation] = {}
        self.scenarios: dict[str, Scenario] = {}
        self.header_extra: list[str] = []
        self.leaks: list[str] = []
        self.load_start = ""

    # -- registries --------------------------------------------------------
    def implementation(self, name: str, label: str, load, traits=()) -> None:
        self.impls[name] = Implementation(name, label, load, frozenset(traits))

    def scenario(
        self,
        name: str,
        *,
        unit: str,
        higher_is_better: bool,
        timeout: float,
        target: Target | None = None,
        show: tuple = (),
        rows: tuple = (),
        units: dict | None = None,
    ):
        def register(fn):
            doc = " ".join((fn.__doc__ or "").split())
            self.scenarios[name] = Scenario(
                name, fn, unit, higher_is_better, doc, timeout, target, show, rows, units or {}
            )
            return fn

        return register

    # -- running -----------------------------------------------------------
    def main(self, argv=None) -> int:
        args = self._parse(argv)
        if args.list:
            for s in self.scenarios.values():
                print(f"scenario {s.name:12} {s.description}")
                for row in s.rows:
                    print(f"  row    {s.name}.{row}: {row}, from the same runs")
            for i in self.impls.values():
                print(f"impl     {i.name:12} {i.label}")
            return 0
        scenarios = self._pick(args.scenario, self.scenarios, "scenario")
        impls = self._pick(args.impl, self.impls, "implementation")
        for impl in impls:
            try:
                impl.factory, impl.note = impl.load(args.workers)
            except Exception as exc:  # Skip, ImportError, AttributeError, ...
                why = str(exc) if isinstance(exc, Skip) else _describe(exc)
                impl.factory, impl.note = None, f"skipped: {why}"
        runnable = [i for i in impls if i.factory]
        results = {s.name: {i.name: Result() for i in runnable} for s in scenarios}
        self._print_header(args, impls)
        interrupted = False
        try:
            for s in scenarios:
                timeout = args.timeout or s.timeout
                for rep in range(args.repeat):
                    for impl in runnable:
                        res = results[s.name][impl.name]
                        if res.error:  # one failure fails the cell; don't pay its timeout again
                            continue
                        self._run_cell(s, impl, res, args, timeout)
                        shown = res.error or _fmt(res.samples[-1], s.unit)
                        print(
                            f"  [{s.name} {rep + 1}/{args.repeat}] {impl.label}: {shown}",
                            file=sys.stderr,
                            flush=True,
                        )
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted: partial results follow", flush=True)
        self._print_table(scenarios, runnable, results)
        self._check_children()
        if args.json:
            self._write_json(args, scenarios, impls, results, interrupted)
        code = 1 if (self.leaks or interrupted) else 0
        _exit_watchdog(code)
        return code

    def _run_cell(
        self, s: Scenario, impl: Implementation, res: Result, args, timeout: float
    ) -> None:
        cell = Cell(self, impl, args.quick, timeout, args.workers)
        before = {p.pid for p in _descendants()}
        error, out, seen = None, None, []
        stop = False
        try:
            # The scenario's own waits give up at `timeout`; the alarm catches
            # what blocks without a deadline (constructor, submit, map).
            _alarm(timeout + RUN_SLACK)
            try:
                out = s.run(cell)
            except (Exception, CellTimeout) as exc:
                error = _describe(exc)
                if isinstance(exc, TimeoutError) and not str(exc):  # cf's result() says nothing
                    error = f"TimeoutError: no result within the {timeout:g} s scenario timeout"
            except KeyboardInterrupt:
                error, stop = "interrupted", True
            seen = [p for p in _descendants() if p.pid not in before]
            _alarm(CLOSE_TIMEOUT)
            for obj in reversed(cell.made):
                try:
                    self.close(obj, error is not None)
                except (Exception, CellTimeout) as exc:
                    error = error or f"shutdown failed: {_describe(exc)}"
        except CellTimeout as exc:  # fired between the guarded calls above
            error = error or _describe(exc)
        finally:
            _alarm(0)
        seen += [p for p in _descendants() if p.pid not in before]
        killed = _reap(seen)
        if killed:
            what = (
                f"{len(killed)} process(es) still running {EXIT_GRACE:g} s after close,"
                f" killed: {', '.join(killed)}"
            )
            if error is None:  # a clean close must leave nothing behind
                self.leaks.append(f"{s.name}/{impl.label}: {what}")
                print(f"WARNING: {s.name}/{impl.label}: {what}", file=sys.stderr, flush=True)
            else:
                error += f" ({what})"
        if error:
            res.error = error
        else:
            value, extras = out if isinstance(out, tuple) else (out, {})
            res.samples.append(float(value))
            for k, v in extras.items():
                res.extras.setdefault(k, []).append(v)
        if stop:
            raise KeyboardInterrupt

    def _check_children(self) -> None:
        if psutil is None:
            return
        helpers, strays = [], []
        for p in _descendants():
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                (helpers if _is_helper(p) else strays).append(p)
            except psutil.Error:
                pass
        if helpers:
            names = [
                f"{p.pid} {'loky ' if 'loky' in _cmd(p) else ''}"
                + next(m for m in HELPER_MARKERS if m in _cmd(p))
                for p in helpers
            ]
            print(f"note: helper processes that exit with this interpreter: {', '.join(names)}")
        if strays:
            msg = ", ".join(f"{p.pid} ({_cmd(p)})" for p in strays)
            self.leaks.append(f"at exit, still running (now killed): {msg}")
            _reap(strays, grace=0)
        if self.leaks:
            bar = "!" * 72
            print(
                f"\n{bar}\nWARNING: processes outlived their executor's shutdown:\n  "
                + "\n  ".join(self.leaks)
                + f"\n{bar}",
                flush=True,
            )

    # -- output ------------------------------------------------------------
    def _print_header(self, args, impls) -> None:
        cpus = os.cpu_count()
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:
            usable = cpus
        cmd = shlex.join([os.path.basename(sys.executable)] + sys.argv)
        self.load_start = _load()
        print(f"{self.title}")
        print(
            f"Python {platform.python_version()} ({platform.python_implementation()},"
            f" {sys.executable}) on {platform.system()} {platform.machine()}"
        )
        print(f"CPUs: {cpus} (usable {usable}); load average at start: {_load()}")
        for line in self.header_extra:
            print(line)
        print(f"command: {cmd}")
        print(
            f"workers: {args.workers} per implementation; median of {args.repeat}, "
            f"implementations interleaved{'; QUICK sizes' if args.quick else ''}"
            + ("" if psutil else "; psutil missing: leak checks skipped")
        )
        for i in impls:
            print(f"  {i.label:12} {i.note}")
        print(flush=True)

    def _ratio(self, s: Scenario, results, name: str) -> float | None:
        base = results.get(self.baseline)
        mine = results.get(name)
        if not base or not mine or base.median is None or mine.median is None or not mine.median:
            return None
        return mine.median / base.median if s.higher_is_better else base.median / mine.median

    def _print_table(self, scenarios, impls, results) -> None:
        base = self.impls[self.baseline].label
        others = [i for i in impls if i.name != self.baseline]
        subject = self.impls.get(self.subject)
        has_target = subject in impls and any(s.target for s in scenarios)
        head = ["scenario"] + [i.label for i in impls]
        for i in others:  # the subject's target sits right after its ratio
            head.append(f"{i.label}/{base}")
            if has_target and i is subject:
                head.append(f"{i.label} target")
        rows, errors = [], []
        table = [(s, res, s is sc) for sc in scenarios for s, res in sc.rows_of(results[sc.name])]
        for s, res, own in table:
            # Errors are listed once per scenario, not again for its extra rows.
            row = [s.name] + self._result_cells(s, res, impls, errors if own else [])
            for i in others:
                ratio = self._ratio(s, res, i.name)
                row.append("-" if ratio is None else f"{ratio:.2f}x")
                if has_target and i is subject:
                    row.append(_verdict(s, res[i.name].median, ratio))
            rows.append(row)
        print_rows(head, rows)
        print(
            f"\nRatios: > 1 means better than {base} (rates: impl/{base}; times: {base}/impl)."
            " +-N% is half the min-max range of the repeats."
        )
        print(f"load average at end: {_load()}")
        for e in errors:
            print(f"error in {e}")
        print(flush=True)

    def _result_cells(self, s: Scenario, res: dict, impls, errors: list) -> list[str]:
        """One table cell per implementation for scenario (row) ``s``; the errors
        worth listing under the table go to ``errors``."""
        cells = []
        for i in impls:
            r = res[i.name]
            if r.error:
                text, listed = self._error_cell(r)
                cells.append(text)
                if listed:
                    errors.append(f"{s.name}/{i.label}: {r.error}")
            elif not r.samples:
                cells.append("-")
            else:
                cells.append(self._value_cell(s, r))
        return cells

    def _error_cell(self, r: Result) -> tuple[str, bool]:
        """The cell of a failed result, and whether to list its error under the table."""
        return "error: " + r.error[:28] + ("..." if len(r.error) > 28 else ""), True

    def _value_cell(self, s: Scenario, r: Result) -> str:
        """The cell of a measured result: median, extras shown, spread."""
        text = _fmt(r.median, s.unit)
        for k in s.show:
            if k in r.extras:
                text += f" ({k} {_fmt(statistics.median(r.extras[k]), '')})"
        return text + (f" +-{r.spread:.0%}" if len(r.samples) > 1 else "")

    def _write_json(self, args, scenarios, impls, results, interrupted) -> None:
        out = {
            "suite": self.title,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "command": [sys.executable] + sys.argv,
            "workers": args.workers,
            "repeat": args.repeat,
            "quick": args.quick,
            "interrupted": interrupted,
            "header": self.header_extra,
            "load_average_start": self.load_start,
            "load_average_end": _load(),
            "baseline": self.baseline,
            "subject": self.subject,
            "leaks": self.leaks,
            "implementations": {
                i.name: {"label": i.label, "note": i.note, "ran": i.factory is not None}
                for i in impls
            },
            "scenarios": {},
        }
        for s, res in (row for sc in scenarios for row in sc.rows_of(results[sc.name])):
            subj = res.get(self.subject)
            out["scenarios"][s.name] = {
                "description": s.description,
                "unit": s.unit,
                "higher_is_better": s.higher_is_better,
                "target": dataclasses.asdict(s.target) if s.target else None,
                "target_met": s.target.met(s, subj.median, self._ratio(s, res, self.subject))
                if s.target and subj
                else None,
                "results": {
                    name: {
                        "median": r.median,
                        "spread": r.spread,
                        "samples": r.samples,
                        "extras": {k: statistics.median(v) for k, v in r.extras.items()},
                        "error": r.error,
                        "ratio_vs_baseline": self._ratio(s, res, name),
                    }
                    for name, r in res.items()
                },
            }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")

    # -- command line ------------------------------------------------------
    def _parse(self, argv):
        p = argparse.ArgumentParser(description=self.title)
        p.add_argument(
            "--impl",
            action="append",
            metavar="NAME[,NAME]",
            help=f"implementations to run (default all: {', '.join(self.impls)})",
        )
        p.add_argument(
            "--scenario",
            action="append",
            metavar="NAME[,NAME]",
            help=f"scenarios to run (default all: {', '.join(self.scenarios)})",
        )
        p.add_argument(
            "--repeat",
            type=int,
            default=5,
            metavar="N",
            help="runs per cell; the median is reported (default 5)",
        )
        p.add_argument(
            "--quick", action="store_true", help="small sizes: a smoke run, numbers not comparable"
        )
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
        p.add_argument(
            "--workers", type=int, default=2, help="worker processes per implementation (default 2)"
        )
        p.add_argument(
            "--timeout", type=float, metavar="S", help="override every scenario's timeout (seconds)"
        )
        p.add_argument("--list", action="store_true", help="list scenarios and implementations")
        args = p.parse_args(argv)
        if args.repeat < 1 or args.workers < 1:
            p.error("--repeat and --workers must be >= 1")
        return args

    @staticmethod
    def _pick(chosen, registry: dict, what: str) -> list:
        if not chosen:
            return list(registry.values())
        names = [n.strip() for arg in chosen for n in arg.split(",") if n.strip()]
        unknown = [n for n in names if n not in registry]
        if unknown:
            sys.exit(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(registry)}")
        return [registry[n] for n in registry if n in names]  # keep registry order


# -- helpers -----------------------------------------------------------------


def print_rows(head: list[str], rows: list[list[str]]) -> None:
    """A table: ``head``, a rule, ``rows``; the first column left-aligned, the others right."""
    widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]

    def line(r):
        return "  ".join(x.ljust(w) if c == 0 else x.rjust(w)
                         for c, (x, w) in enumerate(zip(r, widths)))

    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def _fmt(value: float, unit: str) -> str:
    """3 significant digits, k/M for rates: 14.2k tasks/s, 0.0431 s, 2,020 µs."""
    if value is None:
        return "-"
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if unit.endswith("/s") and abs(value) >= div:
            return f"{value / div:.3g}{suffix} {unit}"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _verdict(s: Scenario, value: float | None, ratio: float | None) -> str:
    if s.target is None:
        return ""
    met = s.target.met(s, value, ratio)
    return f"{s.target.text(s)} " + {True: "PASS", False: "MISS", None: "n/a"}[met]


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _on_alarm(signum, frame):
    where = (
        f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
        if frame
        else "?"
    )
    raise CellTimeout(f"hard timeout, was blocked at {where}")


def _alarm(seconds: float) -> None:
    """Arm (seconds > 0, then again every 2 s) or disarm (0) the backstop."""
    if not hasattr(signal, "setitimer"):
        return
    if seconds:
        signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 2.0 if seconds else 0)


def _exit_watchdog(code: int) -> None:
    """Bound the interpreter's exit: a broken implementation's atexit handler
    or non-daemon thread must not hang the benchmark after its results."""

    def force():
        time.sleep(EXIT_TIMEOUT)
        print(
            f"WARNING: exit still blocked after {EXIT_TIMEOUT:g} s (atexit handlers or library "
            f"threads: {[t.name for t in threading.enumerate()]}); killing children, forcing exit",
            file=sys.stderr,
            flush=True,
        )
        _reap(_descendants(), grace=0)
        os._exit(code or 1)

    threading.Thread(target=force, name="bench-exit-watchdog", daemon=True).start()


def _descendants() -> list:
    if psutil is None:
        return []
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _cmd(p) -> str:
    try:
        return " ".join(p.cmdline())[:100] or p.name()
    except psutil.Error:
        return "?"


def _is_helper(p) -> bool:
    # Only our direct children: workers forked *by* the forkserver inherit its
    # command line but are not helpers.
    try:
        return p.ppid() == os.getpid() and any(m in _cmd(p) for m in HELPER_MARKERS)
    except psutil.Error:
        return False


def _reap(procs, grace: float = EXIT_GRACE) -> list[str]:
    """Wait for procs to exit; kill those still running. Returns 'pid (cmd)'s."""
    if psutil is None:
        return []
    uniq = {}
    for p in procs:
        if not _is_helper(p):
            uniq[p.pid] = p
    _, alive = psutil.wait_procs(list(uniq.values()), timeout=grace)
    killed = []
    for p in alive:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            killed.append(f"{p.pid} ({_cmd(p)})")
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=3)
    return killed
