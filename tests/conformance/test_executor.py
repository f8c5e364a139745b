"""One behaviour suite for ``concurrent.futures`` executors, bound to several implementations.

Each test below is written once and runs against every implementation in
:data:`IMPLEMENTATIONS` through the ``impl`` / ``make_executor`` fixtures
(STYLE.md §13, the CPython and loky pattern):

* ``futurepool`` -- :class:`futurepool.Executor`, the implementation under test;
* ``process``    -- ``concurrent.futures.ProcessPoolExecutor`` with the
  ``spawn`` context, the reference futurepool is a drop-in for;
* ``thread``     -- ``concurrent.futures.ThreadPoolExecutor``, where the
  behaviour is meaningful for threads.

A divergence from the stdlib is either a bug or one of the intended
differences listed in ``futurepool/executor.py``'s docstring; those are
spelled out in the tests that meet them (search for "Intended difference").

Tasks are module-level functions: the spawn workers import this module by
name. Tasks that must stay busy wait on a *gate* file the test creates
(:class:`Gates`), never on a fixed sleep, and every wait has a deadline.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import subprocess
import sys
import textwrap
import threading
import time
import types
import typing
from concurrent.futures.process import _RemoteTraceback

import pytest

import futurepool
from futurepool.testing import run_driver, wait_until
from tests.conformance._support import Gates, only
from tests.conformance._tasks import (
    CustomError,
    add,
    block,
    getpid,
    raise_error,
    raise_if_negative,
    square,
    touch,
    wait_for_path,
)

#: Seconds any single result may take (a spawn worker starts in well under that).
TIMEOUT = 30.0
#: Seconds a task waits for its gate before giving up (so nothing hangs forever).
SPAWN = multiprocessing.get_context("spawn")

IMPLEMENTATIONS = ["futurepool", "process", "thread"]
PROCESS_BASED = ("futurepool", "process")


def _make_process_pool(*args, **kwargs):
    kwargs.setdefault("mp_context", SPAWN)
    return cf.ProcessPoolExecutor(*args, **kwargs)


FACTORIES = {
    "futurepool": futurepool.Executor,
    "process": _make_process_pool,
    "thread": cf.ThreadPoolExecutor,
}


# --- tasks (module level: spawn workers import them) -------------------------


def echo_kwargs(**kwargs):
    return kwargs


def pid_of_item(x):
    return x, os.getpid()


def exit_with(code):
    sys.exit(code)


def record_run(directory, index, gate, free_below):
    """Leave a trace that item ``index`` started; from ``free_below`` on, wait for ``gate``.

    The free items take 50 ms, so that no implementation takes this function
    for a micro-task (futurepool queues many of those per worker).
    """
    touch(os.path.join(directory, f"ran-{index}"))
    if index >= free_below:
        wait_for_path(gate)
    else:
        time.sleep(0.05)
    return index


def gated(gate):
    """Return at once without a gate, else when the gate file exists."""
    if gate is not None:
        wait_for_path(gate)
    return gate


_initialized_with = None


def remember_and_report(token, channel):
    """Initializer: keep ``token`` for the tasks and tell the test it ran, and where."""
    global _initialized_with
    _initialized_with = token
    channel.put((token, os.getpid()))


def initialized_with(_=None):
    return _initialized_with, os.getpid()


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    return request.param


@pytest.fixture
def make_executor(impl):
    """A factory for executors of the implementation under test, all shut down afterwards.

    Arguments must be given by keyword: the second positional parameter is
    ``mp_context`` for process pools but ``thread_name_prefix`` for threads.
    """
    created = []

    def make(**kwargs):
        executor = FACTORIES[impl](**kwargs)
        created.append(executor)
        return executor

    yield make
    for executor in created:
        executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def gates(make_executor, tmp_path):
    # Depends on make_executor so that its teardown (shutdown, which waits for
    # blocked tasks) runs after the gates are opened.
    g = Gates(str(tmp_path / "gates"))
    yield g
    g.open_all()


# --- submit / result -----------------------------------------------------------


def test_submit_returns_the_result(make_executor):
    executor = make_executor(max_workers=2)
    future = executor.submit(square, 7)
    assert isinstance(future, cf.Future)
    assert future.result(timeout=TIMEOUT) == 49
    assert future.done() and not future.running() and not future.cancelled()
    assert future.exception(timeout=0) is None


def test_submit_passes_keyword_arguments(make_executor):
    executor = make_executor(max_workers=1)
    assert executor.submit(add, 1, y=2).result(timeout=TIMEOUT) == 3
    assert executor.submit(add, x=5).result(timeout=TIMEOUT) == 5
    # fn is positional-only: "fn" and "self" are ordinary keyword arguments of the task.
    collided = executor.submit(echo_kwargs, fn=1, self=2)
    assert collided.result(timeout=TIMEOUT) == {"fn": 1, "self": 2}


def test_exception_keeps_its_type(impl, make_executor):
    executor = make_executor(max_workers=1)
    future = executor.submit(raise_error, "boom")
    with pytest.raises(CustomError, match="^boom$"):
        future.result(timeout=TIMEOUT)
    exc = future.exception(timeout=0)
    assert type(exc) is CustomError and exc.args == ("boom",)
    if impl in PROCESS_BASED:
        # The worker's traceback text, as ProcessPoolExecutor attaches it.
        assert isinstance(exc.__cause__, _RemoteTraceback)
        assert "raise CustomError(message)" in str(exc.__cause__)
    # The pool is fine afterwards.
    assert executor.submit(square, 3).result(timeout=TIMEOUT) == 9


def test_sys_exit_in_a_task_raises_system_exit_and_the_worker_survives(make_executor):
    executor = make_executor(max_workers=1)
    pid = executor.submit(getpid).result(timeout=TIMEOUT)
    with pytest.raises(SystemExit) as info:
        executor.submit(exit_with, 3).result(timeout=TIMEOUT)
    assert info.value.code == 3
    assert executor.submit(getpid).result(timeout=TIMEOUT) == pid


def test_result_timeout_on_a_pending_future(make_executor, gates):
    executor = make_executor(max_workers=1)
    gate = gates.new()
    future = executor.submit(block, gate, None, "late")
    started = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.2)
    assert time.monotonic() - started < 5
    with pytest.raises(cf.TimeoutError):
        future.exception(timeout=0.05)
    gates.open(gate)
    assert future.result(timeout=TIMEOUT) == "late"


# --- map -----------------------------------------------------------------------


def test_map_keeps_input_order(make_executor):
    executor = make_executor(max_workers=2)
    assert list(executor.map(square, range(30), timeout=TIMEOUT)) == [x * x for x in range(30)]
    # Several iterables, stopping at the shortest, as the builtin map.
    assert list(executor.map(add, [1, 2, 3], [10, 20], timeout=TIMEOUT)) == [11, 22]
    assert list(executor.map(square, [], timeout=TIMEOUT)) == []


def test_map_raises_the_first_failure_when_it_is_reached(make_executor):
    executor = make_executor(max_workers=2)
    results = executor.map(raise_if_negative, [1, 2, -3, 4], timeout=TIMEOUT)
    assert next(results) == 1
    assert next(results) == 2
    with pytest.raises(CustomError, match="negative: -3"):
        next(results)


def test_map_timeout_counts_from_the_call(make_executor, gates):
    executor = make_executor(max_workers=1)
    executor.submit(square, 1).result(timeout=TIMEOUT)  # the worker is up
    gate = gates.new()
    called = time.monotonic()
    results = executor.map(block, [gate], timeout=1.0)
    time.sleep(max(0.0, called + 1.2 - time.monotonic()))
    # The deadline passed while we were away: no fresh second of waiting.
    asked = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        next(results)
    assert time.monotonic() - asked < 0.5


@pytest.mark.parametrize("chunksize", [2, 5, 7])
def test_map_chunksize(impl, make_executor, chunksize):
    executor = make_executor(max_workers=2)
    out = list(executor.map(pid_of_item, range(20), timeout=TIMEOUT, chunksize=chunksize))
    assert [item for item, _ in out] == list(range(20))
    if impl in PROCESS_BASED:
        # One chunk is one call in one worker: its items share a pid.
        for start in range(0, 20, chunksize):
            assert len({pid for _, pid in out[start:start + chunksize]}) == 1


def test_map_chunksize_below_one_is_refused(impl, make_executor):
    only(impl, *PROCESS_BASED, reason="ThreadPoolExecutor ignores chunksize")
    executor = make_executor(max_workers=1)
    with pytest.raises(ValueError) as info:
        executor.map(square, [1], chunksize=0)
    assert str(info.value) == "chunksize must be >= 1."


def _needs_buffersize(impl):
    # Intended difference: futurepool.Executor.map takes buffersize on every
    # Python version; the stdlib only from 3.14.
    if impl != "futurepool" and sys.version_info < (3, 14):
        pytest.skip("map(buffersize=) is new in Python 3.14")


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_buffersize_bounds_submission(impl, make_executor, chunksize):
    _needs_buffersize(impl)
    executor = make_executor(max_workers=2)
    consumed = 0

    def endless():
        nonlocal consumed
        for i in itertools.count():
            consumed += 1
            yield i

    # An endless input: only a bounded map can return at all.
    results = executor.map(square, endless(), timeout=TIMEOUT, chunksize=chunksize,
                           buffersize=3)
    assert consumed == 3 * chunksize  # buffersize counts tasks (chunks), not items
    assert next(results) == 0
    assert consumed == 4 * chunksize  # one more submitted as one was taken
    taken = 1 + 3 * chunksize
    assert [next(results) for _ in range(taken - 1)] == [x * x for x in range(1, taken)]
    # Every task taken by the consumer let exactly one more in.
    tasks_taken = -(-taken // chunksize)
    assert consumed == (3 + tasks_taken) * chunksize
    del results  # (closing is test_closing_the_map_iterator_cancels_the_rest's business)


def test_map_buffersize_is_validated(impl, make_executor):
    _needs_buffersize(impl)
    executor = make_executor(max_workers=1)
    with pytest.raises(ValueError) as info:
        executor.map(square, [1], buffersize=0)
    assert str(info.value) == "buffersize must be None or > 0"
    with pytest.raises(TypeError) as info:
        executor.map(square, [1], buffersize="2")
    assert str(info.value) == "buffersize must be an integer or None"


@pytest.mark.parametrize("chunksize", [1, 2])
def test_closing_the_map_iterator_cancels_the_rest(make_executor, gates, tmp_path, chunksize):
    executor = make_executor(max_workers=1)
    gate = gates.new()
    runs = tmp_path / "runs"
    runs.mkdir()
    n = 20
    # The first chunk returns at once; the others are stuck behind the gate, or queued.
    results = executor.map(record_run, [str(runs)] * n, range(n), [gate] * n,
                           [chunksize] * n, timeout=TIMEOUT, chunksize=chunksize)
    assert next(results) == 0
    results.close()
    gates.open(gate)
    executor.shutdown(wait=True)
    ran = len(os.listdir(runs))
    # Only what had already been handed to the worker may still have run: for
    # the stdlib, max_workers + 1 calls; for futurepool the worker's short queue.
    assert ran <= 4 * chunksize, f"{ran} of {n} items ran after the iterator was closed"


def test_map_after_shutdown_raises(make_executor):
    executor = make_executor(max_workers=1)
    executor.shutdown()
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        executor.map(square, [1, 2])


# --- shutdown and the context manager --------------------------------------------


def test_shutdown_wait_true_waits_for_every_future(make_executor):
    executor = make_executor(max_workers=2)
    futures = [executor.submit(square, i) for i in range(10)]
    executor.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result(timeout=0) for f in futures] == [i * i for i in range(10)]
    executor.shutdown(wait=True)  # idempotent


def test_shutdown_wait_false_returns_at_once_and_the_work_completes(make_executor, gates):
    executor = make_executor(max_workers=1)
    gate = gates.new()
    futures = [executor.submit(block, gate, None, i) for i in range(3)]
    started = time.monotonic()
    executor.shutdown(wait=False)
    assert time.monotonic() - started < 2.0  # the tasks are still blocked
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        executor.submit(square, 2)
    gates.open(gate)
    assert [f.result(timeout=TIMEOUT) for f in futures] == [0, 1, 2]


@pytest.mark.parametrize("wait", [True, False])
def test_shutdown_cancel_futures_cancels_only_pending_ones(make_executor, gates, wait):
    executor = make_executor(max_workers=1)
    gate = gates.new()
    started = gates.started_marker()
    running = executor.submit(block, gate, started, "first")
    queued = [executor.submit(square, i) for i in range(10)]
    assert wait_until(lambda: os.path.exists(started), TIMEOUT)
    opener = threading.Timer(0.3, gates.open, (gate,))
    opener.start()
    try:
        executor.shutdown(wait=wait, cancel_futures=True)
    finally:
        opener.join(TIMEOUT)
    assert running.result(timeout=TIMEOUT) == "first"
    assert not running.cancelled()
    cancelled = [f for f in queued if f.cancelled()]
    # The stdlib has already moved max_workers + 1 calls to its queue by now,
    # futurepool its worker's short queue: those run; the rest must not.
    assert len(cancelled) >= len(queued) - 2
    for i, future in enumerate(queued):
        if future.cancelled():
            with pytest.raises(cf.CancelledError):
                future.result(timeout=0)
        else:
            assert future.result(timeout=TIMEOUT) == i * i


def test_context_manager_returns_the_executor_and_waits(make_executor):
    executor = make_executor(max_workers=2)
    with executor as entered:
        assert entered is executor
        futures = [entered.submit(square, i) for i in range(5)]
    assert all(f.done() for f in futures)
    assert [f.result(timeout=0) for f in futures] == [0, 1, 4, 9, 16]
    with pytest.raises(RuntimeError) as info:
        executor.submit(square, 1)
    assert str(info.value) == "cannot schedule new futures after shutdown"


def test_context_manager_does_not_swallow_exceptions(make_executor):
    with pytest.raises(KeyError, match="mine"):
        with make_executor(max_workers=1) as executor:
            assert executor.submit(square, 3).result(timeout=TIMEOUT) == 9
            raise KeyError("mine")


def test_submit_after_shutdown_raises_runtime_error(make_executor):
    executor = make_executor(max_workers=1)
    executor.shutdown(wait=True)
    with pytest.raises(RuntimeError) as info:
        executor.submit(square, 1)
    assert type(info.value) is RuntimeError
    assert str(info.value) == "cannot schedule new futures after shutdown"


def test_shutdown_of_an_executor_that_never_ran_anything(make_executor):
    executor = make_executor(max_workers=2)
    executor.shutdown(wait=True)
    executor.shutdown(wait=False)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(square, 1)


# --- futures -------------------------------------------------------------------


def test_wait_and_as_completed_mix_with_stdlib_futures(make_executor, gates):
    executor = make_executor(max_workers=2)
    gate = gates.new()
    quick = executor.submit(square, 4)
    slow = executor.submit(block, gate, None, "slow")
    failing = executor.submit(raise_error, "bad")
    bare = cf.Future()  # a stdlib future nobody completes until we say so
    with cf.ThreadPoolExecutor(max_workers=1) as threads:
        from_thread = threads.submit(square, 5)

        done, not_done = cf.wait([quick, from_thread, bare, slow], timeout=TIMEOUT,
                                 return_when=cf.FIRST_COMPLETED)
        assert done and done <= {quick, from_thread}
        assert {bare, slow} <= not_done

        done, not_done = cf.wait([failing, bare, slow], timeout=TIMEOUT,
                                 return_when=cf.FIRST_EXCEPTION)
        assert failing in done and {bare, slow} <= not_done

        done, not_done = cf.wait([bare, slow], timeout=0.2)
        assert not done and not_done == {bare, slow}

        # Duplicates are collapsed.
        seen = list(cf.as_completed([quick, quick, from_thread, from_thread], timeout=TIMEOUT))
        assert len(seen) == 2 and set(seen) == {quick, from_thread}

        yielded = []
        with pytest.raises(cf.TimeoutError):
            for future in cf.as_completed([quick, slow, bare], timeout=0.3):
                yielded.append(future)
        assert yielded == [quick]

        gates.open(gate)
        bare.set_result("bare")
        everything = [quick, slow, failing, bare, from_thread]
        done, not_done = cf.wait(everything, timeout=TIMEOUT)
        assert not not_done and done == set(everything)
        assert set(cf.as_completed(everything, timeout=TIMEOUT)) == set(everything)
    assert slow.result(timeout=0) == "slow" and quick.result(timeout=0) == 16


def test_future_type_is_a_generic_alias(make_executor):
    executor = make_executor(max_workers=1)
    future = executor.submit(square, 2)
    future_type = type(future)
    alias = future_type[int]
    assert isinstance(alias, types.GenericAlias)
    assert typing.get_origin(alias) is future_type and typing.get_args(alias) == (int,)
    assert isinstance(future, cf.Future)
    assert future.result(timeout=TIMEOUT) == 4


def test_futurepool_future_is_generic_and_is_what_submit_returns():
    alias = futurepool.Future[int]
    assert typing.get_origin(alias) is futurepool.Future and typing.get_args(alias) == (int,)
    with futurepool.Executor(max_workers=1) as executor:
        future = executor.submit(square, 3)
        assert type(future) is futurepool.Future
        assert future.result(timeout=TIMEOUT) == 9


def test_add_done_callback(make_executor, gates, caplog):
    executor = make_executor(max_workers=1)
    gate = gates.new()
    future = executor.submit(block, gate, None, "value")
    calls = queue.Queue()

    def failing_callback(f):
        raise CustomError("callback failed")

    future.add_done_callback(lambda f: calls.put(("first", f)))
    future.add_done_callback(failing_callback)
    future.add_done_callback(lambda f: calls.put(("third", f)))
    assert calls.empty()
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        gates.open(gate)
        # Callbacks run once each, in order; one raising does not stop the others.
        assert calls.get(timeout=TIMEOUT) == ("first", future)
        assert calls.get(timeout=TIMEOUT) == ("third", future)
        assert future.result(timeout=0) == "value"
        assert wait_until(lambda: any("exception calling callback" in r.getMessage()
                                      for r in caplog.records), TIMEOUT)
    assert calls.empty()

    # On a future that is already done, the callback runs at once, in this thread.
    here = []
    future.add_done_callback(lambda f: here.append((f, threading.current_thread())))
    assert here == [(future, threading.current_thread())]
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        future.add_done_callback(failing_callback)  # logged, not raised
    assert any("exception calling callback" in r.getMessage() for r in caplog.records)


def test_cancel_pending_but_not_running_futures(make_executor, gates):
    executor = make_executor(max_workers=1)
    gate = gates.new()
    started = gates.started_marker()
    running = executor.submit(block, gate, started, "ran")
    # The stdlib moves max_workers + 1 calls to its call queue (they count as
    # running); futurepool gives a worker a short queue. The last one waits.
    fillers = [executor.submit(square, i) for i in range(2)]
    pending = executor.submit(square, 10)
    assert wait_until(lambda: os.path.exists(started), TIMEOUT)

    assert running.running()
    assert running.cancel() is False
    assert not running.cancelled()

    assert not pending.running() and not pending.done()
    assert pending.cancel() is True
    assert pending.cancelled() and pending.done() and not pending.running()
    assert pending.cancel() is True  # cancelling again still says cancelled
    with pytest.raises(cf.CancelledError):
        pending.result(timeout=0)
    with pytest.raises(cf.CancelledError):
        pending.exception(timeout=0)

    gates.open(gate)
    assert running.result(timeout=TIMEOUT) == "ran"
    assert [f.result(timeout=TIMEOUT) for f in fillers] == [0, 1]
    assert running.cancel() is False  # finished futures cannot be cancelled either


def test_queued_calls_stay_cancellable_behind_a_busy_worker(make_executor, gates):
    # ProcessPoolExecutor hands at most max_workers + 1 calls to its workers;
    # everything else stays pending, so cancel() (and shutdown(cancel_futures=
    # True), closing a map iterator) still works for it. Also for calls of a
    # function already known to be quick.
    executor = make_executor(max_workers=1)
    for i in range(3):
        assert executor.submit(square, i).result(timeout=TIMEOUT) == i * i
    gate = gates.new()
    started = gates.started_marker()
    running = executor.submit(block, gate, started, "ran")
    queued = [executor.submit(square, i) for i in range(10)]
    assert wait_until(lambda: os.path.exists(started), TIMEOUT)
    cancelled = [f.cancel() for f in queued]
    gates.open(gate)
    assert running.result(timeout=TIMEOUT) == "ran"
    assert cancelled.count(True) >= len(queued) - 2, cancelled


def test_a_result_is_not_held_back_by_the_next_task(make_executor, gates):
    executor = make_executor(max_workers=1)
    for _ in range(3):  # the worker is up and `gated` is known to return at once
        assert executor.submit(gated, None).result(timeout=TIMEOUT) is None
    first_gate, last_gate = gates.new(), gates.new()
    first = executor.submit(block, first_gate)
    quick = executor.submit(gated, None)  # queued behind `first` ...
    slow = executor.submit(gated, last_gate)  # ... and so is this one, which blocks
    gates.open(first_gate)
    # Each is done as soon as it ran, whatever the task after it does.
    assert first.result(timeout=5) is None
    assert quick.result(timeout=5) is None
    assert not slow.done()
    gates.open(last_gate)
    assert slow.result(timeout=TIMEOUT) == last_gate


# --- construction --------------------------------------------------------------

# (case id, keyword arguments, exception type, the stdlib's exact message)
CONSTRUCTOR_ERRORS = [
    ("max_workers=0", {"max_workers": 0}, ValueError, "max_workers must be greater than 0"),
    ("max_workers=-1", {"max_workers": -1}, ValueError, "max_workers must be greater than 0"),
    ("max_workers='2'", {"max_workers": "2"}, TypeError,
     "'<=' not supported between instances of 'str' and 'int'"),
    ("initializer=5", {"initializer": 5}, TypeError, "initializer must be a callable"),
    ("max_tasks_per_child='x'", {"max_tasks_per_child": "x"}, TypeError,
     "max_tasks_per_child must be an integer"),
    ("max_tasks_per_child=0", {"max_tasks_per_child": 0}, ValueError,
     "max_tasks_per_child must be >= 1"),
    ("max_tasks_per_child=-3", {"max_tasks_per_child": -3}, ValueError,
     "max_tasks_per_child must be >= 1"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"),
                         [case[1:] for case in CONSTRUCTOR_ERRORS],
                         ids=[case[0] for case in CONSTRUCTOR_ERRORS])
def test_constructor_validation_matches_the_stdlib(impl, kwargs, error, message):
    if "max_tasks_per_child" in kwargs:
        only(impl, *PROCESS_BASED, reason="ThreadPoolExecutor has no max_tasks_per_child")
        if sys.version_info < (3, 11):
            pytest.skip("max_tasks_per_child is new in Python 3.11")
    if "max_workers" in kwargs and kwargs["max_workers"] == "2" and impl == "thread":
        pytest.skip("ThreadPoolExecutor compares max_workers differently")
    with pytest.raises(error) as info:
        FACTORIES[impl](**kwargs)
    assert type(info.value) is error
    assert str(info.value) == message


def test_max_tasks_per_child_recycles_workers(impl, make_executor):
    only(impl, *PROCESS_BASED, reason="threads are not recycled")
    if sys.version_info < (3, 11) and impl == "process":
        pytest.skip("max_tasks_per_child is new in Python 3.11")
    executor = make_executor(max_workers=1, max_tasks_per_child=2)
    pids = [executor.submit(getpid).result(timeout=TIMEOUT) for _ in range(4)]
    assert pids[0] == pids[1] != pids[2] == pids[3]


def test_max_tasks_per_child_with_a_fork_context():
    # Intended difference: workers never inherit the caller by fork, so
    # futurepool accepts max_tasks_per_child with any context; the stdlib
    # refuses the fork context.
    fork = multiprocessing.get_context("fork")
    if sys.version_info >= (3, 11):
        with pytest.raises(ValueError, match="incompatible with the 'fork'"):
            cf.ProcessPoolExecutor(max_workers=1, mp_context=fork, max_tasks_per_child=1)
    with futurepool.Executor(max_workers=1, mp_context=fork, max_tasks_per_child=1) as executor:
        assert executor._mp_context is fork
        first = executor.submit(getpid).result(timeout=TIMEOUT)
        assert executor.submit(getpid).result(timeout=TIMEOUT) != first


def test_max_workers_attribute(impl, make_executor):
    assert make_executor(max_workers=3)._max_workers == 3
    if sys.version_info >= (3, 13):
        cpus = os.process_cpu_count() or 1
    else:
        cpus = os.cpu_count() or 1
    expected = {
        # futurepool counts the CPUs this process may use (3.13 semantics) on
        # every version, as its docstring says.
        "futurepool": len(os.sched_getaffinity(0)),
        "process": cpus,
        "thread": min(32, cpus + 4),
    }[impl]
    assert make_executor()._max_workers == expected


def test_max_retries_is_validated():
    # Intended difference: the extra keyword-only argument max_retries. Its
    # errors follow STYLE.md §7: TypeError for a wrong type, ValueError for a
    # bad value, naming the parameter and the value.
    with pytest.raises(ValueError, match=r"^max_retries must be .*-1"):
        futurepool.Executor(max_workers=1, max_retries=-1)
    for bad in ("1", 1.5, None):
        with pytest.raises(TypeError, match="^max_retries must be"):
            futurepool.Executor(max_workers=1, max_retries=bad)
    with pytest.raises(TypeError):
        futurepool.Executor(1, None, None, (), None)  # max_tasks_per_child is keyword-only
    futurepool.Executor(max_workers=1, max_retries=2).shutdown()


def test_initializer_and_initargs_with_a_spawn_queue(make_executor):
    channel = SPAWN.Queue()
    try:
        executor = make_executor(max_workers=2, initializer=remember_and_report,
                                 initargs=("token-1", channel))
        token, pid = executor.submit(initialized_with).result(timeout=TIMEOUT)
        assert token == "token-1"
        # Every worker that started reported through the queue; the one that
        # ran the task is among them.
        reports = [channel.get(timeout=TIMEOUT)]
        while pid not in {p for _, p in reports}:
            reports.append(channel.get(timeout=TIMEOUT))
        assert all(t == "token-1" for t, _ in reports)
    finally:
        channel.close()
        channel.join_thread()


# --- code that only reaches workers by value -------------------------------------


def test_lambdas_and_closures(impl, make_executor):
    executor = make_executor(max_workers=1)
    offset = 40

    def closure(x):
        return x + offset

    futures = [executor.submit(lambda x: x * 2, 21), executor.submit(closure, 2)]
    if impl == "process":
        # Intended difference: the stdlib pickles by reference and refuses
        # local functions; futurepool sends them by value (cloudpickle).
        for future in futures:
            with pytest.raises((pickle.PicklingError, AttributeError)):
                future.result(timeout=TIMEOUT)
    else:
        assert [f.result(timeout=TIMEOUT) for f in futures] == [42, 42]


def test_main_module_functions_reach_futurepool_workers():
    # A script's own functions live in __main__, which a futurepool worker
    # never imports: they travel by value.
    code = """
        import futurepool

        def triple(x):
            return 3 * x

        class Doubler:
            def __call__(self, x):
                return 2 * x

        if __name__ == "__main__":
            with futurepool.Executor(max_workers=1) as executor:
                print(executor.submit(triple, 5).result(timeout=30))
                print(list(executor.map(Doubler(), [1, 2], timeout=30)))
    """
    repo = os.path.dirname(os.path.dirname(os.path.abspath(futurepool.__file__)))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    try:
        done = run_driver(textwrap.dedent(code), timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - reported with its output
        pytest.fail(f"the driver hung: {exc.stdout!r} {exc.stderr!r}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["15", "[2, 4]"]


# --- the signatures are the stdlib's ---------------------------------------------

#: ProcessPoolExecutor's public methods in CPython 3.13 ...
STDLIB_313_SIGNATURES = {
    "__init__": "(self, max_workers=None, mp_context=None, initializer=None, initargs=(), *, "
                "max_tasks_per_child=None)",
    "submit": "(self, fn, /, *args, **kwargs)",
    "map": "(self, fn, *iterables, timeout=None, chunksize=1)",
    "shutdown": "(self, wait=True, *, cancel_futures=False)",
    "__enter__": "(self)",
    "__exit__": "(self, exc_type, exc_val, exc_tb)",
}
#: ... and what Python 3.14 adds, which futurepool offers on every version.
STDLIB_314_SIGNATURES = {
    "map": "(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None)",
    "terminate_workers": "(self)",
    "kill_workers": "(self)",
}
#: Intended differences (futurepool/executor.py docstring): the extra
#: keyword-only ``max_retries``, ``listen``, ``key_file``, ``resources`` and
#: ``max_reconstructions``, and ``map``'s keyword-only ``progress``
#: (futurepool/progress.py). Nothing else may differ.
INTENDED_SIGNATURES = {
    "__init__": "(self, max_workers=None, mp_context=None, initializer=None, initargs=(), *, "
                "max_tasks_per_child=None, max_retries=0, listen=None, key_file=None,"
                " resources=None, max_reconstructions=None)",
    "map": "(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None, progress=None)",
}

FUTURE_METHODS = ["__init__", "cancel", "cancelled", "running", "done", "result", "exception",
                  "add_done_callback", "set_running_or_notify_cancel", "set_result",
                  "set_exception"]


def test_the_pinned_signatures_are_the_stdlib_ones():
    """The pins above are checked against the running interpreter where they apply."""
    current = sys.version_info[:2]
    for name, pinned in STDLIB_313_SIGNATURES.items():
        actual = str(inspect.signature(getattr(cf.ProcessPoolExecutor, name)))
        if name == "__init__" and current < (3, 11):
            pinned = pinned.replace(", *, max_tasks_per_child=None", "")
        if name == "map" and current >= (3, 14):
            pinned = STDLIB_314_SIGNATURES["map"]
        assert actual == pinned, name
    if current >= (3, 14):
        for name, pinned in STDLIB_314_SIGNATURES.items():
            assert str(inspect.signature(getattr(cf.ProcessPoolExecutor, name))) == pinned


@pytest.mark.parametrize("name", sorted({*STDLIB_313_SIGNATURES, *STDLIB_314_SIGNATURES}))
def test_executor_signatures_match_the_stdlib(name):
    expected = {**STDLIB_313_SIGNATURES, **STDLIB_314_SIGNATURES, **INTENDED_SIGNATURES}[name]
    assert str(inspect.signature(getattr(futurepool.Executor, name))) == expected
    assert futurepool.ProcessPoolExecutor is futurepool.Executor


@pytest.mark.parametrize("name", FUTURE_METHODS)
def test_future_signatures_match_the_stdlib(name):
    ours = inspect.signature(getattr(futurepool.Future, name))
    assert ours == inspect.signature(getattr(cf.Future, name)), name


#: Public methods the stdlib does not have, with their signatures.
FUTUREPOOL_ONLY_SIGNATURES = {"put": "(self, value)", "options": "(self, **options)"}


def test_every_public_executor_method_is_pinned():
    public = {name for name, _ in inspect.getmembers(futurepool.Executor, callable)
              if not name.startswith("_")}
    assert public == {name for name in {*STDLIB_313_SIGNATURES, *STDLIB_314_SIGNATURES,
                                        *FUTUREPOOL_ONLY_SIGNATURES}
                      if not name.startswith("_")}
    for name, pinned in FUTUREPOOL_ONLY_SIGNATURES.items():
        assert str(inspect.signature(getattr(futurepool.Executor, name))) == pinned
