"""Resources per task (issue 12, point 4): ``options(resources=)`` and ``Executor(resources=)``.

A futurepool extension, so these run against futurepool only. Tasks record
when they ran (the system-wide monotonic clock) and the
``CUDA_VISIBLE_DEVICES`` they saw (``_control_tasks.hold``), so a test can
prove that two tasks holding the only GPU never overlapped. No GPU is
needed: a GPU is whatever the executor says it offers. Remote nodes:
``tests/cluster/test_resources_remote.py``.
"""

from __future__ import annotations

import pickle

import pytest

import futurepool
from futurepool import UnsatisfiableResourcesError
from futurepool.core import resources
from futurepool.errors import WorkerCrashedError

from . import _control_tasks as C
from ._support import TIMEOUT, end_pools, options_refusal


@pytest.fixture(autouse=True)
def _no_devices_of_our_own(monkeypatch):
    """Workers inherit the driver's environment: no GPUs set by whoever runs the tests."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def runs(path) -> list[tuple[float, float, str]]:
    """``(start, end, devices)`` of every ``hold`` that wrote to ``path``, by start."""
    with open(path) as file:
        rows = [line.split() for line in file if line.strip()]
    return sorted((float(start), float(end), devices) for start, end, devices in rows)


def assert_disjoint(intervals) -> None:
    for (_s1, end, _d1), (start, _e2, _d2) in zip(intervals, intervals[1:]):
        assert start >= end, f"two runs overlapped: {intervals}"


def test_tasks_that_need_the_only_gpu_never_overlap(tmp_path):
    path = tmp_path / "runs"
    with futurepool.Executor(3, resources={"gpu": 1}) as executor:
        view = executor.options(resources={"gpu": 1})
        futures = [view.submit(C.hold, path, 0.3) for _ in range(4)]
        assert [f.result(TIMEOUT) for f in futures] == ["0"] * 4
    intervals = runs(path)
    assert len(intervals) == 4
    assert_disjoint(intervals)


def test_two_gpus_run_two_tasks_at_once_each_with_its_own_device(tmp_path):
    path = tmp_path / "runs"
    with futurepool.Executor(3, resources={"gpu": 2}) as executor:
        view = executor.options(resources={"gpu": 1})
        futures = [view.submit(C.hold, path, 0.5) for _ in range(4)]
        assert sorted(f.result(TIMEOUT) for f in futures) == ["0", "0", "1", "1"]
        both = executor.options(resources={"gpu": 2}).submit(C.devices)
        assert both.result(TIMEOUT) == "0,1"
    intervals = runs(path)
    # Each device ran one task at a time; the two ran side by side.
    for device in "01":
        assert_disjoint([run for run in intervals if run[2] == device])
    assert intervals[1][0] < intervals[0][1], f"never ran side by side: {intervals}"


def test_cuda_visible_devices_is_restored_after_the_task():
    with futurepool.Executor(1, resources={"gpu": 2}) as executor:
        pid = executor.submit(C.getpid).result(TIMEOUT)
        assert executor.options(resources={"gpu": 1}).submit(C.devices).result(TIMEOUT) == "0"
        # The same worker, a task without GPUs: the variable is gone again.
        assert executor.submit(C.devices).result(TIMEOUT) is None
        assert executor.submit(C.getpid).result(TIMEOUT) == pid


def test_gpu_indices_count_within_the_devices_the_host_already_set(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with futurepool.Executor(1, resources={"gpu": 2}) as executor:
        assert executor.options(resources={"gpu": 2}).submit(C.devices).result(TIMEOUT) == "4,5"
        assert executor.options(resources={"gpu": 1}).submit(C.devices).result(TIMEOUT) in {"4",
                                                                                             "5"}
        assert executor.submit(C.devices).result(TIMEOUT) == "4,5"  # as the host set it


def test_a_request_that_does_not_fit_now_waits_without_holding_up_others(tmp_path):
    first, second, other = tmp_path / "first", tmp_path / "second", tmp_path / "other"
    with futurepool.Executor(2, resources={"gpu": 1}) as executor:
        view = executor.options(resources={"gpu": 1})
        running = view.submit(C.hold, first, 2.0)
        waiting = view.submit(C.hold, second, 0.1)
        behind = executor.submit(C.hold, other, 0.0)  # asks for nothing: runs at once
        assert behind.result(TIMEOUT) == "-"
        assert not running.done() and not waiting.done()
        assert waiting.result(TIMEOUT) == "0"
        assert running.result(TIMEOUT) == "0"
    (start1, end1, _), = runs(first)
    (start2, _end2, _), = runs(second)
    (_s, end_other, _), = runs(other)
    assert end_other < end1, "the task behind the waiting one waited too"
    assert start2 >= end1, "the waiting task ran before the GPU was free"


def test_what_a_task_holds_is_released_however_it_ends(tmp_path):
    """An exception, a dead worker, a timeout, a stop: the GPU is free again each time."""
    with futurepool.Executor(2, resources={"gpu": 1}) as executor:
        view = executor.options(resources={"gpu": 1})
        with pytest.raises(ZeroDivisionError):
            view.submit(divmod, 1, 0).result(TIMEOUT)
        with pytest.raises(WorkerCrashedError):
            view.submit(C.exit_now).result(TIMEOUT)
        with pytest.raises(futurepool.TaskTimeoutError):
            view.options(timeout=0.3).submit(C.sleep_for, 60).result(TIMEOUT)
        started = tmp_path / "started"
        stopped = view.submit(C.sleep_for, 60, started)
        from futurepool.testing import wait_until

        assert wait_until(lambda: started.exists(), TIMEOUT)
        assert stopped.stop()
        assert view.submit(C.devices).result(TIMEOUT) == "0"


def test_a_request_no_node_can_ever_fit_fails_at_submit_naming_what_is_offered():
    with futurepool.Executor(1, resources={"gpu": 1, "mem": "2GB"}) as executor:
        with pytest.raises(UnsatisfiableResourcesError) as caught:
            executor.options(resources={"gpu": 2}).submit(C.devices)
        error = caught.value
        assert isinstance(error, ValueError) and isinstance(error, futurepool.FuturePoolError)
        assert error.requested == {"gpu": 2}
        (node, offer), = error.offers.items()
        assert "this host" in node and offer["gpu"] == 1 and offer["mem"] == 2 * 10**9
        assert offer["cpu"] >= 1
        message = str(error)
        for part in ("gpu=2", "this host", "cpu=", "gpu=1", "mem=2.0GB", "resources="):
            assert part in message, message
        # A resource nobody declared, and map: the same, in the caller's thread.
        with pytest.raises(UnsatisfiableResourcesError, match="tpu=1"):
            executor.options(resources={"tpu": 1}).map(C.devices, [1, 2])
        with pytest.raises(UnsatisfiableResourcesError):
            executor.options(resources={"cpu": 10**6}).submit(C.devices)
        again = pickle.loads(pickle.dumps(error))
        assert str(again) == message and again.offers == error.offers
        # Nothing was sent: the executor runs what fits.
        assert executor.options(resources={"gpu": 1, "mem": "1GB"}).submit(
            C.devices).result(TIMEOUT) == "0"


def test_cpu_and_memory_are_detected():
    offer = resources.detect()
    assert offer["cpu"] >= 1 and offer["mem"] > 10**8
    with futurepool.Executor(1) as executor:
        view = executor.options(resources={"cpu": 1, "mem": "100MB"})
        assert view.submit(C.devices).result(TIMEOUT) is None  # no GPU asked: none set
        with pytest.raises(UnsatisfiableResourcesError, match="mem="):
            executor.options(resources={"mem": 2 * offer["mem"]}).submit(C.devices)


def test_pool_options_place_tasks_by_resources(tmp_path):
    path = tmp_path / "runs"
    made = []
    try:
        pool = futurepool.Pool(2, resources={"gpu": 1})
        made.append(pool)
        view = pool.options(resources={"gpu": 1})
        assert view.starmap(C.hold, [(path, 0.2)] * 3, chunksize=1) == ["0"] * 3
        assert view.apply_async(C.devices).get(TIMEOUT) == "0"
        with pytest.raises(UnsatisfiableResourcesError):
            view.options(resources={"gpu": 2}).apply_async(C.devices)
    finally:
        end_pools(made)
    assert_disjoint(runs(path))


@pytest.mark.parametrize("value, error, message", [
    ([("gpu", 1)], TypeError, "resources must be a dict like {'gpu': 1}, got [('gpu', 1)]"),
    ({"gpu": -1}, ValueError, "resources['gpu'] must be >= 0, got -1"),
    ({"gpu": 0.5}, ValueError, "resources['gpu'] must be a whole number of GPUs, got 0.5"),
    ({"gpu": "two"}, ValueError, "resources['gpu'] must be a number, optionally with a byte"
                                 " unit (512MB, 2GiB), got 'two'"),
    ({"mem": "12XB"}, ValueError, "got '12XB'"),
    ({"gpu": float("nan")}, ValueError, "resources['gpu'] must be finite"),
    ({"gpu": True}, TypeError, "resources['gpu'] must be a number or a size"),
    ({"gpu": None}, TypeError, "resources['gpu'] must be a number"),
    ({1: 1}, TypeError, "resources names must be strings, got 1"),
    ({"my gpu": 1}, ValueError, "resources names must be identifiers like 'gpu', got 'my gpu'"),
])
def test_bad_resources_are_refused_naming_what_is_wrong(value, error, message):
    assert message in str(options_refusal(error, resources=value))
    with pytest.raises(error) as caught:
        futurepool.Executor(1, resources=value)
    assert message in str(caught.value)


def test_resource_quantities_take_sizes_and_numbers():
    assert resources.normalize({"mem": "64GB", "gpu": 2, "disk": "1.5GiB", "x": 0.25,
                                "none": 0}) == {"mem": 64 * 10**9, "gpu": 2,
                                                "disk": int(1.5 * 2**30), "x": 0.25}
    assert resources.normalize({"mem": "512mb", "a": "2Ki", "b": "3"}) == {
        "mem": 512 * 10**6, "a": 2048, "b": 3}
    assert resources.parse_spec("gpu=2,mem=64GB") == {"gpu": 2, "mem": 64 * 10**9}
    assert resources.parse_spec(" gpu = 1 , ") == {"gpu": 1}


@pytest.mark.parametrize("spec, message", [
    ("gpu", "--resources takes NAME=QUANTITY pairs separated by commas (gpu=2,mem=64GB),"
            " got 'gpu'"),
    ("gpu=", "got 'gpu='"),
    ("gpu=1,gpu=2", "--resources names 'gpu' twice"),
    ("gpu=-1", "--resources gpu must be >= 0, got -1"),
    ("gpu=1.5", "--resources gpu must be a whole number of GPUs, got 1.5"),
    ("mem=64QB", "--resources mem must be a number, optionally with a byte unit"),
    ("g pu=1", "--resources names must be identifiers like 'gpu', got 'g pu'"),
])
def test_bad_resource_specs_are_refused_naming_the_part(spec, message):
    with pytest.raises(ValueError) as caught:
        resources.parse_spec(spec)
    assert message in str(caught.value)
