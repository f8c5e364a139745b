"""Pool benchmark: futurepool.Pool vs multiprocessing.Pool.

Run from the repository root:

    python3 benchmarks/bench_pool.py                  # all, median of 5
    python3 benchmarks/bench_pool.py --quick --repeat 1
    python3 benchmarks/bench_pool.py --scenario imap,imap_memory --json out.json

See benchmarks/README.md for what each scenario measures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import multiprocessing
import sys
import time

import _harness  # noqa: E402 - the script's own folder is sys.path[0]

_harness.use_this_checkout()

import _tasks  # noqa: E402
from _harness import Suite, Target  # noqa: E402

try:
    import psutil
except ImportError:  # the memory numbers need it; the rates do not
    psutil = None

#: The stdlib's imap reads its input ahead of the consumer, bounded only by
#: how fast its workers go: its "endless" input ends here, so that a cell
#: cannot run away (the scenario's timeout bounds it too).
STDLIB_INPUT_LIMIT = 2_000_000
#: Bytes per result in imap_memory: 10,000 results read ahead = 100 MiB.
PAYLOAD = 10 * 1024
#: RSS growth below this is shown as this (page-granular noise; keeps ratios finite).
RSS_FLOOR_MIB = 0.1


def _warm(pool, cell) -> None:
    # One no-op per worker, submitted together (as bench_executor does).
    results = [pool.apply_async(_tasks.noop) for _ in range(cell.workers)]
    for r in results:
        r.get(timeout=cell.left())


def _close(pool, failed: bool) -> None:
    # Graceful after a clean run; terminate() after a failure, so that a
    # backlog of queued tasks is not waited for.
    if failed:
        pool.terminate()
    else:
        pool.close()
    pool.join()


suite = Suite("futurepool pool benchmark", baseline="mp", subject="futurepool",
              warm=_warm, close=_close)
suite.header_extra.append(
    f"multiprocessing default start method: {multiprocessing.get_start_method()}"
)
if psutil is None:
    suite.header_extra.append("psutil missing: RSS columns are not measured")


def _load_mp(workers):
    method = multiprocessing.get_start_method()
    return (
        lambda: multiprocessing.Pool(workers),
        f"multiprocessing.Pool, default context ({method})",
    )


suite.implementation("mp", "mp.Pool", _load_mp)
suite.implementation("futurepool", "futurepool",
                     functools.partial(_harness.load_futurepool, kind="Pool"))


# --- memory helpers ----------------------------------------------------------------


def _trim() -> None:
    """Give freed memory back to the OS, so that a cell's RSS baseline does not
    hide its growth in what an earlier cell freed (glibc malloc_trim)."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the numbers are noisier, not wrong
        pass


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20 if psutil else 0.0


def _endless(counter: list, value, limit: int | None):
    """``value`` for ever (or ``limit`` times); ``counter[0]`` counts the items taken."""
    while limit is None or counter[0] < limit:
        counter[0] += 1
        yield value


def _input_limit(cell) -> int | None:
    return STDLIB_INPUT_LIMIT if cell.impl.name == "mp" else None


def _stop(pool) -> None:
    """End a pool whose imap was abandoned. The stdlib's task handler would go
    on reading the input (up to STDLIB_INPUT_LIMIT) for close()+join(), so
    terminate() it now, outside the timed region; the harness's close() is
    then a no-op."""
    pool.terminate()
    pool.join()


# --- scenarios ---------------------------------------------------------------------


@suite.scenario("map", unit="items/s", higher_is_better=True, timeout=120, target=Target(1.0))
def map_(cell):
    """pool.map_async(square, range(1_000_000)).get(timeout) with the default
    chunksize (what map() does, with a deadline); 100,000 items with --quick;
    items per second."""
    n = cell.size(1_000_000, 100_000)
    pool = cell.make(warm=True)
    t0 = time.perf_counter()
    out = pool.map_async(_tasks.square, range(n)).get(timeout=cell.left())
    elapsed = time.perf_counter() - t0
    if len(out) != n or out[-1] != (n - 1) ** 2:
        raise AssertionError(f"map returned {len(out)} items, last {out[-1:]!r}")
    return n / elapsed


@suite.scenario("apply_async", unit="tasks/s", higher_is_better=True, timeout=120,
                target=Target(1.0))
def apply_async(cell):
    """10,000 apply_async(noop) (1,000 with --quick), then get() on each;
    tasks per second from the first call to the last result."""
    n = cell.size(10_000, 1_000)
    pool = cell.make(warm=True)
    t0 = time.perf_counter()
    results = [pool.apply_async(_tasks.noop) for _ in range(n)]
    for r in results:
        r.get(timeout=cell.left())
    elapsed = time.perf_counter() - t0
    return n / elapsed


@suite.scenario("imap", unit="items/s", higher_is_better=True, timeout=120,
                show=("rss MiB", "read-ahead"))
def imap(cell):
    """imap(square) over an endless generator, stopped after 100,000 items
    (10,000 with --quick), consumed as fast as they come; items per second,
    with the driver's RSS growth (MiB) and the most items read ahead of the
    consumer. The stdlib's generator ends at 2,000,000 items."""
    n = cell.size(100_000, 10_000)
    pool = cell.make(warm=True)
    counter = [0]
    _trim()
    base = peak = _rss_mib()
    ahead = 0
    t0 = time.perf_counter()
    results = pool.imap(_tasks.square, _endless(counter, 3, _input_limit(cell)))
    for taken in range(1, n + 1):
        if results.next(timeout=cell.left()) != 9:
            raise AssertionError(f"item {taken} is wrong")
        if taken % 1_000 == 0:
            peak = max(peak, _rss_mib())
            ahead = max(ahead, counter[0] - taken)
    elapsed = time.perf_counter() - t0
    _stop(pool)
    return n / elapsed, {"rss MiB": max(peak - base, RSS_FLOOR_MIB), "read-ahead": ahead}


@suite.scenario("imap_memory", unit="MiB", higher_is_better=False, timeout=120,
                target=Target(16, on="value"), show=("read-ahead",))
def imap_memory(cell):
    """The driver's RSS growth (MiB) over imap(payload) of an endless generator,
    stopped after 100,000 results of 10 KiB (10,000 with --quick), the consumer
    pausing 4 x 0.25 s on the way (once with --quick): what an eager reader
    holds shows in such pauses. Most items read ahead alongside. The stdlib's
    generator ends at 2,000,000 items."""
    n = cell.size(100_000, 10_000)
    pause_every = n // 5 if not cell.quick else n // 2
    pool = cell.make(warm=True)
    counter = [0]
    results = pool.imap(_tasks.payload, _endless(counter, PAYLOAD, _input_limit(cell)))
    base = peak = None
    ahead = 0
    for taken in range(1, n + 1):
        if len(results.next(timeout=cell.left())) != PAYLOAD:
            raise AssertionError(f"item {taken} is wrong")
        if taken == 1_000:  # warmed up: buffers allocated, earlier cells' memory trimmed
            _trim()
            base = peak = _rss_mib()
        elif taken % 1_000 == 0:
            peak = max(peak, _rss_mib())
            ahead = max(ahead, counter[0] - taken)
        if taken % pause_every == 0 and taken < n:
            time.sleep(0.25)
    _stop(pool)
    return max(peak - base, RSS_FLOOR_MIB), {"read-ahead": ahead}


if __name__ == "__main__":
    sys.exit(suite.main())
