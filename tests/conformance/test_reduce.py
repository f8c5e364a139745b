"""``futurepool.reduce_as_completed``: pairwise reduction as inputs arrive (issue 10, point 5)."""

from __future__ import annotations

import time
from concurrent.futures import CancelledError

import pytest

import futurepool

from . import _nested_tasks as N
from ._support import TIMEOUT


@pytest.fixture(scope="module")
def executor():
    with futurepool.Executor(2) as executor:
        executor.submit(N.getpid).result(TIMEOUT)
        yield executor


def test_reduces_every_input(executor):
    futures = [executor.submit(N.square, i) for i in range(50)]
    total = futurepool.reduce_as_completed(executor, N.add, futures)
    assert isinstance(total, futurepool.Future)
    assert total.result(TIMEOUT) == sum(i * i for i in range(50))
    # The reduced future is a value too: it can feed another task.
    assert executor.submit(N.add, total, 1).result(TIMEOUT) == sum(i * i for i in range(50)) + 1


def test_first_k_ignores_stragglers(executor):
    fast = [executor.submit(N.slow_value, [i], 0) for i in range(3)]
    slow = executor.submit(N.slow_value, ["late"], 30)
    started = time.monotonic()
    total = futurepool.reduce_as_completed(executor, N.concat, [slow, *fast], first=3)
    assert sorted(total.result(TIMEOUT)) == [0, 1, 2]
    assert time.monotonic() - started < 20  # did not wait for the straggler
    slow.stop()


def test_one_input_and_put_values(executor):
    shared = executor.put(41)
    assert futurepool.reduce_as_completed(executor, N.add, [shared]).result(TIMEOUT) == 41
    values = [executor.put(i) for i in range(10)]
    assert futurepool.reduce_as_completed(executor, N.add, values).result(TIMEOUT) == 45


def test_a_failed_input_fails_the_reduction(executor):
    futures = [executor.submit(N.square, 2), executor.submit(N.fail, "bad input")]
    with pytest.raises(ValueError, match="bad input"):
        futurepool.reduce_as_completed(executor, N.add, futures).result(TIMEOUT)
    failing = [executor.submit(N.square, 2), executor.submit(N.square, 3)]
    with pytest.raises(TypeError):  # the combination itself raises
        futurepool.reduce_as_completed(executor, N.concat_strings, failing).result(TIMEOUT)


def test_a_cancelled_input_cancels_the_reduction(executor):
    done = executor.submit(N.square, 2)
    cancelled = futurepool.Future()
    cancelled.cancel()
    cancelled.set_running_or_notify_cancel()
    with pytest.raises(CancelledError):
        futurepool.reduce_as_completed(executor, N.add, [done, cancelled]).result(TIMEOUT)


def test_inside_a_task_with_nested_futures(executor):
    assert executor.submit(N.reduce_children, 30).result(TIMEOUT) == sum(i * i for i in range(30))


@pytest.mark.parametrize("first, error", [(0, ValueError), (3, ValueError), (1.5, ValueError),
                                          (True, ValueError)])
def test_bad_first_is_refused(executor, first, error):
    futures = [executor.submit(N.square, 1), executor.submit(N.square, 2)]
    with pytest.raises(error, match="first must be"):
        futurepool.reduce_as_completed(executor, N.add, futures, first=first)


def test_bad_input_is_refused(executor):
    with pytest.raises(ValueError, match="at least one"):
        futurepool.reduce_as_completed(executor, N.add, [])
    with pytest.raises(TypeError, match="callable"):
        futurepool.reduce_as_completed(executor, 42, [executor.put(1)])
