"""A remote node under load and over a bad link: FAULTS.md 32 and 42."""

from __future__ import annotations

import os
import sys
import time

import pytest

import futurepool
from futurepool import config

from ._nodes import TIMEOUT, joined, start_worker, stop
from ._proxy import FlakyProxy


def run_once(directory, i, seconds=0.0):
    """Fails if this task already ran (a duplicate would create the file twice)."""
    time.sleep(seconds)
    fd = os.open(os.path.join(directory, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(fd)
    return i * i


def _channels(executor):
    return [channel for node in executor._owner.head.nodes.values()
            for channel in (node.control, *node.channels.values())]


def test_a_flaky_link_loses_nothing_and_runs_nothing_twice(key_file, tmp_path, monkeypatch):
    """FAULTS 32: the link to the node is reset every half second or so, and slow."""
    monkeypatch.setattr(config, "RESEND_AFTER", 0.3)
    env = {"FUTUREPOOL_RESEND_AFTER": "0.3"}
    runs = tmp_path / "runs"
    runs.mkdir()
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        host, port = executor.address[len("tcp://"):].rsplit(":", 1)
        with FlakyProxy((host, int(port)), delay=0.005, cut_every=(0.3, 0.8)) as proxy:
            proc = start_worker(proxy.address, key_file, workers=2, env=env)
            try:
                assert joined(executor, 2), "the node did not join through the proxy"
                done = 0
                while proxy.cuts < 3 and done < 4000:  # until the link broke a few times
                    futures = [executor.submit(run_once, str(runs), i, 0.002)
                               for i in range(done, done + 200)]
                    assert [f.result(timeout=TIMEOUT) for f in futures] == \
                        [i * i for i in range(done, done + 200)]
                    done += 200
                assert len(os.listdir(runs)) == done
                assert proxy.cuts >= 3, "the link was never cut: the test proved nothing"
                assert executor._max_workers == 2, "the node was dropped"
            finally:
                code, _out, err = stop(proc)
    assert code == 0, err


def test_ten_thousand_tasks_and_large_arguments_through_a_remote_node(key_file):
    """FAULTS 42: every task completes, and a healthy link needs no resend."""
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        proc = start_worker(executor.address, key_file, workers=2)
        try:
            assert joined(executor, 2)
            assert list(executor.map(abs, range(-10_000, 0))) == list(range(10_000, 0, -1))
            blob = os.urandom(1 << 20)
            sizes = executor.map(len, (blob[i:] for i in range(200)))
            assert list(sizes) == [(1 << 20) - i for i in range(200)]
            # Nothing was lost or is still held back (a resend may happen on a loaded
            # machine: a worker busy past RESEND_AFTER looks the same as a lost message).
            assert all(not c.ahead for c in _channels(executor))
        finally:
            code, _out, err = stop(proc)
    assert code == 0, err


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("the cluster needs Linux")
