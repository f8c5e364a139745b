"""Timeouts and ``Future.stop()`` on a remote node (issue 12, points 2 and 3).

The head runs no worker of its own, so every task runs on the node that
``futurepool worker --connect`` started; the interrupt, the kill after the
grace and the report of the death all cross the TCP link.
"""

from __future__ import annotations

import time
from concurrent.futures import CancelledError

import pytest

import futurepool
from futurepool import TaskTimeoutError

from ..conformance import _control_tasks as C
from ._nodes import TIMEOUT, joined, start_worker, stop

LIMIT = 0.5
MARGIN = 2.0


def test_timeouts_and_stops_reach_a_remote_worker(key_file, tmp_path):
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        proc = start_worker(executor.address, key_file, workers=1)
        try:
            assert joined(executor, 1), "the node did not join"
            first = executor.submit(C.getpid).result(TIMEOUT)
            # Interrupted inside the task.
            submitted = time.monotonic()
            with pytest.raises(TaskTimeoutError) as caught:
                executor.options(timeout=LIMIT).submit(C.sleep_for, 60).result(TIMEOUT)
            late = time.monotonic() - submitted - LIMIT
            assert not caught.value.killed and late < 1.0 + MARGIN, late
            assert executor.submit(C.getpid).result(TIMEOUT) == first
            # Killed after the grace: the node reports it, the worker is replaced.
            submitted = time.monotonic()
            with pytest.raises(TaskTimeoutError) as caught:
                executor.options(timeout=LIMIT).submit(C.swallow).result(TIMEOUT)
            late = time.monotonic() - submitted - LIMIT
            assert caught.value.killed and late < 1.0 + MARGIN, late
            replacement = executor.submit(C.getpid).result(TIMEOUT)
            assert replacement != first
            # Stopped while running: cancelled at once, the worker runs the next task.
            running = executor.submit(C.sleep_for, 60)
            time.sleep(0.5)
            assert running.stop() and running.cancelled()
            with pytest.raises(CancelledError):
                running.result(0)
            assert executor.submit(C.sleep_for, 0.01).result(TIMEOUT) == 0.01
            assert executor.submit(C.getpid).result(TIMEOUT) == replacement
        finally:
            code, _out, err = stop(proc)
        assert code == 0, err


def test_progress_and_status_counts_with_a_remote_node(key_file):
    """Point 6 with the tasks on another host: the bar counts every result, and
    ``futurepool status`` counts the tasks and their rate."""
    from futurepool.core import status

    from ..conformance.test_progress import Recorder, assert_finished

    recorder = type("Recorder", (Recorder,), {"made": []})
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        proc = start_worker(executor.address, key_file, workers=2)
        try:
            assert joined(executor, 2), "the node did not join"
            results = list(executor.map(C.getpid, range(40), timeout=TIMEOUT,
                                        progress=recorder))
            assert len(results) == 40
            assert_finished(recorder.made[0], 40)
            futures = [executor.submit(C.getpid) for _ in range(10)]
            shown = [f.result(TIMEOUT) for f in futurepool.as_completed(
                futures, timeout=TIMEOUT, progress=recorder)]
            assert len(shown) == 10 and recorder.made[1].n == 10
            snapshot = status.snapshot(executor._owner)
            assert snapshot["counts"] == {"submitted": 50, "failed": 0}, snapshot["counts"]
        finally:
            code, _out, err = stop(proc)
        assert code == 0, err
