"""Client benchmark: a small Dask script handed futurepool.Executor, vs
ProcessPoolExecutor and loky.

Run from the repository root:

    python3 benchmarks/bench_dask_client.py                  # median of 5
    python3 benchmarks/bench_dask_client.py --quick --repeat 1
    python3 benchmarks/bench_dask_client.py --impl ppe,futurepool --json out.json

Each sample runs one short user script (``CLIENT`` below, written to a
temporary folder) with ``sys.executable`` in a fresh interpreter, so that the
interpreter's start-up, the imports, starting the workers and shutting them
down are all in the wall time, as a user running the script would see them.
The script hands the executor to Dask (``dask.compute(..., scheduler=executor)``),
computes a ``dask.array`` sum and a ``dask.bag`` count a few times, and prints
what it measured as JSON on its last line of output. See benchmarks/README.md.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import _harness  # noqa: E402 - the script's own folder is sys.path[0]

_harness.use_this_checkout()

from _harness import Skip, Suite, Target  # noqa: E402

from futurepool.testing import (  # noqa: E402
    SHM_DIR,
    kill_processes,
    list_entries,
    tagged_processes,
    wait_until,
)

#: The user script. Module-level imports and a filter function defined in the
#: script itself, as users write them: workers that start by importing the
#: main script pay for these imports, forked ones inherit them.
CLIENT = '''\
"""A small Dask computation on a process pool.

