"""Resources and memory limits on a remote node (issue 12, points 4 and 5).

``futurepool worker --resources gpu=1`` declares a GPU the head's own
workers do not have, so the tasks that ask for one can only run there;
they may be submitted before that node joins (a listening executor lets
them wait). A memory limit is enforced on the node's host and reported
across the TCP link as ``TaskMemoryError``.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import futurepool
from futurepool import TaskMemoryError
from futurepool.testing import netns

from ..conformance import _control_tasks as C
from ..conformance.test_resources import _no_devices_of_our_own, runs  # noqa: E402, F401
from ._nodes import MY_NETNS, REPO, TIMEOUT, joined, start_worker, stop, where


def test_gpu_tasks_submitted_before_the_gpu_node_joins_wait_and_run_there(key_file,
                                                                          tmp_path):
    path = tmp_path / "runs"
    with futurepool.Executor(1, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        local = executor.submit(C.getpid).result(TIMEOUT)
        view = executor.options(resources={"gpu": 1})
        # This host offers no GPU, but a node that does may join: they wait, not fail.
        held = [view.submit(C.hold, path, 0.3) for _ in range(3)]
        where = view.submit(C.whoami)
        assert executor.submit(C.getpid).result(TIMEOUT) == local  # not held up by them
        time.sleep(0.5)
        assert not any(f.done() for f in held + [where])
        proc = start_worker(executor.address, key_file, "--resources", "gpu=1", workers=2)
        try:
            assert joined(executor, 3), "the node did not join"
            assert [f.result(TIMEOUT) for f in held] == ["0", "0", "0"]
            pid, devices = where.result(TIMEOUT)
            assert pid != local and pid not in executor._processes and devices == "0"
            # Two workers there, one GPU: never two of them at once.
            intervals = runs(path)
            assert len(intervals) == 3
            for (_s, end, _d), (start, _e, _d2) in zip(intervals, intervals[1:]):
                assert start >= end, intervals
            # Tasks that ask for nothing still run here and there.
            pids = {f.result(TIMEOUT)[0] for f in
                    [executor.submit(C.whoami, 0.2) for _ in range(6)]}
            assert local in pids
        finally:
            code, _out, err = stop(proc)
        assert code == 0, err


def test_a_remote_task_past_its_memory_limit_fails_with_task_memory_error(key_file):
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        proc = start_worker(executor.address, key_file, workers=1)
        try:
            assert joined(executor, 1), "the node did not join"
            first = executor.submit(C.getpid).result(TIMEOUT)
            limit = 300 * 10**6
            with pytest.raises(TaskMemoryError) as caught:
                executor.options(memory_limit=limit).submit(C.grow, 8 * 10**6).result(TIMEOUT)
            error = caught.value
            assert error.limit == limit and limit < error.peak < limit + 700 * 10**6
            assert error.host and "300.0MB" in str(error)
            # Killed, reported across the link, replaced: the next task runs.
            replacement = executor.submit(C.getpid).result(TIMEOUT)
            assert replacement != first
            under = executor.options(memory_limit="1GB").submit(C.allocate, 10**8)
            assert under.result(TIMEOUT) == 10**8
            assert executor.submit(C.getpid).result(TIMEOUT) == replacement
        finally:
            code, _out, err = stop(proc)
        assert code == 0, err


@pytest.mark.chaos
def test_on_two_hosts_only_the_one_with_a_gpu_runs_gpu_tasks(key_file):
    """Two nodes in network namespaces of their own; only node2 says --resources gpu=1."""
    netns.skip_unless_available()
    with netns.Network(nodes=2, head_in_root=True) as net:
        listen = f"tcp://{net.address('head')}:0"
        with futurepool.Executor(0, listen=listen, key_file=key_file) as executor:
            plain = start_worker(executor.address, key_file, net=net, member="node1",
                                 workers=2)
            gpu = start_worker(executor.address, key_file, "--resources", "gpu=1,mem=1GB",
                               net=net, member="node2", workers=2)
            try:
                assert joined(executor, 4), "the nodes did not join"
                view = executor.options(resources={"gpu": 1, "mem": "512MB"})
                placed = {f.result(TIMEOUT)[0] for f in
                          [view.submit(where, i, 0.1) for i in range(4)]}
                spread = {f.result(TIMEOUT)[0] for f in
                          [executor.submit(where, i, 0.3) for i in range(8)]}
                assert len(placed) == 1 and MY_NETNS not in placed, placed
                assert len(spread) == 2 and placed < spread, (placed, spread)
                # A memory limit is enforced there too.
                with pytest.raises(futurepool.TaskMemoryError):
                    view.options(memory_limit="300MB").submit(C.grow, 8 * 10**6).result(
                        TIMEOUT)
                assert view.submit(C.devices).result(TIMEOUT) == "0"
            finally:
                for proc in (plain, gpu):
                    stop(proc)


@pytest.mark.parametrize("spec, message", [
    ("gpu=-1", "--resources gpu must be >= 0, got -1"),
    ("gpu", "--resources takes NAME=QUANTITY pairs"),
    ("mem=lots", "--resources mem must be a number, optionally with a byte unit"),
])
def test_bad_resources_on_the_command_line_are_refused(key_file, spec, message):
    done = subprocess.run(
        [sys.executable, "-m", "futurepool", "worker", "--connect", "tcp://127.0.0.1:9",
         "--key-file", str(key_file), "--resources", spec],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO,
        env={"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "futurepool worker: error:" in done.stderr, done.stderr
