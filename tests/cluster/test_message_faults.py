"""FAULTS.md 33 and 40: messages lost, held back or repeated between the head and a node.

``FUTUREPOOL_TESTING_FAULTS`` makes the head (this process) and the node
(its processes) lose the first message of one type each sends over TCP, or
hold every one back. A lost message is what a connection that breaks and
is dialled again costs; the channels (``protocol.channel``) must send it
again, drop the copies, and every future must settle exactly once.
"""

from __future__ import annotations

import collections
import os
import sys
import time

import pytest

import futurepool
from futurepool import config
from futurepool.errors import WorkerCrashedError
from futurepool.protocol.framing import decode_header, pack_header
from futurepool.protocol.messages import MessageType
from futurepool.testing import wait_until

from ._nodes import TIMEOUT, joined, node_peer, start_worker, stop

#: Sent by the head (this process), then by the node or its workers.
HEAD_SENDS = ["TASKS", "WELCOME", "HEARTBEAT", "BYE"]
NODE_SENDS = ["JOIN", "READY", "RESULTS", "OUTPUT", "WORKER_EXITED", "LEAVE"]


def shout(x):
    print(f"line {x}", flush=True)
    return x * x


def _settled_once(futures):
    counts = collections.Counter()
    for future in futures:
        future.add_done_callback(lambda f: counts.update([id(f)]))
    return counts


def _exercise(executor, key_file, env):
    """Join, run, crash a worker, leave: every message type goes at least once."""
    proc = start_worker(executor.address, key_file, workers=2, env=env)
    try:
        assert joined(executor, 2), "the node did not join"
        time.sleep(3 * config.HEARTBEAT_INTERVAL)  # heartbeats go both ways meanwhile
        # First, as a crashed worker loses what it had not delivered yet.
        with pytest.raises(WorkerCrashedError):
            executor.submit(os._exit, 3).result(timeout=TIMEOUT)
        futures = [executor.submit(shout, i) for i in range(30)]
        counts = _settled_once(futures)
        assert [f.result(timeout=TIMEOUT) for f in futures] == [i * i for i in range(30)]
        # Callbacks of a duplicate would have run by now, and what was lost sent again
        # (a worker stopped first would take its unacknowledged output with it).
        time.sleep(3 * config.RESEND_AFTER)
        assert all(counts[id(f)] == 1 for f in futures)
    finally:
        code, _out, err = stop(proc)
    assert code == 0, err
    assert wait_until(lambda: executor._max_workers == 0, TIMEOUT), "the node never left"
    return err


@pytest.fixture
def quick_resends(monkeypatch):
    monkeypatch.setattr(config, "RESEND_AFTER", 0.3)
    return {"FUTUREPOOL_RESEND_AFTER": "0.3"}


@pytest.mark.parametrize("kind", HEAD_SENDS + NODE_SENDS)
def test_a_lost_message_is_sent_again(kind, key_file, monkeypatch, quick_resends, capfd):
    rule = f"drop:{kind}:1"
    monkeypatch.setenv("FUTUREPOOL_TESTING_FAULTS", rule)
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        node_err = _exercise(executor, key_file,
                             dict(quick_resends, FUTUREPOOL_TESTING_FAULTS=rule))
    out, err = capfd.readouterr()
    # Proof the fault happened: some process lost one (workers' stderr reaches ours).
    assert f"testing fault: lost a {kind}" in err + node_err
    # Nothing a worker printed was lost either, and nothing twice.
    wrong = [i for i in range(30) if out.count(f"line {i}\n") != 1]
    assert not wrong, out


@pytest.mark.parametrize("kind", ["TASKS", "WELCOME", "READY", "RESULTS", "WORKER_EXITED",
                                  "LEAVE"])
def test_a_late_message_changes_nothing(kind, key_file, monkeypatch, quick_resends):
    rule = f"delay:{kind}:0.5"  # longer than RESEND_AFTER: the copy may arrive first
    monkeypatch.setenv("FUTUREPOOL_TESTING_FAULTS", rule)
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        _exercise(executor, key_file, dict(quick_resends, FUTUREPOOL_TESTING_FAULTS=rule))


def test_a_replayed_task_runs_once_and_its_result_counts_once(key_file, tmp_path,
                                                             quick_resends):
    """FAULTS 40: a TASKS message captured on the wire and sent again is dropped."""
    marks = tmp_path / "runs"
    marks.mkdir()
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        proc = start_worker(executor.address, key_file, workers=1, env=quick_resends)
        try:
            assert joined(executor, 1)
            head = executor._owner.head
            sent = []
            transmit = head.transmit

            def capture(routing_id, kind, header, body):
                if kind == MessageType.TASKS:
                    sent.append((routing_id, kind, header, body))
                    if len(sent) == 2:  # replay the first, inside the authenticated session
                        transmit(*sent[0])
                transmit(routing_id, kind, header, body)

            head.transmit = capture  # called on the owner's thread, as the original
            future = executor.submit(_mark, str(marks))
            counts = _settled_once([future])
            assert future.result(timeout=TIMEOUT) == 1
            assert decode_header(sent[0][2]).seq == 1
            assert executor.submit(abs, -5).result(timeout=TIMEOUT) == 5
            assert len(sent) == 2
            time.sleep(0.5)
            assert len(os.listdir(marks)) == 1, "the replayed task ran again"
            assert counts[id(future)] == 1
        finally:
            code, _out, err = stop(proc)
        assert code == 0, err


def _mark(directory):
    with open(os.path.join(directory, str(time.monotonic_ns())), "w"):
        pass
    return len(os.listdir(directory))


def test_a_stale_node_hears_bye_at_once(key_file, quick_resends):
    """FAULTS 31: a node the head declared dead is told so when it speaks again."""
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        with node_peer(executor.address, key_file) as peer:
            peer.send_multipart([pack_header(MessageType.HEARTBEAT)])
            assert peer.poll(TIMEOUT * 1000), "no answer"
            assert decode_header(peer.recv_multipart()[0]).kind == MessageType.BYE


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("the cluster needs Linux")
