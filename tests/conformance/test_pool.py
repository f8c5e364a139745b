"""One behaviour suite for ``multiprocessing.pool.Pool``, bound to several implementations.

Each test below is written once and runs against every implementation in
:data:`IMPLEMENTATIONS` through the ``impl`` / ``make_pool`` fixtures
(STYLE.md §13):

* ``futurepool`` -- :class:`futurepool.Pool`, the implementation under test;
* ``process``    -- ``multiprocessing.get_context("spawn").Pool``, the
  reference futurepool is a drop-in for (spawn: the test process runs
  threads, so fork would warn, and spawn is what futurepool's workers are
  closest to);
* ``thread``     -- ``multiprocessing.pool.ThreadPool``, where the behaviour
  is meaningful for threads.

A divergence from the stdlib is either a bug or one of the intended
differences listed in ``futurepool/pool.py``'s docstring; those are spelled
out in the tests that meet them (search for "Intended difference"). What
only futurepool has (handles as arguments, crash containment) is in
tests/faults/test_pool_faults.py.

Tasks live in :mod:`tests.conformance._tasks`, which imports only the
stdlib, so that spawn workers start fast. Tasks that must stay busy wait on
a gate file the test creates (:class:`~tests.conformance._support.Gates`),
never on a fixed sleep. Every wait has a deadline: results are read with
``get(timeout)`` / ``next(timeout)``, and calls that take no timeout of their
own (``map``, ``apply``, ``join``...) run under
:func:`~tests.conformance._support.bounded`.
"""

from __future__ import annotations

import builtins
import gc
import inspect
import itertools
import multiprocessing
import multiprocessing.pool as mp_pool
import os
import pickle
import sys
import threading
import time
import types
import typing
import warnings
import weakref
from concurrent.futures import CancelledError

import psutil
import pytest

import futurepool
from futurepool.testing import wait_until

from . import _tasks as T
from ._support import TIMEOUT, Gates, bounded, end_pool, end_pools, only, read_pid

#: Seconds for a wait that is expected to run out (a result that is not ready yet).
SHORT = 0.3

SPAWN = multiprocessing.get_context("spawn")

IMPLEMENTATIONS = ["futurepool", "process", "thread"]
PROCESS_BASED = ("futurepool", "process")


def _futurepool_pool(**kwargs):
    return futurepool.Pool(**kwargs)


FACTORIES = {
    "futurepool": _futurepool_pool,
    "process": SPAWN.Pool,
    "thread": mp_pool.ThreadPool,
}


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    if request.param == "futurepool" and not hasattr(futurepool, "Pool"):
        pytest.skip("futurepool.Pool does not exist yet")
    return request.param


@pytest.fixture
def make_pool(impl):
    """A factory for pools of the implementation under test; all are terminated afterwards.

    Arguments by keyword: ``ThreadPool`` takes neither ``maxtasksperchild``
    nor ``context``.
    """
    created = []

    def make(**kwargs):
        pool = FACTORIES[impl](**kwargs)
        created.append(pool)
        return pool

    yield make
    end_pools(created)


@pytest.fixture
def gates(make_pool, tmp_path):
    # Depends on make_pool so that the gates are opened before the pools are
    # ended: a ThreadPool's join() waits for its blocked threads.
    g = Gates(str(tmp_path / "gates"))
    yield g
    g.open_all()


def expect_timeout(wait, *args):
    """``wait(*args)`` must raise ``multiprocessing.TimeoutError`` -- not the builtin one."""
    started = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError) as info:
        wait(*args)
    assert type(info.value) is multiprocessing.TimeoutError
    assert not isinstance(info.value, builtins.TimeoutError)
    assert time.monotonic() - started < 5.0, "the timeout was not honoured"


def take(iterator, n, timeout=TIMEOUT):
    """The next ``n`` items of an imap iterator, each awaited for at most ``timeout`` seconds.

    With ``chunksize > 1`` the stdlib's imap returns a plain generator,
    without ``next(timeout)``: those are advanced under :func:`bounded`.
    """
    if hasattr(iterator, "next"):
        return [iterator.next(timeout=timeout) for _ in range(n)]
    return [bounded(next, iterator, timeout=timeout) for _ in range(n)]


def chunk_positions(n, chunksize):
    """What ``chunk_position`` returns for n items split into chunks of ``chunksize``."""
    return [i % chunksize for i in range(n)]


def stdlib_default_chunksize(n, processes):
    chunksize, extra = divmod(n, processes * 4)
    return chunksize + 1 if extra else chunksize


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- construction --------------------------------------------------------------------

