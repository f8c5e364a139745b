"""``futurepool.Pool`` where ``multiprocessing.Pool`` fails: FAULTS.md §3 items 14, 15, 17.

The stdlib's pool hangs when a worker dies mid-task (bpo-22393, FAULTS 17),
when a task's exception cannot be unpickled (cpython#103061) and when a task
raises a ``BaseException`` (cpython PR#101081); it respawns a failing
initializer for ever (cpython#87472). futurepool.Pool keeps the stdlib's API
and exception types and fixes each of these; the tests here check the fix
with real processes, and a few "stdlib" tests show, with the same scenario
and a short probe, that the stdlib really does hang or storm there (so that
the futurepool tests are known to look at the right thing).

Also here, because only futurepool can do them: results passed as arguments
(handles are values, worker to worker), ``maxtasksperchild`` recycling under
a backlog, and ``imap`` over an endless input in bounded driver memory.

After each test the FAULTS.md §2 invariants apply: the pool still works
(:func:`assert_usable`) unless the scenario broke it on purpose; nothing
leaks (the autouse fixtures of tests/conftest.py). Every wait has a
deadline: results are read with ``get(timeout)`` / ``next(timeout)``, and
calls without a timeout of their own run under
:func:`~tests.conformance._support.bounded`.
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.pool as mp_pool
import os
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import psutil
import pytest

import futurepool
from futurepool.testing import wait_until

from ..conformance import _tasks as T
from ..conformance._support import TIMEOUT, Gates, bounded, end_pools
from . import _crashers as C

#: Seconds from a worker's death to the error that reports it (FAULTS 17:
#: "within a few seconds"; the owner learns of a death from the node at once).
CRASH_DEADLINE = 5.0
#: Seconds the stdlib comparisons wait to show that the stdlib hangs.
HANG_PROBE = 1.5
#: Seconds a wait that must run out is given.
SHORT = 0.3

SPAWN = multiprocessing.get_context("spawn")


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def make_pool():
    """``make_pool(**kwargs)``: a futurepool.Pool, terminated after the test."""
    if not hasattr(futurepool, "Pool"):
        pytest.skip("futurepool.Pool does not exist yet")
    made = []

    def make(**kwargs):
        pool = futurepool.Pool(**kwargs)
        made.append(pool)
        return pool

    yield make
    end_pools(made)


@pytest.fixture
def make_stdlib_pool():
    """``make_stdlib_pool(**kwargs)``: a spawn multiprocessing.Pool, terminated after the test."""
    made = []

    def make(**kwargs):
        pool = SPAWN.Pool(**kwargs)
        made.append(pool)
        return pool

    yield make
    end_pools(made)


@pytest.fixture
def gates(tmp_path):
    g = Gates(str(tmp_path / "gates"))
    yield g
    g.open_all()


def assert_usable(pool) -> None:
    """FAULTS §2: the pool still runs tasks, alone and mapped."""
    assert pool.apply_async(T.add, (2, 3)).get(timeout=TIMEOUT) == 5
    assert bounded(pool.map, T.square, range(10)) == [x * x for x in range(10)]


class Killer:
    """SIGKILLs the task that writes its pid to ``started``, as soon as it does."""

    def __init__(self, started: str):
        self.started = started
        self.pid: int | None = None
        self.killed_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="killer")

    def _run(self) -> None:
        if not wait_until(lambda: os.path.exists(self.started), TIMEOUT):
            return  # the test sees pid None and says so
        with open(self.started) as f:
            self.pid = int(f.read())
        self.killed_at = time.monotonic()
        os.kill(self.pid, signal.SIGKILL)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._thread.join(TIMEOUT)

    def assert_reported(self, error: BaseException) -> None:
        """``error`` reports this kill, soon enough and precisely (FAULTS §2 error quality)."""
        assert self.pid is not None, "the victim task never started"
        late = time.monotonic() - self.killed_at
        assert isinstance(error, futurepool.WorkerCrashedError), repr(error)
        assert isinstance(error, BrokenProcessPool)
        assert error.signal_name == "SIGKILL", str(error)
        assert error.pid == self.pid, f"the error names pid {error.pid}, we killed {self.pid}"
        assert "SIGKILL" in str(error)
        assert late < CRASH_DEADLINE, f"the death was reported {late:.1f} s after the kill"


def victim_items(n: int, victim: int, started: str) -> list:
    return [(i, started if i == victim else None) for i in range(n)]


def starts_logged(path) -> int:
    try:
        return len(path.read_text().split())
    except FileNotFoundError:
        return 0


# --- FAULTS 17: a worker killed mid-task (bpo-22393) ----------------------------------------


N_ITEMS = 20
VICTIM = 5


@pytest.mark.parametrize("call", ["map", "map_async", "starmap"])
def test_worker_killed_during_map_fails_the_call_and_the_pool_goes_on(make_pool, tmp_path,
                                                                      call):
    pool = make_pool(processes=2)
    started = str(tmp_path / "victim")
    items = victim_items(N_ITEMS, VICTIM, started)
    with Killer(started) as killer:
        with pytest.raises(futurepool.WorkerCrashedError) as info:
            if call == "map":
                bounded(pool.map, T.square_unless_victim, items)
            elif call == "map_async":
                pool.map_async(T.square_unless_victim, items).get(timeout=TIMEOUT)
            else:
                bounded(pool.starmap, T.square_unless_victim, [(item,) for item in items])
    killer.assert_reported(info.value)
    assert_usable(pool)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_worker_killed_during_imap_fails_that_item_and_the_rest_follows(make_pool, tmp_path,
                                                                       chunksize):
    """The items before the victim come back; the victim's raises; the items after it follow.

    That is what imap does with an ordinary exception (chunksize 1). With
    chunksize > 1, the stdlib's imap is a generator over chunks, which ends
    at the first failure: the whole chunk fails, and nothing follows it.
    """
    pool = make_pool(processes=2)
    started = str(tmp_path / "victim")
    with Killer(started) as killer:
        results = pool.imap(T.square_unless_victim, victim_items(N_ITEMS, VICTIM, started),
                            chunksize)
        first_of_chunk = VICTIM - VICTIM % chunksize
        before = [bounded(next, results) for _ in range(first_of_chunk)]
        assert before == [x * x for x in range(first_of_chunk)]
        with pytest.raises(futurepool.WorkerCrashedError) as info:
            bounded(next, results)
    killer.assert_reported(info.value)
    if chunksize == 1:
        rest = [results.next(timeout=TIMEOUT) for _ in range(VICTIM + 1, N_ITEMS)]
        assert rest == [x * x for x in range(VICTIM + 1, N_ITEMS)]
        with pytest.raises(StopIteration):
            results.next(timeout=TIMEOUT)
    assert_usable(pool)


def test_worker_killed_during_imap_unordered_fails_that_item_only(make_pool, tmp_path):
    pool = make_pool(processes=2)
    started = str(tmp_path / "victim")
    values, errors = [], []
    with Killer(started) as killer:
        results = pool.imap_unordered(T.square_unless_victim,
                                      victim_items(N_ITEMS, VICTIM, started))
        for _ in range(N_ITEMS):
            try:
                values.append(results.next(timeout=TIMEOUT))
            except futurepool.WorkerCrashedError as exc:
                errors.append(exc)
    assert len(errors) == 1, errors
    killer.assert_reported(errors[0])
    assert sorted(values) == [x * x for x in range(N_ITEMS) if x != VICTIM]
    with pytest.raises(StopIteration):
        results.next(timeout=TIMEOUT)
    assert_usable(pool)


def test_worker_killed_during_apply_async_fails_that_result_only(make_pool, tmp_path):
    pool = make_pool(processes=2)
    started = str(tmp_path / "victim")
    calls = []
    with Killer(started) as killer:
        results = [pool.apply_async(T.square_unless_victim, (item,),
                                    error_callback=calls.append)
                   for item in victim_items(N_ITEMS, VICTIM, started)]
        with pytest.raises(futurepool.WorkerCrashedError) as info:
            results[VICTIM].get(timeout=TIMEOUT)
    killer.assert_reported(info.value)
    assert [type(e) for e in calls] == [futurepool.WorkerCrashedError]
    for i, result in enumerate(results):
        if i != VICTIM:
            assert result.get(timeout=TIMEOUT) == i * i
    assert_usable(pool)


# --- exceptions that do not survive the trip (cpython#103061) -----------------------------


def test_an_exception_that_cannot_be_unpickled_arrives_as_a_remote_error(make_pool):
    pool = make_pool(processes=2)
    with pytest.raises(futurepool.RemoteError) as info:
        pool.apply_async(T.raise_two_argument_error).get(timeout=TIMEOUT)
    error = info.value
    assert error.type_name.endswith("TwoArgumentError"), error.type_name
    assert error.message == "only the first survives"
    assert 'raise TwoArgumentError("only the first survives", "second")' in error.traceback_text
    with pytest.raises(futurepool.RemoteError):
        bounded(pool.map, T.raise_two_argument_error, range(4))
    results = pool.imap(T.raise_two_argument_error, [1])
    with pytest.raises(futurepool.RemoteError):
        results.next(timeout=TIMEOUT)
    assert_usable(pool)


def test_an_exception_that_cannot_be_pickled_is_reported_not_hung(make_pool):
    """The stdlib reports this one as MaybeEncodingError (it does not hang here).

    futurepool may keep that type or use its RemoteError surrogate; either
    must name the exception's type and message.
    """
    pool = make_pool(processes=1)
    with pytest.raises((futurepool.RemoteError, mp_pool.MaybeEncodingError)) as info:
        pool.apply_async(T.raise_locked_error).get(timeout=TIMEOUT)
    assert "LockedError" in str(info.value) and "cannot travel" in str(info.value), str(
        info.value)
    assert_usable(pool)


# --- BaseException in a task (cpython PR#101081) ---------------------------------------------


@pytest.mark.parametrize("kind", ["keyboard_interrupt", "system_exit"])
def test_base_exception_in_a_task_is_raised_by_get(make_pool, kind):
    pool = make_pool(processes=1)
    expected = KeyboardInterrupt if kind == "keyboard_interrupt" else SystemExit
    with pytest.raises(expected) as info:
        pool.apply_async(T.raise_base_exception, (kind,)).get(timeout=TIMEOUT)
    if kind == "system_exit":
        assert info.value.code == 3
    with pytest.raises(expected):
        bounded(pool.map, T.raise_base_exception, [kind, kind])
    errors = []
    result = pool.apply_async(T.raise_base_exception, (kind,), error_callback=errors.append)
    with pytest.raises(expected):
        result.get(timeout=TIMEOUT)
    assert [type(e) for e in errors] == [expected]
    assert_usable(pool)


# --- FAULTS 14: the initializer fails (cpython#87472) -------------------------------------------


@pytest.mark.parametrize("kind", ["raise", "os_exit"])
def test_failing_initializer_is_one_clear_error_without_a_respawn_storm(make_pool, tmp_path,
                                                                       kind):
    """As futurepool.Executor (tests/faults/test_worker_crashes.py, item 14): the pool is broken.

    Every result fails with InitializerError naming the initializer, its own
    exception chained when there is one; later calls fail the same way
    (raised by the call or by ``get``). Worker starts stay bounded.
    """
    starts = tmp_path / "starts"
    pool = make_pool(processes=2, initializer=C.failing_initializer,
                     initargs=(str(starts), kind))
    with pytest.raises(futurepool.InitializerError) as info:
        pool.apply_async(C.get_pid).get(timeout=TIMEOUT)
    error = info.value
    assert isinstance(error, BrokenProcessPool)
    assert "failing_initializer" in str(error), str(error)
    if kind == "raise":
        assert isinstance(error.__cause__, C.CrashTestError), repr(error.__cause__)
    with pytest.raises(futurepool.InitializerError):
        bounded(pool.map, C.get_pid, range(4))
    with pytest.raises(BrokenProcessPool):
        pool.apply_async(C.get_pid).get(timeout=TIMEOUT)
    time.sleep(1.0)  # a storm would keep starting workers meanwhile
    limit = 2 if kind == "raise" else 2 + 3  # os._exit: a few backed-off attempts
    assert 1 <= starts_logged(starts) <= limit, f"{starts_logged(starts)} worker starts"


def test_stdlib_respawns_a_failing_initializer_for_ever(make_stdlib_pool, tmp_path):
    starts = tmp_path / "starts"
    make_stdlib_pool(processes=2, initializer=C.failing_initializer,
                     initargs=(str(starts), "raise"))
    assert wait_until(lambda: starts_logged(starts) >= 10, TIMEOUT), starts_logged(starts)


# --- the stdlib hangs where futurepool does not ----------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("scenario", ["sigkill", "unpicklable_exception", "keyboard_interrupt",
                                      "system_exit"])
def test_stdlib_pool_hangs_in_the_scenarios_above(make_stdlib_pool, tmp_path, scenario):
    """The same scenarios against multiprocessing.Pool: the result never comes.

    ``get(timeout)`` is the only way out. After an exception that cannot be
    unpickled, the stdlib's result-handler thread is dead (its traceback is
    the unhandled-thread-exception warning ignored above) and terminate()
    would fail its own consistency check, so the test empties the pool's
    cache first, as nobody waits for those results any more.
    """
    pool = make_stdlib_pool(processes=2)
    assert pool.apply_async(T.square, (2,)).get(timeout=TIMEOUT) == 4
    if scenario == "sigkill":
        started = str(tmp_path / "victim")
        with Killer(started) as killer:
            result = pool.map_async(T.square_unless_victim, victim_items(N_ITEMS, VICTIM, started))
            assert wait_until(lambda: killer.pid is not None, TIMEOUT)
    elif scenario == "unpicklable_exception":
        result = pool.apply_async(T.raise_two_argument_error)
    else:
        result = pool.apply_async(T.raise_base_exception, (scenario,))
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=HANG_PROBE)
    if scenario == "unpicklable_exception":
        assert wait_until(lambda: not pool._result_handler.is_alive(), TIMEOUT)
        pool._cache.clear()


# --- FAULTS 15: maxtasksperchild under a backlog --------------------------------------------


@pytest.mark.parametrize("tasks_per_child", [1, 2])
def test_maxtasksperchild_recycling_completes_a_backlog(make_pool, tasks_per_child):
    pool = make_pool(processes=2, maxtasksperchild=tasks_per_child)
    results = [pool.apply_async(T.getpid) for _ in range(50)]
    deadline = time.monotonic() + TIMEOUT
    pids = [r.get(timeout=max(0.0, deadline - time.monotonic())) for r in results]
    per_worker = collections.Counter(pids)
    assert max(per_worker.values()) <= tasks_per_child, per_worker
    assert len(per_worker) >= 50 // tasks_per_child
    mapped = pool.map_async(T.getpid, range(20), chunksize=1).get(timeout=TIMEOUT)
    assert max(collections.Counter(mapped).values()) <= tasks_per_child
    assert_usable(pool)


# --- handles are values --------------------------------------------------------------------------


def test_async_result_argument_goes_worker_to_worker(make_pool):
    pool = make_pool(processes=2)
    made = pool.apply_async(T.make_traveller)
    maker, route, reader = pool.apply_async(T.route_of, (made,)).get(timeout=TIMEOUT)
    # Pickled once, by the worker that made it: the driver never unpickled
    # and re-pickled the value on its way to the reader.
    assert route == [maker], f"route {route}; the driver is {os.getpid()}"
    assert os.getpid() not in (maker, reader)
    # The caller can still read it itself.
    assert made.get(timeout=TIMEOUT).maker == maker


def test_async_results_as_positional_keyword_and_nested_arguments(make_pool):
    pool = make_pool(processes=2)
    one = pool.apply_async(T.inc, (1,))  # 2
    assert pool.apply_async(T.add, (one,), {"y": one}).get(timeout=TIMEOUT) == 4
    nested = pool.apply_async(T.echo, ([one, {"k": one}],)).get(timeout=TIMEOUT)
    assert nested == (([2, {"k": 2}],), {})
    mapped = pool.map_async(T.square, range(5))
    assert pool.apply_async(sum, (mapped,)).get(timeout=TIMEOUT) == 30
    assert one.get(timeout=TIMEOUT) == 2


def test_async_results_in_map_starmap_and_imap_inputs(make_pool):
    pool = make_pool(processes=2)
    a = pool.apply_async(T.inc, (1,))
    b = pool.apply_async(T.inc, (10,))
    assert bounded(pool.map, T.inc, [a, b, 5]) == [3, 12, 6]
    assert bounded(pool.starmap, T.add, [(a, b), (b, 1)]) == [13, 12]
    assert [v for v in pool.imap(T.inc, [a, b], 1)] == [3, 12]
    assert sorted(pool.imap_unordered(T.inc, [a, b])) == [3, 12]


def test_a_pending_async_result_argument_is_waited_for(make_pool, gates):
    pool = make_pool(processes=2)
    gate = gates.new()
    slow = pool.apply_async(T.block, (gate,), {"value": 41})
    dependent = pool.apply_async(T.inc, (slow,))
    with pytest.raises(multiprocessing.TimeoutError):
        dependent.get(timeout=SHORT)
    gates.open(gate)
    assert dependent.get(timeout=TIMEOUT) == 42


def test_a_failed_async_result_fails_its_dependents_without_running_them(make_pool, tmp_path):
    pool = make_pool(processes=2)
    failed = pool.apply_async(T.raise_error, ("dependency failed",))
    marker = str(tmp_path / "ran")
    dependent = pool.apply_async(T.mark_and_return, (marker, failed))
    with pytest.raises(T.CustomError, match="^dependency failed$"):
        dependent.get(timeout=TIMEOUT)
    with pytest.raises(T.CustomError, match="^dependency failed$"):
        bounded(pool.map, T.inc, [1, failed])
    assert not os.path.exists(marker), "the dependent ran although its input failed"
    assert_usable(pool)


def test_a_futurepool_future_is_an_argument_too(make_pool):
    pool = make_pool(processes=1)
    with futurepool.Executor(max_workers=1) as executor:
        future = executor.submit(T.inc, 1)
        assert pool.apply_async(T.inc, (future,)).get(timeout=TIMEOUT) == 3
        assert bounded(pool.map, T.inc, [future, future]) == [3, 3]


def test_a_chain_of_async_results(make_pool):
    pool = make_pool(processes=2)
    result = pool.apply_async(T.inc, (0,))
    for _ in range(199):
        result = pool.apply_async(T.inc, (result,))
    assert result.get(timeout=TIMEOUT) == 200


# --- imap over an endless input in bounded memory ----------------------------------------------

#: Size in bytes of each imap result in the memory tests: large enough that
#: what an eager reader holds shows in the RSS (10,000 results = 100 MiB).
PAYLOAD = 10 * 1024
#: Items read ahead of the consumer that the tests accept ("a small multiple of the pool size").
READ_AHEAD_LIMIT = 1_000
#: RSS growth the tests accept: a tenth of what 10,000 results read ahead would hold.
RSS_LIMIT = 10 * 2**20


def _endless(counter, size, limit=None):
    """``size``, for ever (or ``limit`` times); ``counter[0]`` counts the items taken."""
    while limit is None or counter[0] < limit:
        counter[0] += 1
        yield size


def _rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_of_an_endless_input_stops_after_100_000_items_in_bounded_memory(make_pool,
                                                                              method):
    """100,000 results of 10 KiB from an endless generator; the consumer pauses now and then.

    The pauses (4 x 0.3 s) are when an eager reader races ahead: the stdlib's
    imap reads about 10,000 items (100 MiB of results) in such a pause here.
    futurepool must stay within a bounded window of the consumer all along,
    and the driver's RSS must stay flat (read every 1,000 items).
    """
    pool = make_pool(processes=2)
    counter = [0]
    results = getattr(pool, method)(T.payload, _endless(counter, PAYLOAD))
    baseline = peak = None
    for taken in range(1, 100_001):
        assert len(results.next(timeout=TIMEOUT)) == PAYLOAD
        if taken % 100 == 0:
            ahead = counter[0] - taken
            assert ahead <= READ_AHEAD_LIMIT, f"{ahead} items read ahead after {taken}"
        if taken == 1_000:  # warmed up: the pool's own buffers are allocated
            baseline = peak = _rss()
        elif taken % 1_000 == 0:
            peak = max(peak, _rss())
        if taken % 20_000 == 0:
            time.sleep(SHORT)
    growth = peak - baseline
    assert growth <= RSS_LIMIT, f"the driver grew by {growth / 2**20:.1f} MiB"


def test_stdlib_imap_reads_ahead_of_a_paused_consumer(make_stdlib_pool):
    """The comparison for the test above: the stdlib's imap is bounded by its workers only."""
    pool = make_stdlib_pool(processes=2)
    counter = [0]
    results = pool.imap(T.payload, _endless(counter, PAYLOAD, limit=2_000_000))
    for _ in range(1_000):
        results.next(timeout=TIMEOUT)
    baseline = _rss()
    # Nobody consumes now; the stdlib reads on, as fast as its workers go.
    assert wait_until(lambda: counter[0] - 1_000 > 2 * READ_AHEAD_LIMIT
                      and _rss() - baseline > RSS_LIMIT, TIMEOUT), (
        f"read ahead {counter[0] - 1_000}, grew by {(_rss() - baseline) / 2**20:.1f} MiB")
