"""The object store on one host: large values are shared, not copied (issue 3).

What is checked, through the public API and the files in shared memory:
large arguments and results travel as segments and arrive as read-only views;
``put`` and repeated arguments are stored once; a dependent task reads its
input from the store; reference counting frees segments, a reader's view
outlives the free, and a freed segment is reused only when nobody reads it.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os

import numpy as np
import pytest

import futurepool
from futurepool.testing import wait_until

from . import _tasks

TIMEOUT = 30.0
MiB = _tasks.MiB


@pytest.fixture
def executor():
    with futurepool.Executor(max_workers=2) as ex:
        yield ex


@pytest.fixture
def single():
    with futurepool.Executor(max_workers=1) as ex:
        yield ex


def segments(ex, writer=None, *, free=False) -> list[str]:
    """The executor's live (or, ``free``, pooled) segments, optionally of one writer."""
    settings = ex._owner.store.settings
    stem = f"{settings.session}-" + ("" if writer is None else f"{writer}-")
    names = []
    for directory in settings.dirs:
        names += [n for n in os.listdir(directory) if n.startswith(stem)]
    return sorted(n for n in names if n.endswith(".free") == free)


DRIVER = -1


def _wait(future) -> None:
    """Wait for a future without decoding its result (``exception()`` would map it)."""
    done, _ = concurrent.futures.wait([future], timeout=TIMEOUT)
    assert done, "the task did not finish in time"


# --- values travel as segments and arrive as views -----------------------------------