# (case id, keyword arguments, exception type, the stdlib's exact message)
CONSTRUCTOR_ERRORS = [
    ("processes=0", {"processes": 0}, ValueError, "Number of processes must be at least 1"),
    ("processes=-1", {"processes": -1}, ValueError, "Number of processes must be at least 1"),
    ("processes='2'", {"processes": "2"}, TypeError,
     "'<' not supported between instances of 'str' and 'int'"),
    ("initializer=5", {"initializer": 5}, TypeError, "initializer must be a callable"),
    ("maxtasksperchild=0", {"maxtasksperchild": 0}, ValueError,
     "maxtasksperchild must be a positive int or None"),
    ("maxtasksperchild=-2", {"maxtasksperchild": -2}, ValueError,
     "maxtasksperchild must be a positive int or None"),
    ("maxtasksperchild='1'", {"maxtasksperchild": "1"}, ValueError,
     "maxtasksperchild must be a positive int or None"),
    ("maxtasksperchild=1.5", {"maxtasksperchild": 1.5}, ValueError,
     "maxtasksperchild must be a positive int or None"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"),
                         [case[1:] for case in CONSTRUCTOR_ERRORS],
                         ids=[case[0] for case in CONSTRUCTOR_ERRORS])
def test_constructor_validation_matches_the_stdlib(impl, kwargs, error, message):
    if "maxtasksperchild" in kwargs:
        only(impl, *PROCESS_BASED, reason="ThreadPool has no maxtasksperchild")
    with pytest.raises(error) as info:
        FACTORIES[impl](**kwargs)
    # The stdlib's Pool made its queues before it checked the argument: finalize
    # them now, at a safe point. Collected later, inside a resource-tracker call,
    # their finalizers would re-enter the tracker (ReentrantCallError on 3.12+).
    gc.collect()
    assert type(info.value) is error
    assert str(info.value) == message


def test_default_number_of_processes(impl, make_pool):
    if impl == "futurepool":
        # As futurepool.Executor: the CPUs this process may use (3.13
        # semantics) on every Python version.
        expected = len(os.sched_getaffinity(0))
    elif sys.version_info >= (3, 13):
        expected = os.process_cpu_count() or 1
    else:
        expected = os.cpu_count() or 1
    pool = make_pool()
    assert pool._processes == expected
    assert make_pool(processes=3)._processes == 3


def test_repr_shows_state_and_size(impl, make_pool):
    pool = make_pool(processes=2)
    assert pool.apply_async(T.square, (2,)).get(timeout=TIMEOUT) == 4
    assert "state=RUN" in repr(pool) and "pool_size=2" in repr(pool), repr(pool)
    pool.close()
    assert "state=CLOSE" in repr(pool), repr(pool)
    pool.terminate()
    assert "state=TERMINATE" in repr(pool), repr(pool)


def test_initializer_and_initargs(impl, make_pool):
    channel = SPAWN.Queue()
    try:
        pool = make_pool(processes=2, initializer=T.remember_and_report,
                         initargs=("token-1", channel))
        token, pid, ident = pool.apply_async(T.initialized_with).get(timeout=TIMEOUT)
        assert token == "token-1"
        # Every worker reports once, when it starts; the one that ran the task is among them.
        where = (lambda r: r[1]) if impl in PROCESS_BASED else (lambda r: r[1:])
        ran_in = where((token, pid, ident))
        reports = [channel.get(timeout=TIMEOUT)]
        while ran_in not in {where(r) for r in reports}:
            reports.append(channel.get(timeout=TIMEOUT))
        assert all(r[0] == "token-1" for r in reports)
    finally:
        channel.close()
        channel.join_thread()


def test_context_argument_is_accepted_positionally(impl):
    only(impl, *PROCESS_BASED, reason="ThreadPool takes no context")
    # Pool(processes, initializer, initargs, maxtasksperchild, context): the
    # class itself, not the context-bound factory, with every argument in place.
    cls = futurepool.Pool if impl == "futurepool" else mp_pool.Pool
    pool = cls(1, T.log_start, (os.devnull,), 5, SPAWN)
    try:
        assert pool.apply_async(T.square, (6,)).get(timeout=TIMEOUT) == 36
    finally:
        end_pool(pool)


def test_maxtasksperchild_recycles_workers(impl, make_pool):
    only(impl, *PROCESS_BASED, reason="threads are not recycled")
    pool = make_pool(processes=1, maxtasksperchild=2)
    pids = [pool.apply_async(T.getpid).get(timeout=TIMEOUT) for _ in range(4)]
    assert pids[0] == pids[1] != pids[2] == pids[3], pids


# --- apply and apply_async ---------------------------------------------------------


def test_apply_returns_the_result(make_pool):
    pool = make_pool(processes=1)
    assert bounded(pool.apply, T.noop) is None
    assert bounded(pool.apply, T.square, (7,)) == 49
    assert bounded(pool.apply, T.add, (1,), {"y": 2}) == 3
    assert bounded(pool.apply, T.add, kwds={"x": 5}) == 5
    # args may be any sequence; names of apply's own parameters are free for the task.
    assert bounded(pool.apply, T.echo, [1, 2]) == ((1, 2), {})
    assert bounded(pool.apply, T.echo, (), {"func": 1, "args": 2, "self": 3}) == (
        (), {"func": 1, "args": 2, "self": 3})


def test_apply_async_result_protocol(make_pool, gates):
    pool = make_pool(processes=1)
    gate = gates.new()
    result = pool.apply_async(T.block, (gate,), {"value": "late"})
    assert not result.ready()
    with pytest.raises(ValueError) as info:
        result.successful()
    assert str(info.value) == f"{result!r} not ready"
    started = time.monotonic()
    assert result.wait(SHORT) is None
    assert time.monotonic() - started >= SHORT * 0.9
    assert not result.ready()
    expect_timeout(result.get, SHORT)
    expect_timeout(result.get, 0)
    gates.open(gate)
    assert result.wait(TIMEOUT) is None
    assert result.ready()
    assert result.successful() is True
    assert result.get(timeout=0) == "late"
    assert result.get() == "late"  # again, and without a timeout now that it is ready


def test_exception_keeps_its_type(impl, make_pool):
    pool = make_pool(processes=1)
    result = pool.apply_async(T.raise_error, ("boom",))
    with pytest.raises(T.CustomError) as info:
        result.get(timeout=TIMEOUT)
    error = info.value
    assert type(error) is T.CustomError and error.args == ("boom",)
    assert result.ready() and result.successful() is False
    if impl in PROCESS_BASED:
        # The worker's traceback text, as multiprocessing.Pool attaches it.
        assert type(error.__cause__) is mp_pool.RemoteTraceback
        assert "raise CustomError(message)" in str(error.__cause__)
    with pytest.raises(T.CustomError, match="^again$"):
        bounded(pool.apply, T.raise_error, ("again",))
    assert pool.apply_async(T.square, (3,)).get(timeout=TIMEOUT) == 9


@pytest.mark.parametrize("argument", ["lock", "pool"])
def test_an_unpicklable_argument_fails_the_call(impl, make_pool, argument):
    only(impl, *PROCESS_BASED, reason="threads pickle nothing")
    pool = make_pool(processes=1)
    value = threading.Lock() if argument == "lock" else pool
    original = TypeError if argument == "lock" else NotImplementedError
    # Raised by get() in the stdlib (its task handler pickles); futurepool
    # pickles in apply_async but fails the result the same way.
    with pytest.raises(original) as info:
        pool.apply_async(T.identity, (value,)).get(timeout=TIMEOUT)
    assert type(info.value) is original
    assert pool.apply_async(T.square, (3,)).get(timeout=TIMEOUT) == 9


def test_an_unpicklable_result_is_a_maybe_encoding_error(impl, make_pool):
    only(impl, *PROCESS_BASED, reason="threads pickle nothing")
    pool = make_pool(processes=1)
    with pytest.raises(mp_pool.MaybeEncodingError) as info:
        pool.apply_async(T.make_lock).get(timeout=TIMEOUT)
    error = info.value
    assert type(error) is mp_pool.MaybeEncodingError
    assert error.value.startswith("<unlocked _thread.lock object at ")
    assert error.exc == "TypeError(\"cannot pickle '_thread.lock' object\")"
    assert str(error) == f"Error sending result: '{error.value}'. Reason: '{error.exc}'"
    # In a map, the chunk with the bad item fails the call; the pool goes on.
    with pytest.raises(mp_pool.MaybeEncodingError):
        bounded(pool.map, T.lock_unless_zero, [0, 1, 0])
    assert bounded(pool.map, T.square, [1, 2]) == [1, 4]


def test_pickling_a_pool_is_refused(make_pool):
    pool = make_pool(processes=1)
    for dumps in (pickle.dumps, lambda p: pickle.dumps([p], protocol=2)):
        with pytest.raises(NotImplementedError) as info:
            dumps(pool)
        assert str(info.value) == "pool objects cannot be passed between processes or pickled"


# --- callbacks -----------------------------------------------------------------------


def test_callback_runs_once_on_another_thread_before_get_returns(make_pool):
    pool = make_pool(processes=2)
    calls = []
    result = pool.apply_async(T.square, (7,), callback=lambda v: calls.append(
        (v, threading.get_ident())), error_callback=lambda e: calls.append(("error", e)))
    assert result.get(timeout=TIMEOUT) == 49
    # The stdlib runs the callback before it marks the result ready.
    assert len(calls) == 1, calls
    value, thread = calls[0]
    assert value == 49
    assert thread != threading.get_ident(), "the callback ran on the caller's thread"


def test_error_callback_runs_once_with_the_exception(make_pool):
    pool = make_pool(processes=1)
    calls = []
    result = pool.apply_async(T.raise_error, ("bad",), callback=lambda v: calls.append(("ok", v)),
                              error_callback=lambda e: calls.append((e, threading.get_ident())))
    with pytest.raises(T.CustomError, match="^bad$"):
        result.get(timeout=TIMEOUT)
    assert len(calls) == 1, calls
    error, thread = calls[0]
    assert type(error) is T.CustomError and error.args == ("bad",)
    assert thread != threading.get_ident()


def test_callbacks_have_all_run_after_close_and_join(make_pool):
    # The usual pattern: collect through callbacks, then close(); join().
    pool = make_pool(processes=2)
    values, errors = [], []
    for i in range(-5, 15):
        pool.apply_async(T.raise_if_negative, (i,), callback=values.append,
                         error_callback=errors.append)
    pool.close()
    bounded(pool.join)
    assert sorted(values) == list(range(15))
    assert sorted(str(e) for e in errors) == sorted(f"negative: {i}" for i in range(-5, 0))


def test_map_async_callback_gets_the_whole_list_once(make_pool):
    pool = make_pool(processes=2)
    calls = []
    result = pool.map_async(T.square, range(20), chunksize=3,
                            callback=lambda v: calls.append((v, threading.get_ident())),
                            error_callback=lambda e: calls.append(("error", e)))
    assert result.get(timeout=TIMEOUT) == [x * x for x in range(20)]
    assert len(calls) == 1, calls
    assert calls[0][0] == [x * x for x in range(20)]
    assert calls[0][1] != threading.get_ident()


def test_map_async_error_callback_gets_the_failure_once(make_pool):
    pool = make_pool(processes=2)
    calls = []
    result = pool.map_async(T.raise_if_negative, [1, -2, 3, 4, 5], chunksize=1,
                            callback=lambda v: calls.append(("ok", v)),
                            error_callback=lambda e: calls.append((e, threading.get_ident())))
    with pytest.raises(T.CustomError, match="^negative: -2$"):
        result.get(timeout=TIMEOUT)
    assert result.successful() is False
    assert len(calls) == 1, calls
    error, thread = calls[0]
    assert type(error) is T.CustomError and str(error) == "negative: -2"
    assert thread != threading.get_ident()


def test_starmap_async_callbacks(make_pool):
    pool = make_pool(processes=2)
    got, failed = [], []
    ok = pool.starmap_async(T.add, [(1, 2), (3, 4)], callback=got.append,
                            error_callback=failed.append)
    assert ok.get(timeout=TIMEOUT) == [3, 7]
    bad = pool.starmap_async(T.raise_if_negative, [(1,), (-1,)], callback=got.append,
                             error_callback=failed.append)
    with pytest.raises(T.CustomError):
        bad.get(timeout=TIMEOUT)
    assert got == [[3, 7]]
    assert [str(e) for e in failed] == ["negative: -1"]


# --- map and starmap -------------------------------------------------------------------


def _inputs(n):
    """The same n items as several kinds of iterable, with and without __len__."""
    return {
        "list": list(range(n)),
        "tuple": tuple(range(n)),
        "range": range(n),
        "generator": (i for i in range(n)),
        "dict": dict.fromkeys(range(n)),
    }


@pytest.mark.parametrize("kind", ["list", "tuple", "range", "generator", "dict"])
def test_map_keeps_input_order(make_pool, kind):
    pool = make_pool(processes=2)
    assert bounded(pool.map, T.square, _inputs(30)[kind]) == [x * x for x in range(30)]
    assert pool.map_async(T.square, _inputs(30)[kind]).get(timeout=TIMEOUT) == [
        x * x for x in range(30)]
    assert bounded(pool.map, T.square, _inputs(0)[kind]) == []
    assert pool.map_async(T.square, _inputs(0)[kind]).get(timeout=TIMEOUT) == []


def test_map_raises_the_failure(make_pool):
    pool = make_pool(processes=2)
    with pytest.raises(T.CustomError, match="^negative: -3$"):
        bounded(pool.map, T.raise_if_negative, [1, 2, -3, 4])
    result = pool.map_async(T.raise_if_negative, [1, 2, -3, 4])
    with pytest.raises(T.CustomError, match="^negative: -3$"):
        result.get(timeout=TIMEOUT)
    assert bounded(pool.map, T.square, [5]) == [25]


def test_map_reads_its_input_in_the_call(make_pool):
    # The stdlib turns an iterable without __len__ into a list in the
    # caller's thread: an error while iterating is raised by the call itself.
    pool = make_pool(processes=1)

    def failing():
        yield 1
        raise T.CustomError("input failed")

    with pytest.raises(T.CustomError, match="^input failed$"):
        bounded(pool.map, T.square, failing())
    with pytest.raises(T.CustomError, match="^input failed$"):
        pool.map_async(T.square, failing())
    with pytest.raises(T.CustomError, match="^input failed$"):
        pool.starmap_async(T.add, ((x,) for x in failing()))
    assert bounded(pool.map, T.square, [2]) == [4]


def test_map_async_result_protocol(make_pool, gates):
    pool = make_pool(processes=2)
    gate = gates.new()
    result = pool.map_async(T.gated_item, [(0, None), (1, gate), (2, None)], chunksize=1)
    assert not result.ready()
    with pytest.raises(ValueError) as info:
        result.successful()
    assert str(info.value) == f"{result!r} not ready"
    assert result.wait(SHORT) is None and not result.ready()
    expect_timeout(result.get, SHORT)
    gates.open(gate)
    assert result.get(timeout=TIMEOUT) == [0, 1, 2]
    assert result.ready() and result.successful() is True


@pytest.mark.parametrize("n", [7, 16, 100])
@pytest.mark.parametrize("kind", ["list", "generator"])
def test_default_chunksize_is_the_stdlib_formula(impl, make_pool, n, kind):
    """ceil(len / (4 * processes)), seen from inside the chunks (see ``_tasks.Marker``)."""
    only(impl, *PROCESS_BASED, reason="a ThreadPool shares the items instead of pickling chunks")
    pool = make_pool(processes=2)
    marker = T.Marker()
    items = [marker] * n if kind == "list" else (marker for _ in range(n))
    expected = chunk_positions(n, stdlib_default_chunksize(n, 2))
    assert bounded(pool.map, T.chunk_position, items) == expected
    pairs = [(marker, i) for i in range(n)]
    assert bounded(pool.starmap, T.chunk_position_of_pair, pairs) == expected
    assert pool.map_async(T.chunk_position, [marker] * n).get(timeout=TIMEOUT) == expected


@pytest.mark.parametrize("chunksize", [1, 5, 30])
def test_explicit_chunksize(impl, make_pool, chunksize):
    pool = make_pool(processes=2)
    n = 23
    if impl in PROCESS_BASED:
        marker = T.Marker()
        expected = chunk_positions(n, chunksize)
        assert bounded(pool.map, T.chunk_position, [marker] * n, chunksize) == expected
        result = pool.starmap_async(T.chunk_position_of_pair, [(marker, 0)] * n, chunksize)
        assert result.get(timeout=TIMEOUT) == expected
    assert bounded(pool.map, T.square, range(n), chunksize=chunksize) == [
        x * x for x in range(n)]


def test_starmap_forms(make_pool):
    pool = make_pool(processes=2)
    assert bounded(pool.starmap, T.add, [(1, 2), (3, 4)]) == [3, 7]
    assert bounded(pool.starmap, T.add, [[1, 2], [3, 4]]) == [3, 7]
    assert bounded(pool.starmap, T.add, ((i, i) for i in range(10))) == [2 * i for i in range(10)]
    assert bounded(pool.starmap, T.square, [(1,), (2,)]) == [1, 4]
    assert bounded(pool.starmap, T.noop, [(), ()]) == [None, None]
    assert bounded(pool.starmap, T.add, []) == []
    assert bounded(pool.starmap, T.add, [(i, 1) for i in range(25)], 4) == list(range(1, 26))
    assert pool.starmap_async(T.add, [(5, 5)]).get(timeout=TIMEOUT) == [10]
    with pytest.raises(T.CustomError, match="^negative: -1$"):
        bounded(pool.starmap, T.raise_if_negative, [(1,), (-1,)])


# --- imap and imap_unordered -------------------------------------------------------------


def test_imap_keeps_order_and_imap_unordered_does_not(make_pool, gates, tmp_path):
    pool = make_pool(processes=2)
    done = tmp_path / "done"
    done.mkdir()
    n = 10

    def items(gate):
        return [(0, gate, str(done))] + [(i, None, str(done)) for i in range(1, n)]

    # imap: item 0 is stuck behind its gate, so nothing can be yielded yet,
    # although later items are done meanwhile.
    first_gate = gates.new()
    ordered = pool.imap(T.gated_note, items(first_gate))
    assert iter(ordered) is ordered
    assert wait_until(lambda: len(os.listdir(done)) >= 1, TIMEOUT), "no other item ran"
    expect_timeout(ordered.next, SHORT)
    gates.open(first_gate)
    assert take(ordered, n) == list(range(n))
    with pytest.raises(StopIteration):
        ordered.next(timeout=TIMEOUT)

    # imap_unordered: a result is yielded as soon as it is there.
    second_gate = gates.new()
    unordered = pool.imap_unordered(T.gated_note, items(second_gate))
    assert iter(unordered) is unordered
    first = unordered.next(timeout=TIMEOUT)
    assert first != 0
    gates.open(second_gate)
    rest = take(unordered, n - 1)
    assert sorted([first, *rest]) == list(range(n))
    with pytest.raises(StopIteration):
        unordered.next(timeout=TIMEOUT)


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_next_timeout(make_pool, gates, method):
    pool = make_pool(processes=1)
    gate = gates.new()
    iterator = getattr(pool, method)(T.gated_item, [(0, None), (1, gate), (2, None)])
    assert iterator.next(timeout=TIMEOUT) == 0
    expect_timeout(iterator.next, SHORT)
    expect_timeout(iterator.__next__, SHORT)  # the same method, as the stdlib's
    gates.open(gate)
    assert sorted(take(iterator, 2)) == [1, 2]
    with pytest.raises(StopIteration):
        iterator.next(timeout=TIMEOUT)
    with pytest.raises(StopIteration):
        bounded(next, iterator)


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [1, 3, 50])
def test_imap_chunksize(impl, make_pool, method, chunksize):
    pool = make_pool(processes=2)
    n = 20
    results = getattr(pool, method)(T.square, range(n), chunksize)
    got = take(results, n)
    expected = [x * x for x in range(n)]
    assert (got if method == "imap" else sorted(got)) == expected
    with pytest.raises(StopIteration):
        take(results, 1)
    if impl in PROCESS_BASED and method == "imap":
        marker = T.Marker()
        positions = pool.imap(T.chunk_position, [marker] * n, chunksize=chunksize)
        assert take(positions, n) == chunk_positions(n, chunksize)


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [0, -1])
def test_imap_chunksize_below_one_is_refused(make_pool, method, chunksize):
    pool = make_pool(processes=1)
    with pytest.raises(ValueError) as info:
        getattr(pool, method)(T.square, [1, 2], chunksize)
    assert str(info.value) == f"Chunksize must be 1+, not {chunksize}"


