"""The object store under faults (FAULTS.md 20, 22, 23, 25 and the leak rules of issue 3).

Capacity and full-filesystem cases run on small private tmpfs mounts (we are
root; the tests are marked ``chaos``), so that no other test's use of
``/dev/shm`` can change what they see. Every test checks that the executor
stays usable and that no segment is left behind; the autouse fixtures check
``/dev/shm`` and the run directory again after each test.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest

import futurepool
from futurepool import ObjectLostError, ObjectStoreFullError, WorkerCrashedError, config
from futurepool.testing import run_driver, wait_until
from tests.faults.test_lifecycle import DRIVER_PRELUDE, Driver, assert_gone, pool_processes
from tests.store import _tasks
from tests.store.test_store import segments

TIMEOUT = 30.0
MiB = _tasks.MiB


@pytest.fixture
def store_on(tmpfs, tmp_path, monkeypatch):
    """Point new executors' store at a private tmpfs: ``store_on("16m")`` -> (shm, spill).

    The spill directory is on disk, or a tmpfs of ``spill`` bytes; ``capacity``
    sets STORE_CAPACITY (None: the default share of the tmpfs).
    """

    def point(size: str, *, spill: str | None = None, capacity: int | None = None):
        shm = tmpfs(size)
        if spill is None:
            spill_dir = tmp_path / "spill"
            spill_dir.mkdir()
            spill = str(spill_dir)
        else:
            spill = tmpfs(spill)
        monkeypatch.setattr(config, "SHM_DIR", shm)
        monkeypatch.setattr(config, "SPILL_DIR", spill)
        if capacity is not None:
            monkeypatch.setattr(config, "STORE_CAPACITY", capacity)
        return shm, spill

    return point


def _used(directory: str) -> int:
    st = os.statvfs(directory)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _files(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


# --- 20: larger than the store, larger than the disk --------------------------------


@pytest.mark.chaos
def test_values_past_the_capacity_spill_and_read_back(store_on):
    shm, spill = store_on("32m", capacity=8 * MiB)
    with futurepool.Executor(max_workers=2) as ex:
        a = np.arange(12 * MiB // 8, dtype=np.float64)
        handle = ex.put(a)  # larger than the capacity: spilled
        assert len(_files(spill)) == 1 and _files(shm) == []
        assert ex.submit(_tasks.total, handle).result(timeout=TIMEOUT) == a.sum()
        produced = ex.submit(_tasks.array, 12 * MiB, 2.0)
        assert produced.result(timeout=TIMEOUT).sum() == 2.0 * (12 * MiB // 8)
        assert len(_files(spill)) == 2
        # Small enough values still go to shared memory.
        assert ex.submit(_tasks.array, MiB).result(timeout=TIMEOUT).sum() == MiB // 8
        del handle, produced
        gc.collect()
        assert wait_until(lambda: _files(spill) == [], TIMEOUT), _files(spill)
    assert _files(shm) == [] and _files(spill) == []


@pytest.mark.chaos
def test_a_value_larger_than_store_and_disk_is_refused_in_the_caller(store_on):
    shm, spill = store_on("16m", spill="8m", capacity=8 * MiB)
    huge = np.ones(32 * MiB // 8)
    with futurepool.Executor(max_workers=2) as ex:
        with pytest.raises(ObjectStoreFullError, match="33,554,432 bytes"):
            ex.put(huge)
        with pytest.raises(ObjectStoreFullError):
            ex.submit(_tasks.total, huge)
        with pytest.raises(MemoryError):  # what code written for the stdlib catches
            ex.submit(_tasks.total, huge)
        assert _files(shm) == [] and _files(spill) == []  # nothing half-written
        # A result too big fails its own future only.
        too_big = ex.submit(_tasks.array, 32 * MiB)
        fine = ex.submit(_tasks.array, 2 * MiB, 3.0)
        with pytest.raises(ObjectStoreFullError):
            too_big.result(timeout=TIMEOUT)
        assert fine.result(timeout=TIMEOUT).sum() == 3.0 * (2 * MiB // 8)
        assert ex.submit(_tasks.total, np.ones(MiB // 8)).result(timeout=TIMEOUT) == MiB // 8
        del fine
        gc.collect()
        assert wait_until(lambda: _files(spill) == [], TIMEOUT)
    assert _files(shm) == [] and _files(spill) == []


# --- 23: /dev/shm full -----------------------------------------------------------------


@pytest.mark.chaos
def test_a_full_shared_memory_is_an_exception_never_sigbus(store_on):
    shm, spill = store_on("16m", capacity=1 << 40)  # the file system is the limit
    filler = os.path.join(shm, "filler")
    with futurepool.Executor(max_workers=2) as ex:
        with open(filler, "wb") as f:
            f.write(b"\0" * 12 * MiB)
        # 8 MiB do not fit in the 4 MiB left: posix_fallocate says so, the value spills.
        produced = ex.submit(_tasks.array, 8 * MiB, 5.0)
        assert produced.result(timeout=TIMEOUT).sum() == 5.0 * MiB
        argument = ex.submit(_tasks.total, np.full(MiB, 2.0))
        assert argument.result(timeout=TIMEOUT) == 2.0 * MiB
        assert len(_files(spill)) >= 1
        # Once space frees, values go to shared memory again.
        os.unlink(filler)
        del produced
        gc.collect()
        assert wait_until(lambda: _files(spill) == [], TIMEOUT)
        again = ex.submit(_tasks.array, 8 * MiB, 1.0)
        assert again.result(timeout=TIMEOUT).sum() == MiB
        assert _files(spill) == [] and len(segments(ex)) == 1
    assert _files(shm) == [] and _files(spill) == []


# --- 22: the segment unlinked or truncated under a reader -------------------------------


def test_a_segment_unlinked_under_a_reader(tmp_path):
    ready, gate = str(tmp_path / "ready"), str(tmp_path / "gate")
    with futurepool.Executor(max_workers=2) as ex:
        a = np.arange(MiB, dtype=np.float64)
        handle = ex.put(a)
        reading = ex.submit(_tasks.read_twice, handle, ready, gate)
        assert wait_until(lambda: os.path.exists(ready), TIMEOUT)
        [name] = segments(ex)
        os.unlink(os.path.join(config.SHM_DIR, name))
        open(gate, "w").close()
        # The reader's mapping keeps the pages: it reads the same bytes again.
        assert reading.result(timeout=TIMEOUT) == (a.sum(), a.sum())
        # A new reader finds it gone, in a worker and in the caller.
        with pytest.raises(ObjectLostError, match=name):
            ex.submit(_tasks.total, handle).result(timeout=TIMEOUT)
        with pytest.raises(ObjectLostError):
            handle.result()
        assert ex.submit(_tasks.total, a).result(timeout=TIMEOUT) == a.sum()


def test_a_result_lost_before_it_was_read():
    with futurepool.Executor(max_workers=1) as ex:
        produced = ex.submit(_tasks.array, 2 * MiB)
        ex.submit(_tasks.getpid).result(timeout=TIMEOUT)
        [name] = segments(ex)
        os.unlink(os.path.join(config.SHM_DIR, name))
        with pytest.raises(ObjectLostError):
            produced.result(timeout=TIMEOUT)
        with pytest.raises(ObjectLostError):
            ex.submit(_tasks.total, produced).result(timeout=TIMEOUT)


def test_a_segment_truncated_under_a_reader_kills_only_that_worker(tmp_path):
    ready, gate = str(tmp_path / "ready"), str(tmp_path / "gate")
    with futurepool.Executor(max_workers=2) as ex:
        handle = ex.put(np.ones(4 * MiB // 8))
        reading = ex.submit(_tasks.read_twice, handle, ready, gate)
        assert wait_until(lambda: os.path.exists(ready), TIMEOUT)
        [name] = segments(ex)
        os.truncate(os.path.join(config.SHM_DIR, name), 0)
        open(gate, "w").close()
        with pytest.raises(WorkerCrashedError, match="SIGBUS"):
            reading.result(timeout=TIMEOUT)
        # The owner, the other worker and the replacement are fine.
        assert ex.submit(_tasks.total, np.ones(MiB)).result(timeout=TIMEOUT) == MiB
        del handle
        gc.collect()
        # The truncated segment is not kept for reuse (writing into it would fault).
        assert wait_until(lambda: not {name, name + ".free"} & {
            *segments(ex), *segments(ex, free=True)}, TIMEOUT)
        assert ex.submit(_tasks.total, np.ones(MiB // 2)).result(timeout=TIMEOUT) == MiB // 2


# --- 25: reference counting across processes --------------------------------------------


@pytest.mark.chaos
def test_a_borrower_that_crashes_releases_its_hold(store_on):
    shm, _ = store_on("64m")
    with futurepool.Executor(max_workers=1) as ex:
        baseline = _used(shm)
        produced = ex.submit(_tasks.array, 16 * MiB)
        pid = ex.submit(_tasks.stash, produced).result(timeout=TIMEOUT)
        del produced
        gc.collect()
        assert wait_until(lambda: segments(ex) == [], TIMEOUT)
        # Unlinked, but the borrower's view still holds the pages.
        assert _used(shm) - baseline >= 16 * MiB
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: _used(shm) - baseline < MiB, TIMEOUT), _used(shm)
        assert ex.submit(_tasks.getpid).result(timeout=TIMEOUT) != pid


def test_stored_results_outlive_the_worker_that_wrote_them():
    with futurepool.Executor(max_workers=1) as ex:
        pid = ex.submit(_tasks.getpid).result(timeout=TIMEOUT)
        produced = ex.submit(_tasks.array, 4 * MiB, 3.0)
        later = ex.submit(_tasks.array, 4 * MiB, 1.0)
        later.result(timeout=TIMEOUT)
        del later
        gc.collect()
        assert wait_until(lambda: len(segments(ex, free=True)) == 1, TIMEOUT)
        os.kill(pid, signal.SIGKILL)
        # The dead writer's pooled segment goes; the one a future holds stays readable.
        assert wait_until(lambda: segments(ex, free=True) == [], TIMEOUT)
        assert produced.result(timeout=TIMEOUT).sum() == 3.0 * (4 * MiB // 8)
        assert ex.submit(_tasks.total, produced).result(timeout=TIMEOUT) == 3.0 * (4 * MiB // 8)
        del produced
        gc.collect()
        assert wait_until(lambda: segments(ex) == [], TIMEOUT)


# --- no leaks, whatever dies --------------------------------------------------------------


def _ours() -> list[str]:
    return sorted(n for n in os.listdir(config.SHM_DIR) if n.startswith(config.SHM_PREFIX))


def test_the_node_killed_leaves_nothing_after_shutdown():
    with futurepool.Executor(max_workers=2) as ex:
        produced = ex.submit(_tasks.array, 4 * MiB, 2.0)
        handle = ex.put(np.ones(MiB))
        produced.result(timeout=TIMEOUT)
        procs = pool_processes()
        [node] = [p for p in procs if p.ppid() == os.getpid()]
        node.kill()
        assert_gone(procs)
        assert produced.result().sum() == 2.0 * (4 * MiB // 8)
        assert ex.submit(_tasks.total, handle).result(timeout=TIMEOUT) == MiB
    assert _ours() == []


_STORE_DRIVER = """
import numpy as np
with futurepool.Executor(max_workers=2) as ex:
    kept = [ex.submit(np.full, 1 << 20, 1.0) for _ in range(3)]
    handle = ex.put(np.ones(1 << 20))
    [f.result(timeout=30) for f in kept]
    report_pool(session=ex._owner.store.settings.session)
    ex.submit(time.sleep, 60).result()
