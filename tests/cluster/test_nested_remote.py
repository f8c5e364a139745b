"""Tasks that submit tasks, with the owner on a remote node (issue 11).

The head runs no worker (or one) of its own, so the tasks that submit, and
the tasks they submit, run on the node ``futurepool worker --connect``
started: SUBMIT, LEND, OUTCOMES and borrowed values all cross the TCP link.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import futurepool
from futurepool import OwnerDiedError
from futurepool.testing import wait_until

from ..conformance import _nested_tasks as N
from ._nodes import TIMEOUT, joined, start_worker, stop


def test_nested_tasks_on_a_remote_node(key_file):
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        proc = start_worker(executor.address, key_file, workers=2)
        try:
            assert joined(executor, 2), "the node did not join"
            assert executor.submit(N.fib, 12, executor).result(TIMEOUT) == 144
            assert executor.submit(N.tree_wait, 3, 3).result(TIMEOUT) == 40
            assert executor.submit(N.chained).result(TIMEOUT) == (10, [9, 10])
            # A future a remote task returns is borrowed by the driver.
            assert executor.submit(N.returns_future, 6).result(TIMEOUT).result(TIMEOUT) == 36
            outer = executor.submit(N.returns_future, 5)
            assert executor.submit(N.resolve, outer).result(TIMEOUT) == 26
            size = 1 << 20
            assert executor.submit(N.big_child, size).result(TIMEOUT) == size
            # The owner dies: its borrower hears so.
            inner, pid = executor.submit(N.returns_slow_future, 1, 30).result(TIMEOUT)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(OwnerDiedError):
                inner.result(TIMEOUT)
            assert executor.submit(N.fan_out, 50).result(TIMEOUT) == sum(i * i for i in range(50))
            assert not executor._owner.relay.tasks
        finally:
            code, _out, err = stop(proc)
        assert code == 0, err


def test_nested_tasks_across_the_head_and_a_node(key_file):
    """Owners and children on both hosts: stored results cross as bytes."""
    with futurepool.Executor(1, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        proc = start_worker(executor.address, key_file, workers=1)
        try:
            assert joined(executor, 2), "the node did not join"  # (1 here + 1 there)
            assert executor.submit(N.fib, 10, executor).result(TIMEOUT) == 55
            size = 2 << 20  # stored on the head's host, read by an owner on either
            results = [executor.submit(N.big_child, size) for _ in range(4)]
            assert [f.result(TIMEOUT) for f in results] == [size] * 4
            big = executor.submit(N.returns_big_future, size).result(TIMEOUT)
            assert big.result(TIMEOUT) == b"x" * size
        finally:
            code, _out, err = stop(proc)
        assert code == 0, err


def test_stopping_a_remote_parent_stops_its_children(key_file, tmp_path):
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        proc = start_worker(executor.address, key_file, workers=2)
        try:
            assert joined(executor, 2), "the node did not join"
            parent = executor.submit(N.parent_of_sleepers, str(tmp_path), 4, 30)
            wait_until(lambda: any(p.name.startswith("started") for p in tmp_path.iterdir()),
                       TIMEOUT)
            assert parent.stop()
            started = time.monotonic()
            assert executor.submit(N.fan_out, 10).result(TIMEOUT) == 285
            assert time.monotonic() - started < 10  # not the children's 30 s
            timed = executor.options(timeout=1).submit(N.parent_of_sleepers, str(tmp_path), 2, 30)
            with pytest.raises(futurepool.TaskTimeoutError):
                timed.result(TIMEOUT)
            assert executor.submit(N.fan_out, 10).result(TIMEOUT) == 285
            assert not [p for p in tmp_path.iterdir() if p.name.startswith("finished")]
        finally:
            code, _out, err = stop(proc)
        assert code == 0, err