def test_a_large_argument_arrives_as_a_read_only_view(executor):
    a = np.arange(4 * MiB // 8, dtype=np.float64)
    seen = executor.submit(_tasks.describe, a).result(timeout=TIMEOUT)
    assert seen["sum"] == a.sum()
    # Not a copy in the worker's heap: a view of the mapped segment.
    assert seen["writeable"] is False
    assert seen["owndata"] is False


def test_a_large_result_is_a_read_only_view_in_the_caller(executor):
    future = executor.submit(_tasks.array, 4 * MiB, 3.0)
    result = future.result(timeout=TIMEOUT)
    assert result.shape == (4 * MiB // 8,)
    assert result.sum() == 3.0 * (4 * MiB // 8)
    assert not result.flags.writeable and not result.flags.owndata
    with pytest.raises(ValueError, match="read-only"):
        result[0] = 1.0
    # It lives in a segment the worker wrote, named after the session.
    assert len(segments(executor)) == 1


def test_small_values_travel_inline(executor):
    small = np.ones(1000)
    assert executor.submit(_tasks.total, small).result(timeout=TIMEOUT) == 1000.0
    result = executor.submit(_tasks.array, 8000).result(timeout=TIMEOUT)
    assert result.flags.owndata or result.base is not None
    assert segments(executor) == []


def test_a_large_pickle_without_buffers_is_stored_too(executor):
    data = executor.submit(_tasks.big_bytes, 2 * MiB).result(timeout=TIMEOUT)
    assert data == b"z" * (2 * MiB)
    assert executor.submit(len, b"y" * (2 * MiB)).result(timeout=TIMEOUT) == 2 * MiB


def test_the_threshold_is_inclusive_and_buffers_of_any_dtype_work(executor):
    for dtype in ("uint8", "int32", "complex128"):
        a = np.ones(MiB // np.dtype(dtype).itemsize, dtype=dtype)
        back = executor.submit(_tasks.identity, a).result(timeout=TIMEOUT)
        assert back.dtype == a.dtype and np.array_equal(back, a)
    fortran = np.asfortranarray(np.arange(MiB // 8, dtype=float).reshape(512, -1))
    back = executor.submit(_tasks.identity, fortran).result(timeout=TIMEOUT)
    assert np.array_equal(back, fortran)


# --- stored once ---------------------------------------------------------------------


def test_put_stores_a_value_once_for_many_tasks(executor):
    a = np.arange(MiB, dtype=np.float64)  # 8 MiB
    handle = executor.put(a)
    assert isinstance(handle, futurepool.Future) and handle.done()
    assert len(segments(executor, DRIVER)) == 1
    futures = [executor.submit(_tasks.total, handle) for _ in range(16)]
    assert [f.result(timeout=TIMEOUT) for f in futures] == [a.sum()] * 16
    assert len(segments(executor, DRIVER)) == 1
    assert np.array_equal(handle.result(), a)


def test_put_of_a_small_value_works_the_same(executor):
    handle = executor.put({"k": [1, 2, 3]})
    assert executor.submit(len, handle).result(timeout=TIMEOUT) == 1
    assert handle.result() == {"k": [1, 2, 3]}
    assert segments(executor) == []


def test_put_after_shutdown_raises():
    executor = futurepool.Executor(max_workers=1)
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.put(np.ones(MiB))


def test_the_same_array_passed_to_many_tasks_is_stored_once(single, tmp_path):
    a = np.arange(MiB, dtype=np.float64)
    gate = str(tmp_path / "gate")
    blocker = single.submit(_tasks.wait_for, gate)  # the only worker: the rest stays pending
    futures = [single.submit(_tasks.total, a) for _ in range(16)]
    # Sixteen pending tasks, one segment: the identity cache hands out the same block.
    assert len(segments(single, DRIVER)) == 1
    open(gate, "w").close()
    blocker.result(timeout=TIMEOUT)
    assert [f.result(timeout=TIMEOUT) for f in futures] == [a.sum()] * 16


def test_a_dependent_task_reads_its_input_from_the_store(executor):
    produced = executor.submit(_tasks.array, 8 * MiB, 2.0)
    consumed = executor.submit(_tasks.total, produced)
    assert consumed.result(timeout=TIMEOUT) == 2.0 * MiB
    # The caller never decoded the value: it went from worker to worker.
    assert type(produced._result).__name__ == "_Encoded"


def test_fan_in_of_stored_results(executor):
    parts = [executor.submit(_tasks.array, MiB, float(i)) for i in range(8)]
    whole = executor.submit(_tasks.total_all, *parts)
    assert whole.result(timeout=TIMEOUT) == sum(i * MiB / 8 for i in range(8))


# --- lifetime ------------------------------------------------------------------------


def test_dropping_the_last_future_frees_its_segment(executor):
    future = executor.submit(_tasks.array, 4 * MiB)
    future.result(timeout=TIMEOUT)
    assert len(segments(executor)) == 1
    del future
    gc.collect()
    assert wait_until(lambda: segments(executor) == [], TIMEOUT), segments(executor)


def test_a_pending_dependent_keeps_its_input_alive(single, tmp_path):
    gate = str(tmp_path / "gate")
    blocker = single.submit(_tasks.wait_for, gate)
    produced = single.put(np.full(MiB, 5.0))
    consumer = single.submit(_tasks.total, produced)
    del produced
    gc.collect()
    assert len(segments(single, DRIVER)) == 1  # the pending task holds it
    open(gate, "w").close()
    assert consumer.result(timeout=TIMEOUT) == 5.0 * MiB
    blocker.result(timeout=TIMEOUT)
    assert wait_until(lambda: segments(single) == [], TIMEOUT)


def test_a_view_outlives_the_free_and_the_executor(single):
    future = single.submit(_tasks.array, 4 * MiB, 7.0)
    view = future.result(timeout=TIMEOUT)
    del future
    gc.collect()
    assert wait_until(lambda: segments(single) == [], TIMEOUT)
    # Same size, new content: the writer must not reuse the segment we still read.
    other = single.submit(_tasks.array, 4 * MiB, 9.0).result(timeout=TIMEOUT)
    assert other[0] == 9.0
    assert view.sum() == 7.0 * (4 * MiB // 8)
    single.shutdown()
    assert view.sum() == 7.0 * (4 * MiB // 8)
    assert other.sum() == 9.0 * (4 * MiB // 8)


def test_an_unread_result_survives_shutdown():
    with futurepool.Executor(max_workers=1) as ex:
        pending = ex.submit(_tasks.array, 4 * MiB, 6.0)
        _wait(pending)  # done, not decoded
        session = ex._owner.store.settings.session
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(session)]
    assert pending.result().sum() == 6.0 * (4 * MiB // 8)


def test_freed_segments_are_reused_for_the_next_value(single):
    first = single.submit(_tasks.array, 4 * MiB)
    _wait(first)  # never mapped in the caller
    del first
    gc.collect()
    assert wait_until(lambda: len(segments(single, free=True)) == 1, TIMEOUT)
    second = single.submit(_tasks.array, 4 * MiB, 2.0)
    _wait(second)
    assert segments(single, free=True) == []  # taken from the pool, not made anew
    assert second.result().sum() == 2.0 * (4 * MiB // 8)


def test_a_task_returning_its_input_shares_its_pages(single):
    produced = single.submit(_tasks.array, 4 * MiB, 3.0)
    returned = single.submit(_tasks.identity, produced)
    _wait(returned)
    shm = single._owner.store.settings.shm_dir
    names = segments(single)
    assert len(names) == 2
    assert len({os.stat(os.path.join(shm, n)).st_ino for n in names}) == 1  # not copied
    view = returned.result()
    del produced
    gc.collect()
    assert wait_until(lambda: len(segments(single)) == 1, TIMEOUT)
    # The input's segment is pooled, but its pages are the result's: not rewritten.
    assert single.submit(_tasks.array, 4 * MiB, 9.0).result(timeout=TIMEOUT)[0] == 9.0
    assert view.sum() == 3.0 * (4 * MiB // 8)
    del view, returned
    gc.collect()
    assert wait_until(lambda: segments(single) == [], TIMEOUT)


def test_a_borrowing_worker_keeps_its_view_valid(single):
    produced = single.submit(_tasks.array, 4 * MiB, 1.0)
    single.submit(_tasks.stash, produced).result(timeout=TIMEOUT)
    del produced
    gc.collect()
    assert wait_until(lambda: segments(single) == [], TIMEOUT)
    # The worker writes a value of the same size: the stashed view must not change.
    single.submit(_tasks.array, 4 * MiB, 2.0).result(timeout=TIMEOUT)
    assert single.submit(_stashed_total).result(timeout=TIMEOUT) == 4 * MiB // 8
    single.submit(_tasks.unstash).result(timeout=TIMEOUT)


def _stashed_total():
    return float(sum(a.sum() for a in _tasks._stash))


def test_pool_handles_are_values_too():
    with futurepool.Pool(2) as pool:
        result = pool.apply_async(_tasks.array, (4 * MiB, 3.0))
        assert pool.apply(_tasks.total, (result,)) == 3.0 * (4 * MiB // 8)
        arrays = pool.map(_tasks.array, [MiB] * 4)
        assert [a.sum() for a in arrays] == [MiB / 8] * 4