"""


def test_the_driver_killed_leaves_no_segment(tmp_path):
    with Driver(DRIVER_PRELUDE + _STORE_DRIVER, tmp_path) as driver:
        report = driver.read_json("session")
        session = report["session"]
        mine = [n for n in _ours() if n.startswith(session)]
        assert len(mine) == 4, mine
        driver.proc.send_signal(signal.SIGKILL)
        assert driver.wait(TIMEOUT) == -signal.SIGKILL
        # The node sees the driver go, stops its workers and removes the session's files.
        assert wait_until(lambda: not [n for n in _ours() if n.startswith(session)], TIMEOUT)


def test_segments_of_dead_sessions_are_swept():
    dead = subprocess.Popen(["true"])
    dead.wait(TIMEOUT)
    assert not psutil.pid_exists(dead.pid)
    stale = os.path.join(config.SHM_DIR, f"{config.SHM_PREFIX}s{dead.pid}-abcdef--1-0")
    with open(stale, "wb") as f:
        f.write(b"x" * 4096)
    with futurepool.Executor(max_workers=1) as ex:
        ex.submit(_tasks.getpid).result(timeout=TIMEOUT)
        assert not os.path.exists(stale)


def test_executor_garbage_collected_with_stored_values():
    ex = futurepool.Executor(max_workers=1)
    future = ex.submit(_tasks.array, 2 * MiB, 4.0)
    future.result(timeout=TIMEOUT)
    thread = ex._owner.thread
    del ex
    gc.collect()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert _ours() == []
    assert future.result().sum() == 4.0 * (2 * MiB // 8)
    time.sleep(0)  # the view is still readable once the session is gone


@pytest.mark.chaos
def test_a_docker_sized_shared_memory_works_with_the_default_capacity(store_on):
    shm, spill = store_on("64m")  # Docker's default /dev/shm
    with futurepool.Executor(max_workers=2) as ex:
        # Twelve 8 MiB results held at once: 96 MiB, more than the whole tmpfs.
        held = [ex.submit(_tasks.array, 8 * MiB, float(i)) for i in range(12)]
        sums = [f.result(timeout=TIMEOUT).sum() for f in held]
        assert sums == [i * MiB for i in range(12)]
        assert _files(spill), "nothing spilled past the default capacity"
        assert _used(shm) <= 40 * MiB  # half the free space, plus the pools' slack
        assert ex.submit(_tasks.total_all, *held).result(timeout=TIMEOUT) == sum(sums)
    assert _files(shm) == [] and _files(spill) == []


def test_no_resource_tracker_warning_and_no_premature_unlink():
    code = """
        import gc, numpy as np, futurepool
        with futurepool.Executor(max_workers=2) as ex:
            kept = ex.submit(np.full, 1 << 20, 2.0).result(timeout=30)
            handle = ex.put(np.ones(1 << 20))
            assert ex.submit(np.sum, handle).result(timeout=30) == 1 << 20
        gc.collect()
        assert kept.sum() == 2 << 20  # still mapped after the session's files are gone
        print("ok")
    """
    done = run_driver(code, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr, done.stderr
    assert done.stderr == ""


@pytest.mark.chaos
def test_an_idle_worker_lets_go_of_unlinked_segments(store_on, monkeypatch):
    shm, _ = store_on("64m")
    monkeypatch.setattr(config, "STORE_POOL_BYTES", 0)  # freed segments are unlinked
    with futurepool.Executor(max_workers=1) as ex:
        baseline = _used(shm)
        handle = ex.put(np.ones(16 * MiB // 8))
        # The worker keeps its mapping after the task, to read the next value
        # written into the same segment without page faults...
        assert ex.submit(_tasks.total, handle).result(timeout=TIMEOUT) == 16 * MiB // 8
        del handle
        gc.collect()
        assert wait_until(lambda: segments(ex) == [], TIMEOUT)
        # ...but not once the segment is unlinked: its pages must go back.
        assert wait_until(lambda: _used(shm) - baseline < MiB, TIMEOUT), _used(shm) - baseline


def test_a_restarted_node_never_reuses_worker_ids(monkeypatch):
    # The dead workers are buried after DEATH_GRACE; make sure the new node's
    # workers are up by then. They used to get the same ids (and socket and
    # segment names), so the burial took the new workers' entries along and
    # their results were dropped: shutdown then waited forever.
    monkeypatch.setattr(config, "DEATH_GRACE", 1.0)
    with futurepool.Executor(max_workers=2) as ex:
        produced = ex.submit(_tasks.array, 4 * MiB, 2.0)
        old = {ex.submit(_tasks.getpid).result(timeout=TIMEOUT) for _ in range(4)}
        assert produced.result(timeout=TIMEOUT).sum() == 2.0 * (4 * MiB // 8)
        procs = pool_processes()
        [node] = [p for p in procs if p.ppid() == os.getpid()]
        node.kill()
        assert_gone(procs)
        new = ex.submit(_tasks.getpid).result(timeout=TIMEOUT)
        assert new not in old
        time.sleep(1.5)  # past the burial of the old workers
        futures = [ex.submit(_tasks.total, produced) for _ in range(8)]
        assert [f.result(timeout=TIMEOUT) for f in futures] == [2.0 * (4 * MiB // 8)] * 8


@pytest.mark.chaos
def test_a_full_file_system_takes_back_the_pool_before_spilling(store_on):
    shm, spill = store_on("16m", capacity=1 << 40)
    with futurepool.Executor(max_workers=1) as ex:
        handle = ex.put(np.ones(8 * MiB // 8))
        del handle
        gc.collect()
        assert wait_until(lambda: len(segments(ex, free=True)) == 1, TIMEOUT)  # kept for reuse
        with open(os.path.join(shm, "filler"), "wb") as f:
            f.write(b"\0" * 6 * MiB)
        # 10 MiB fit only once the pooled 8 MiB are given back: no spill.
        handle = ex.put(np.full(10 * MiB // 8, 3.0))
        assert _files(spill) == []
        assert segments(ex, free=True) == [] and len(segments(ex)) == 1
        assert ex.submit(_tasks.total, handle).result(timeout=TIMEOUT) == 3.0 * (10 * MiB // 8)
        os.unlink(os.path.join(shm, "filler"))