def test_imap_failure_is_raised_at_its_position_and_the_rest_follows(make_pool):
    pool = make_pool(processes=2)
    results = pool.imap(T.raise_if_negative, [0, 1, -2, 3, 4])
    assert take(results, 2) == [0, 1]
    with pytest.raises(T.CustomError, match="^negative: -2$"):
        results.next(timeout=TIMEOUT)
    assert take(results, 2) == [3, 4]
    with pytest.raises(StopIteration):
        results.next(timeout=TIMEOUT)

    unordered = pool.imap_unordered(T.raise_if_negative, [0, -1, 2])
    got, failures = [], []
    for _ in range(3):
        try:
            got.append(unordered.next(timeout=TIMEOUT))
        except T.CustomError as exc:
            failures.append(str(exc))
    assert sorted(got) == [0, 2] and failures == ["negative: -1"]


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_input_that_fails_while_iterated(make_pool, method):
    # The stdlib reads imap's input on its task-handler thread: the error
    # becomes the next result after the items read before it, then the end.
    pool = make_pool(processes=1)

    def failing():
        yield 1
        yield 2
        raise T.CustomError("input failed")

    results = getattr(pool, method)(T.square, failing())
    assert sorted(take(results, 2)) == [1, 4]
    with pytest.raises(T.CustomError, match="^input failed$"):
        results.next(timeout=TIMEOUT)
    with pytest.raises(StopIteration):
        results.next(timeout=TIMEOUT)


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_of_nothing(make_pool, method):
    pool = make_pool(processes=1)
    for chunksize in (1, 4):
        results = getattr(pool, method)(T.square, iter([]), chunksize)
        with pytest.raises(StopIteration):
            take(results, 1)