python3 dask_client.py IMPL WORKERS N ROUNDS prints, as JSON on its last line:
seconds spent importing, creating the executor, in each dask.compute and
shutting down, and the results of every compute.
"""
import time

START = time.perf_counter()

import json
import sys

import dask
import dask.array as da
import dask.bag as db

IMPORTED = time.perf_counter()


def multiple_of_three(x):
    return x % 3 == 0


def make_executor(impl, workers):
    if impl == "ppe":
        from concurrent.futures import ProcessPoolExecutor
        return ProcessPoolExecutor(max_workers=workers)
    if impl == "loky":
        from loky import ProcessPoolExecutor
        return ProcessPoolExecutor(max_workers=workers)
    if impl == "futurepool":
        from futurepool import Executor
        return Executor(max_workers=workers)
    raise SystemExit(f"unknown implementation {impl!r}")


def main():
    impl, workers, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    computes, results = [], []
    with make_executor(impl, workers) as executor:
        created = time.perf_counter()
        for _ in range(rounds):
            total = da.arange(n, chunks=n // 8).sum()
            bag = db.from_sequence(range(n // 10), npartitions=8)
            count = bag.filter(multiple_of_three).count()
            t0 = time.perf_counter()
            values = dask.compute(total, count, scheduler=executor)
            computes.append(time.perf_counter() - t0)
            results.append([[int(v), type(v).__name__] for v in values])
        closing = time.perf_counter()
    done = time.perf_counter()
    print(json.dumps({
        "import": IMPORTED - START,
        "create": created - IMPORTED,
        "computes": computes,
        "shutdown": done - closing,
        "script": done - START,
        "results": results,
    }))


if __name__ == "__main__":
    main()
'''

#: Environment variable that marks every process one script run starts, so
#: that those which outlive the script are found outside our process tree.
RUN_TAG = "FUTUREPOOL_BENCH_RUN"
#: Prefix of futurepool's shared-memory segments in the scripts' runs: any
#: left in /dev/shm after a run are a leak.
SHM_PREFIX = f"fpbench_{os.getpid()}_"
#: Lines of a failed script's stderr quoted in the error.
STDERR_LINES = 5
#: Results every run's results are compared with: the first PPE run's.
_reference: dict = {}


@functools.cache
def _workdir() -> str:
    """A private folder holding the script (and futurepool's run directories),
    removed when the benchmark exits."""
    path = tempfile.mkdtemp(prefix="futurepool-bench-dask-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    with open(os.path.join(path, "dask_client.py"), "w") as f:
        f.write(CLIENT)
    os.mkdir(os.path.join(path, "run"))
    return path


def _read(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


class ScriptRun:
    """One run of the client script in a fresh interpreter: a cell's object under test.

    Its output goes to temporary files, not pipes, so that a process the script
    left behind cannot keep the benchmark waiting once the script has exited.
    """

    def __init__(self, impl: str, workers: int):
        self.impl, self.workers = impl, workers
        self.tag = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None

    def run(self, cell, n: int, rounds: int) -> tuple[float, dict]:
        """Run the script to its end; ``(wall seconds, what it printed)``."""
        work = _workdir()
        argv = [sys.executable, os.path.join(work, "dask_client.py"),
                self.impl, str(self.workers), str(n), str(rounds)]
        env = {**os.environ, RUN_TAG: self.tag, "FUTUREPOOL_SHM_PREFIX": SHM_PREFIX,
               "FUTUREPOOL_TMPDIR": os.path.join(work, "run")}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, env=env, cwd=work)
            try:
                self.proc.wait(cell.left())
            except subprocess.TimeoutExpired:
                raise TimeoutError(
                    f"the script ran past the {cell.timeout:g} s scenario timeout"
                ) from None
            wall = time.perf_counter() - t0
            stdout, stderr = (_read(f) for f in (out, err))
        if self.proc.returncode != 0:
            tail = " | ".join(stderr.strip().splitlines()[-STDERR_LINES:])
            raise RuntimeError(f"the script exited with {self.proc.returncode}: {tail}")
        self._check_leftovers(work)
        return wall, json.loads(stdout.strip().splitlines()[-1])

    def _check_leftovers(self, work: str) -> None:
        """Every process the script started must be gone soon after it, and
        futurepool's segments and run directories with it."""
        if not wait_until(lambda: not tagged_processes(RUN_TAG, self.tag), _harness.EXIT_GRACE):
            left = tagged_processes(RUN_TAG, self.tag)
            kill_processes(left)
            raise RuntimeError(
                f"{len(left)} process(es) still running {_harness.EXIT_GRACE:g} s after the"
                f" script exited (now killed): {', '.join(map(_harness._cmd, left))}"
            )
        removed = _remove_leftovers(work)
        if removed:
            raise RuntimeError(f"the script left {', '.join(removed)} behind (now removed)")

    def close(self, failed: bool) -> None:
        """Kill the script and everything it started, if it is still running."""
        if self.proc is None:
            return
        if self.proc.poll() is None or failed:
            kill_processes(tagged_processes(RUN_TAG, self.tag))
            _remove_leftovers(_workdir())
        self.proc.wait(_harness.CLOSE_TIMEOUT)


def _remove_leftovers(work: str) -> list[str]:
    """Remove futurepool's segments and run directories of the scripts; their paths."""
    paths = [os.path.join(SHM_DIR, name) for name in list_entries(SHM_DIR, SHM_PREFIX)]
    paths += [os.path.join(work, "run", name) for name in list_entries(f"{work}/run")]
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return paths


suite = Suite(
    "futurepool client benchmark: a Dask script", baseline="ppe", subject="futurepool",
    warm=lambda run, cell: None, close=lambda run, failed: run.close(failed),
)


def _script_loader(name: str, load):
    """A loader running the script with implementation ``name``; ``load`` (the
    executor benchmark's loader) skips it where it cannot be imported and
    describes it."""

    def loader(workers):
        if not _dask_versions():
            raise Skip("dask is not installed (pip install 'dask[array,bag]')")
        _, note = load(workers)
        return (lambda: ScriptRun(name, workers)), f"{note}; in the script"

    return loader


@functools.cache
def _dask_versions() -> str:
    try:
        import dask
        import numpy
    except ImportError:
        return ""
    return f"dask {dask.__version__}, NumPy {numpy.__version__}"


suite.header_extra.append(
    f"{_dask_versions() or 'dask: not installed'}; each sample a fresh interpreter: "
    f"{os.path.basename(sys.executable)} <tmp>/dask_client.py IMPL WORKERS N ROUNDS"
)
suite.implementation("ppe", "PPE", _script_loader("ppe", _harness.load_ppe))
suite.implementation("loky", "loky", _script_loader("loky", _harness.load_loky_executor))
suite.implementation("futurepool", "futurepool",
                     _script_loader("futurepool", _harness.load_futurepool))


def _check(record: dict, impl: str, n: int) -> None:
    """Every compute gives the right values, and the same values and types as the stdlib."""
    m = n // 10
    want = [n * (n - 1) // 2, (m + 2) // 3]  # sum of range(n); multiples of 3 in range(m)
    for got in record["results"]:
        if [value for value, _ in got] != want:
            raise AssertionError(f"dask.compute gave {got}, expected the values {want}")
    if impl == "ppe":
        _reference.setdefault(n, record["results"][0])
    reference = _reference.get(n)
    if reference is not None and record["results"][0] != reference:
        raise AssertionError(f"results {record['results'][0]} differ from the stdlib's {reference}")


@suite.scenario(
    "dask", unit="s", higher_is_better=False, timeout=120,
    target=Target(1 / 1.3, label=">=0.77x (time <=1.3x PPE)"),
    rows=("first_compute", "later_computes"),
)
def dask_script(cell):
    """Whole wall time of a fresh interpreter running the script: import dask
    (array, bag), create the executor, 5 rounds (2 with --quick) of
    dask.compute(da.arange(N, chunks=N/8).sum(), a bag of range(N/10) in 8
    partitions filtered by a function of the script, .count()) with
    scheduler=executor, N = 1,000,000 (100,000 with --quick), shut down, exit.
    Rows from the same runs: the first compute, and the median of the later ones."""
    n = cell.size(1_000_000, 100_000)
    rounds = cell.size(5, 2)
    run = cell.make()
    wall, record = run.run(cell, n, rounds)
    _check(record, cell.impl.name, n)
    computes = record["computes"]
    return wall, {
        "first_compute": computes[0],
        "later_computes": statistics.median(computes[1:]),
        "import": record["import"],
        "create": record["create"],
        "shutdown": record["shutdown"],
        # Interpreter start-up and exit: what the script cannot time itself.
        "interpreter": wall - record["script"],
    }


if __name__ == "__main__":
    sys.exit(suite.main())
