"""Tasks that submit tasks (issue 11): the worker that submits owns the futures.

One host here; ``tests/cluster/test_nested_remote.py`` puts the owner on a
remote node. Every wait has a deadline, so a deadlock fails a test instead of
hanging the run.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from concurrent.futures import CancelledError

import pytest

import futurepool
from futurepool import OwnerDiedError, TaskTimeoutError
from futurepool.testing import wait_until

from . import _nested_tasks as N
from ._support import TIMEOUT


@pytest.fixture
def executor():
    with futurepool.Executor(2) as executor:
        executor.submit(N.getpid).result(TIMEOUT)
        yield executor


def entries(executor) -> int:
    """What the driver's owner still holds of nested tasks (it should forget them)."""
    return len(executor._owner.relay.tasks)


# --- the executor as a value ---------------------------------------------------------

def test_fib_on_two_workers_passing_the_executor(executor):
    assert executor.submit(N.fib, 12, executor).result(TIMEOUT) == 144
    assert wait_until(lambda: entries(executor) == 0, TIMEOUT)


def test_fib_20_completes_on_two_workers():
    """21,891 tasks, recursion 20 deep, on max_workers=2: a blocked task lends its
    worker to its own subtree, so nothing deadlocks."""
    with futurepool.Executor(max_workers=2) as executor:
        assert executor.submit(N.fib, 20, executor).result(300) == 6765
        assert entries(executor) == 0
        assert len(executor._owner.tasks) == 0


def test_current_executor_inside_a_task(executor):
    assert executor.submit(N.fib_current, 10).result(TIMEOUT) == 55
    assert "handle" in executor.submit(N.current_executor_repr).result(TIMEOUT)


def test_current_executor_outside_a_task_raises():
    with pytest.raises(RuntimeError, match="inside a task"):
        futurepool.current_executor()


def test_an_executor_pickles_only_into_its_own_tasks(executor):
    with pytest.raises(TypeError, match="argument of a task"):
        pickle.dumps(executor)
    with futurepool.Executor(1) as other:
        future = other.submit(N.fib, 3, executor)  # another executor's task
        with pytest.raises(TypeError, match="argument of a task"):
            future.result(TIMEOUT)
    # Inside a task, the handle pickles only as an argument too.
    with pytest.raises(TypeError, match="argument of one of its own tasks"):
        executor.submit(N.pickle_executor, executor).result(TIMEOUT)


def test_pool_tasks_use_current_executor():
    with futurepool.Pool(2) as pool:
        assert pool.apply_async(N.fib_current, (10,)).get(TIMEOUT) == 55
        assert pool.map(N.mapped, [10, 20], chunksize=1) == [285, 2470]
        with pytest.raises(NotImplementedError):  # as the stdlib's: a pool never pickles
            pool.apply_async(N.square, (pool,)).get(TIMEOUT)


# --- waiting on nested futures ---------------------------------------------------------

def test_fan_out_and_map(executor):
    assert executor.submit(N.fan_out, 1000).result(TIMEOUT) == sum(i * i for i in range(1000))
    assert executor.submit(N.mapped, 100).result(TIMEOUT) == sum(i * i for i in range(100))


@pytest.mark.parametrize("task", [N.tree_wait, N.tree_as_completed])
def test_stdlib_wait_and_as_completed_lend_the_slot(executor, task):
    # 1 + 3 + 9 + 27 + 81 tasks, each blocked in the stdlib's wait()/as_completed().
    assert executor.submit(task, 4, 3).result(TIMEOUT) == 121


def test_nested_futures_as_arguments_of_nested_tasks(executor):
    assert executor.submit(N.chained).result(TIMEOUT) == (10, [9, 10])


def test_child_exceptions_reach_the_parent(executor):
    with pytest.raises(ValueError, match="from a child"):
        executor.submit(N.child_fails).result(TIMEOUT)
    assert "kept" in executor.submit(N.child_error_as_value).result(TIMEOUT)


def test_large_child_results_go_through_the_store(executor):
    size = 4 << 20  # far above the inline threshold
    assert executor.submit(N.big_child, size).result(TIMEOUT) == size
    assert executor.submit(N.put_and_share, 100_000).result(TIMEOUT) == 3 * sum(range(100_000))


# --- futures that leave their owner (borrowing) ------------------------------------------

def test_a_returned_future_is_borrowed_by_the_driver(executor):
    inner = executor.submit(N.returns_future, 7).result(TIMEOUT)
    assert isinstance(inner, futurepool.Future)
    assert inner.result(TIMEOUT) == 49
    nested = executor.submit(N.returns_futures, 2).result(TIMEOUT)
    assert nested["a"].result(TIMEOUT) == 4 and nested["b"][0].result(TIMEOUT) == 9


def test_a_returned_future_handed_to_another_task(executor):
    outer = executor.submit(N.returns_future, 5)
    assert executor.submit(N.resolve, outer).result(TIMEOUT) == 26


def test_a_large_borrowed_value(executor):
    size = 2 << 20
    inner = executor.submit(N.returns_big_future, size).result(TIMEOUT)
    assert inner.result(TIMEOUT) == b"x" * size


def test_owner_death_fails_borrowers_with_owner_died_error(executor):
    inner, pid = executor.submit(N.returns_slow_future, 1, 30).result(TIMEOUT)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(OwnerDiedError) as caught:
        inner.result(TIMEOUT)
    assert "worker" in str(caught.value)
    # The pool goes on; the dead owner's child (30 s) does not hold a worker for long.
    started = time.monotonic()
    assert executor.submit(N.fan_out, 10).result(TIMEOUT) == 285
    assert time.monotonic() - started < 15