def _counting(counter, limit=None):
    """An iterator over 0, 1, 2, ... that counts, in ``counter[0]``, what was taken from it."""
    for i in itertools.count():
        if limit is not None and i >= limit:
            return
        counter[0] += 1
        yield i


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_reads_its_input_lazily_by_default(impl, make_pool, method):
    # Intended difference (futurepool/pool.py docstring): the stdlib's task
    # handler reads the whole input ahead of the consumer; futurepool stays a
    # bounded window ahead of it, so an endless input works.
    only(impl, "futurepool", reason="the stdlib reads imap's input without a bound")
    pool = make_pool(processes=2)
    consumed = [0]
    results = getattr(pool, method)(T.square, _counting(consumed))
    got = take(results, 50)
    if method == "imap":
        assert got == [x * x for x in range(50)]
    else:  # any 50 of the items read so far, each once
        assert len(set(got)) == 50 and set(got) <= {x * x for x in range(consumed[0])}
    time.sleep(SHORT)  # an eager reader would race ahead meanwhile
    ahead = consumed[0] - 50
    assert 0 <= ahead <= 100, f"{ahead} items read ahead of the consumer"
    time.sleep(SHORT)
    assert consumed[0] - 50 == ahead, "reading went on while nobody consumed"


def _needs_imap_buffersize(impl):
    # Intended difference: futurepool's imap/imap_unordered take buffersize
    # on every Python version (the stdlib's arrives in 3.16, gh-64192).
    if impl != "futurepool" and sys.version_info < (3, 16):
        pytest.skip("imap(buffersize=) is new in Python 3.16")


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [1, 2])
def test_imap_buffersize_bounds_reading_ahead(impl, make_pool, method, chunksize):
    _needs_imap_buffersize(impl)
    pool = make_pool(processes=2)
    consumed = [0]
    buffersize = 3
    results = getattr(pool, method)(T.square, _counting(consumed), chunksize,
                                    buffersize=buffersize)
    # buffersize counts tasks (chunks) handed out and not yet consumed.
    assert wait_until(lambda: consumed[0] >= buffersize * chunksize, TIMEOUT), consumed
    time.sleep(SHORT)
    assert consumed[0] == buffersize * chunksize
    taken = 1 + 2 * chunksize
    got = take(results, taken)
    if method == "imap":
        assert got == [x * x for x in range(taken)]
    else:  # whole chunks in completion order: any items read so far, each once
        assert len(set(got)) == taken and set(got) <= {x * x for x in range(consumed[0])}
    tasks_taken = -(-taken // chunksize)
    limit = (buffersize + tasks_taken) * chunksize
    assert wait_until(lambda: consumed[0] >= limit, TIMEOUT), (consumed, limit)
    time.sleep(SHORT)
    assert consumed[0] == limit, f"{consumed[0]} items read, {limit} allowed"


def test_imap_buffersize_is_validated(impl, make_pool):
    _needs_imap_buffersize(impl)
    pool = make_pool(processes=1)
    for method in ("imap", "imap_unordered"):
        with pytest.raises(ValueError, match="buffersize"):
            getattr(pool, method)(T.square, [1], buffersize=0)
        with pytest.raises(TypeError, match="buffersize"):
            getattr(pool, method)(T.square, [1], buffersize="2")
    assert take(pool.imap(T.square, [1, 2], buffersize=1), 2) == [1, 4]


# --- close, terminate, join, the context manager ------------------------------------------

CALLS_AFTER_CLOSE = {
    "apply": lambda pool: pool.apply(T.square, (1,)),
    "apply_async": lambda pool: pool.apply_async(T.square, (1,)),
    "map": lambda pool: pool.map(T.square, [1]),
    "map_async": lambda pool: pool.map_async(T.square, [1]),
    "starmap": lambda pool: pool.starmap(T.add, [(1, 2)]),
    "starmap_async": lambda pool: pool.starmap_async(T.add, [(1, 2)]),
    "imap": lambda pool: pool.imap(T.square, [1]),
    "imap_unordered": lambda pool: pool.imap_unordered(T.square, [1]),
    "imap_chunks": lambda pool: pool.imap(T.square, [1], 2),
    "__enter__": lambda pool: pool.__enter__(),
}


@pytest.mark.parametrize("ending", ["close", "terminate"])
def test_every_call_after_close_or_terminate_raises(make_pool, ending):
    pool = make_pool(processes=1)
    assert pool.apply_async(T.square, (2,)).get(timeout=TIMEOUT) == 4
    getattr(pool, ending)()
    for name, call in CALLS_AFTER_CLOSE.items():
        with pytest.raises(ValueError) as info:
            bounded(call, pool)
        assert str(info.value) == "Pool not running", name


def test_join_before_close_raises(make_pool):
    pool = make_pool(processes=1)
    with pytest.raises(ValueError) as info:
        pool.join()
    assert str(info.value) == "Pool is still running"
    assert pool.apply_async(T.square, (2,)).get(timeout=TIMEOUT) == 4


def test_close_then_join_waits_for_outstanding_work(make_pool, gates):
    pool = make_pool(processes=2)
    gate = gates.new()
    slow = pool.apply_async(T.block, (gate,), {"value": "slow"})
    mapped = pool.map_async(T.square, range(10))
    pool.close()
    joined = threading.Event()
    joiner = threading.Thread(target=lambda: (pool.join(), joined.set()), name="joiner")
    joiner.start()
    try:
        assert not joined.wait(SHORT), "join() returned while a task was still running"
        gates.open(gate)
        assert joined.wait(TIMEOUT), "join() did not return after the work was done"
    finally:
        gates.open(gate)
        joiner.join(TIMEOUT)
    assert slow.ready() and slow.get(timeout=0) == "slow"
    assert mapped.get(timeout=0) == [x * x for x in range(10)]


def test_close_and_terminate_are_idempotent(make_pool):
    pool = make_pool(processes=1)
    pool.close()
    pool.close()
    bounded(pool.join)
    bounded(pool.join)
    bounded(pool.terminate)
    bounded(pool.terminate)
    other = make_pool(processes=1)
    bounded(other.terminate)
    other.close()
    bounded(other.join)


def test_terminate_stops_running_work(impl, make_pool, gates):
    only(impl, *PROCESS_BASED, reason="a thread cannot be stopped")
    pool = make_pool(processes=1)
    gate = gates.new()
    started = gates.marker("started")
    running = pool.apply_async(T.block, (gate, started))
    queued = pool.apply_async(T.square, (3,))
    pid = read_pid(started)
    began = time.monotonic()
    bounded(pool.terminate)
    assert time.monotonic() - began < 10.0
    assert wait_until(lambda: pid_gone(pid), 10.0), "the worker still runs after terminate()"
    bounded(pool.join)
    if impl == "process":
        # The stdlib leaves both results pending for ever.
        expect_timeout(running.get, SHORT)
        expect_timeout(queued.get, SHORT)
    else:
        # Intended difference (futurepool/pool.py docstring): after
        # terminate() the running task fails as a crash, the queued one as
        # cancelled; neither stays pending.
        with pytest.raises(futurepool.WorkerCrashedError):
            running.get(timeout=TIMEOUT)
        with pytest.raises(CancelledError):
            queued.get(timeout=TIMEOUT)


def test_context_manager_enters_the_pool_and_exit_terminates(impl, make_pool, gates):
    gate = gates.new()
    started = gates.marker("started")
    with make_pool(processes=1) as pool:
        running = pool.apply_async(T.block, (gate, started))
        pid = read_pid(started)
        exited = time.monotonic()
    # __exit__ is terminate(), not close() + join(): it did not wait for the task.
    assert time.monotonic() - exited < 10.0
    with pytest.raises(ValueError, match="^Pool not running$"):
        pool.apply_async(T.square, (1,))
    assert "state=TERMINATE" in repr(pool)
    if impl in PROCESS_BASED:
        assert wait_until(lambda: pid_gone(pid), 10.0), "the task's worker outlived __exit__"
        if impl == "process":
            expect_timeout(running.get, SHORT)
        else:
            with pytest.raises(futurepool.WorkerCrashedError):
                running.get(timeout=TIMEOUT)
    gates.open(gate)  # a thread runs on; let it finish before join()
    bounded(pool.join)


def test_enter_returns_the_pool_itself(make_pool):
    pool = make_pool(processes=1)
    with pool as entered:
        assert entered is pool
        assert entered.apply_async(T.square, (4,)).get(timeout=TIMEOUT) == 16


def test_context_manager_does_not_swallow_exceptions(make_pool):
    with pytest.raises(KeyError, match="mine"):
        with make_pool(processes=1) as pool:
            assert pool.apply_async(T.square, (3,)).get(timeout=TIMEOUT) == 9
            raise KeyError("mine")


def test_a_running_pool_collected_by_gc_warns(impl):
    # No task first: a finished result may hold its pool for a moment on the
    # pool's own result thread (the stdlib's ApplyResult drops it after
    # setting the value), which would move the collection out of this block.
    pool = FACTORIES[impl](processes=1)
    ref = weakref.ref(pool)
    try:
        with pytest.warns(ResourceWarning, match="^unclosed running multiprocessing pool"):
            del pool
            gc.collect()
        # warn(source=pool) let the recorded warning keep the pool alive until
        # now; with the record gone, it must go.
        assert wait_until(lambda: (gc.collect(), ref() is None)[1], TIMEOUT), (
            "the pool was not collected")
    finally:
        if ref() is not None:
            end_pool(ref())
    # Its workers and threads must go too: the autouse leak check sees to that.


def test_a_finished_pool_collected_by_gc_is_quiet(impl):
    pool = FACTORIES[impl](processes=1)
    assert pool.apply_async(T.square, (3,)).get(timeout=TIMEOUT) == 9
    end_pool(pool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del pool
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], caught


# --- result types ------------------------------------------------------------------------


def test_result_types_are_generic(make_pool):
    pool = make_pool(processes=1)
    for result in (pool.apply_async(T.square, (2,)), pool.map_async(T.square, [2])):
        result_type = type(result)
        alias = result_type[int]
        assert isinstance(alias, types.GenericAlias)
        assert typing.get_origin(alias) is result_type and typing.get_args(alias) == (int,)
        result.get(timeout=TIMEOUT)


# --- the signatures are the stdlib's ---------------------------------------------------------

#: multiprocessing.pool.Pool's documented methods in CPython 3.13 (identical
#: from 3.10 on) ...
STDLIB_313_POOL = {
    "__init__": "(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None, "
                "context=None)",
    "apply": "(self, func, args=(), kwds={})",
    "apply_async": "(self, func, args=(), kwds={}, callback=None, error_callback=None)",
    "map": "(self, func, iterable, chunksize=None)",
    "map_async": "(self, func, iterable, chunksize=None, callback=None, error_callback=None)",
    "starmap": "(self, func, iterable, chunksize=None)",
    "starmap_async": "(self, func, iterable, chunksize=None, callback=None, "
                     "error_callback=None)",
    "imap": "(self, func, iterable, chunksize=1)",
    "imap_unordered": "(self, func, iterable, chunksize=1)",
    "close": "(self)",
    "terminate": "(self)",
    "join": "(self)",
    "__enter__": "(self)",
    "__exit__": "(self, exc_type, exc_val, exc_tb)",
    "__reduce__": "(self)",
}
#: ... with these intended differences, and no other: imap and
#: imap_unordered take ``buffersize`` (as they will in 3.16, gh-64192); the
#: constructor takes keyword-only ``listen`` and ``key_file`` (the cluster) and
#: ``resources`` (what this host offers, issue 12);
#: map, imap and imap_unordered take keyword-only ``progress``
#: (futurepool/progress.py).
INTENDED_POOL = {
    "__init__": "(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,"
                " context=None, *, listen=None, key_file=None, resources=None)",
    "map": "(self, func, iterable, chunksize=None, *, progress=None)",
    "imap": "(self, func, iterable, chunksize=1, buffersize=None, *, progress=None)",
    "imap_unordered": "(self, func, iterable, chunksize=1, buffersize=None, *, progress=None)",
}
#: Public stdlib names that are not pinned: ``Process`` is an undocumented
#: hook (a static method ThreadPool overrides to make threads), not API.
UNPINNED_STDLIB = {"Process"}

#: AsyncResult (= ApplyResult) and MapResult, and the imap iterators.
STDLIB_313_RESULT = {
    "get": "(self, timeout=None)",
    "wait": "(self, timeout=None)",
    "ready": "(self)",
    "successful": "(self)",
}
STDLIB_313_ITERATOR = {
    "next": "(self, timeout=None)",
    "__next__": "(self, timeout=None)",
    "__iter__": "(self)",
}


def test_the_pinned_signatures_are_the_stdlib_ones():
    """The pins above are checked against the running interpreter's multiprocessing.pool."""
    for name, pinned in STDLIB_313_POOL.items():
        assert str(inspect.signature(getattr(mp_pool.Pool, name))) == pinned, name
    for cls in (mp_pool.ApplyResult, mp_pool.MapResult):
        for name, pinned in STDLIB_313_RESULT.items():
            assert str(inspect.signature(getattr(cls, name))) == pinned, (cls, name)
    for cls in (mp_pool.IMapIterator, mp_pool.IMapUnorderedIterator):
        for name, pinned in STDLIB_313_ITERATOR.items():
            assert str(inspect.signature(getattr(cls, name))) == pinned, (cls, name)
    public = {name for name, _ in inspect.getmembers(mp_pool.Pool, callable)
              if not name.startswith("_")}
    assert public == {n for n in STDLIB_313_POOL if not n.startswith("_")} | UNPINNED_STDLIB


def _needs_futurepool_pool():
    if not hasattr(futurepool, "Pool"):
        pytest.skip("futurepool.Pool does not exist yet")


@pytest.mark.parametrize("name", sorted(STDLIB_313_POOL))
def test_pool_signatures_match_the_stdlib(name):
    _needs_futurepool_pool()
    expected = {**STDLIB_313_POOL, **INTENDED_POOL}[name]
    assert str(inspect.signature(getattr(futurepool.Pool, name))) == expected


def test_every_public_pool_method_is_pinned():
    _needs_futurepool_pool()
    public = {name for name, _ in inspect.getmembers(futurepool.Pool, callable)
              if not name.startswith("_")}
    assert public == {name for name in STDLIB_313_POOL if not name.startswith("_")} \
        | set(FUTUREPOOL_ONLY_POOL)
    for name, pinned in FUTUREPOOL_ONLY_POOL.items():
        assert str(inspect.signature(getattr(futurepool.Pool, name))) == pinned


#: Documented extensions: not in the stdlib's Pool (issue 12).
FUTUREPOOL_ONLY_POOL = {"options": "(self, **options)"}


def test_result_and_iterator_signatures_match_the_stdlib():
    _needs_futurepool_pool()
    pool = futurepool.Pool(processes=1)
    try:
        kinds = {
            "AsyncResult": (pool.apply_async(T.square, (2,)), STDLIB_313_RESULT),
            "MapResult": (pool.map_async(T.square, [2]), STDLIB_313_RESULT),
            "IMapIterator": (pool.imap(T.square, [2]), STDLIB_313_ITERATOR),
            "IMapUnorderedIterator": (pool.imap_unordered(T.square, [2]), STDLIB_313_ITERATOR),
        }
        for kind, (obj, pins) in kinds.items():
            cls = type(obj)
            for name, pinned in pins.items():
                assert str(inspect.signature(getattr(cls, name))) == pinned, (kind, name)
            public = {n for n, _ in inspect.getmembers(cls, callable) if not n.startswith("_")}
            assert public == {n for n in pins if not n.startswith("_")}, (kind, public)
        for obj, _ in kinds.values():
            if hasattr(obj, "get"):
                obj.get(timeout=TIMEOUT)
            else:
                assert list(obj) == [4]
    finally:
        end_pool(pool)


def test_results_are_async_result_like_the_stdlib_alias():
    # multiprocessing.pool.AsyncResult is ApplyResult (bpo-17805); MapResult
    # derives from it. Code that annotates or checks with the pool's own
    # classes sees the same relations.
    _needs_futurepool_pool()
    pool = futurepool.Pool(processes=1)
    try:
        apply_result = pool.apply_async(T.square, (2,))
        map_result = pool.map_async(T.square, [2])
        assert isinstance(map_result, type(apply_result))
        apply_result.get(timeout=TIMEOUT)
        map_result.get(timeout=TIMEOUT)
    finally:
        end_pool(pool)