# --- stopping, timeouts, owner death -------------------------------------------------------

def test_stop_reaches_the_children(executor, tmp_path):
    parent = executor.submit(N.parent_of_sleepers, str(tmp_path), 4, 30)
    assert wait_until(lambda: any(p.name.startswith("started") for p in tmp_path.iterdir()),
                      TIMEOUT)
    assert parent.stop()
    # The children are cancelled or stopped with it: both workers are free again soon.
    started = time.monotonic()
    assert executor.submit(N.fan_out, 10).result(TIMEOUT) == 285
    assert time.monotonic() - started < 10
    time.sleep(0.5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("finished")]
    assert wait_until(lambda: entries(executor) == 0, TIMEOUT)


def test_a_timeout_reaches_the_children(executor, tmp_path):
    future = executor.options(timeout=1).submit(N.parent_of_sleepers, str(tmp_path), 3, 30)
    with pytest.raises(TaskTimeoutError):
        future.result(TIMEOUT)
    started = time.monotonic()
    assert executor.submit(N.fan_out, 10).result(TIMEOUT) == 285
    assert time.monotonic() - started < 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("finished")]


def test_owner_death_cancels_its_children_and_max_retries_reruns_it(tmp_path):
    with futurepool.Executor(2, max_retries=1) as executor:
        result = executor.submit(N.parent_dies, str(tmp_path), 6, 0.2).result(TIMEOUT)
        assert result == (6, 2)
        assert wait_until(lambda: entries(executor) == 0, TIMEOUT)


def test_owner_death_without_retries_fails_the_parent(executor, tmp_path):
    with pytest.raises(futurepool.WorkerCrashedError):
        executor.submit(N.parent_dies, str(tmp_path), 6, 5).result(TIMEOUT)
    # Its children were cancelled: nothing of theirs runs for 5 s on the pool.
    started = time.monotonic()
    assert executor.submit(N.fan_out, 10).result(TIMEOUT) == 285
    assert time.monotonic() - started < 4
    assert wait_until(lambda: entries(executor) == 0, TIMEOUT)


def test_shutdown_cancel_futures_cancels_nested_work(tmp_path):
    executor = futurepool.Executor(2)
    parent = executor.submit(N.parent_of_sleepers, str(tmp_path), 20, 0.5)
    assert wait_until(lambda: any(p.name.startswith("started") for p in tmp_path.iterdir()),
                      TIMEOUT)
    started = time.monotonic()
    executor.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - started < 10  # not 20 × 0.5 s / 2 workers of children
    assert parent.done()
    with pytest.raises(CancelledError):
        parent.result(0)


def test_the_driver_holds_no_entries_of_nested_tasks(executor):
    assert executor.submit(N.submit_count, 20_000).result(TIMEOUT * 4) == 20_000
    assert wait_until(lambda: entries(executor) == 0 and not executor._owner.tasks, TIMEOUT)


# --- reference counting across owners (FAULTS 25, 46) ---------------------------------------

def _segment_names(future) -> list[str]:
    inband, pieces = future._encoded
    return [piece.location.name for piece in (inband, *pieces) if hasattr(piece, "location")]


def _live(name: str) -> bool:
    return os.path.exists(os.path.join(futurepool.config.SHM_DIR, name)) or \
        os.path.exists(os.path.join(futurepool.config.SPILL_DIR, name))


def test_a_borrowed_value_lives_while_borrowed_and_is_freed_after(executor):
    inner = executor.submit(N.returns_big_future, 2 << 20).result(TIMEOUT)
    assert len(inner.result(TIMEOUT)) == 2 << 20
    names = _segment_names(inner)
    assert names and all(_live(name) for name in names)
    time.sleep(0.3)
    assert all(_live(name) for name in names)  # the owner keeps it for its borrower
    del inner
    assert wait_until(lambda: not any(_live(name) for name in names), TIMEOUT)


def test_a_borrower_that_crashes_releases_its_hold(executor, tmp_path):
    note = tmp_path / "names"
    outer = executor.submit(N.returns_big_future, 2 << 20)
    dying = executor.submit(N.borrow_note_and_die, outer, str(note))
    with pytest.raises(futurepool.WorkerCrashedError):
        dying.result(TIMEOUT)
    names = note.read_text().split()
    assert names
    del outer  # the driver's copy never decoded the future: only the dead borrower held it
    assert wait_until(lambda: not any(_live(name) for name in names), TIMEOUT)


def test_nested_tasks_killed_at_depth_are_retried(tmp_path):
    with futurepool.Executor(2, max_retries=2) as executor:
        assert executor.submit(N.tree_dies_once, 3, str(tmp_path)).result(TIMEOUT) == 15
        assert wait_until(lambda: entries(executor) == 0, TIMEOUT)


def test_an_options_view_passed_to_a_task_keeps_its_options(executor):
    value, shown = executor.submit(N.submit_through, executor.options(timeout=30), 3).result(
        TIMEOUT)
    assert value == 9 and "timeout=30" in shown


def test_a_chain_of_300_waiting_tasks_on_one_worker():
    """Each blocked task runs the next on top of itself: 300 deep in one thread."""
    with futurepool.Executor(max_workers=1) as executor:
        assert executor.submit(N.chain, 300).result(TIMEOUT * 4) == 300


def test_current_executor_in_an_initializer_fails_the_pool_clearly():
    with futurepool.Executor(1, initializer=N.initializer_submits) as executor:
        with pytest.raises(futurepool.InitializerError) as caught:
            executor.submit(N.square, 2).result(TIMEOUT)
    assert "initializer" in str(caught.value.__cause__)
