"""The cluster under attack and under faults: FAULTS.md §3 D and E, against a real head.

Each test listens on loopback with a key file of its own; strangers and
broken peers are real zmq sockets and raw TCP connections.
"""

from __future__ import annotations

import os
import pickle
import socket
import time

import pytest
import zmq

import futurepool
from futurepool.protocol import security
from futurepool.protocol.framing import pack_header
from futurepool.protocol.messages import MessageType
from futurepool.testing import wait_until

from ._nodes import TIMEOUT, joined, node_peer, start_worker, stop, where


class _Canary:
    """Unpickling this creates a file: it must never happen on the head."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_listening_beyond_loopback_needs_a_key_made_on_purpose(tmp_path):
    """FAULTS 36: no key file and a non-loopback address: refused, pointing to keygen."""
    missing = tmp_path / "none.key"
    with pytest.raises(security.KeyFileError, match="futurepool keygen"):
        futurepool.Executor(1, listen="tcp://0.0.0.0:0", key_file=str(missing))
    assert not missing.exists()


def test_a_key_file_others_can_read_is_refused(tmp_path, key_file):
    """FAULTS 41."""
    os.chmod(key_file, 0o644)
    with pytest.raises(security.KeyFileError, match="0644") as info:
        futurepool.Executor(1, listen="tcp://127.0.0.1:0", key_file=key_file)
    assert key_file in str(info.value)


def test_strangers_never_get_a_frame_read(tmp_path, key_file, caplog):
    """FAULTS 37: plain zmq, raw bytes, another key: no unpickling, the head stays healthy."""
    canary = tmp_path / "canary"
    poison = pickle.dumps({"versions": _Canary(str(canary))})
    other = security.derive_keypairs(os.urandom(32))
    with futurepool.Executor(1, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        port = int(executor.address.rsplit(":", 1)[1])
        ctx = zmq.Context()
        try:
            plain = ctx.socket(zmq.DEALER)
            wrong = ctx.socket(zmq.DEALER)
            security.make_curve_client(wrong, other)
            for sock in (plain, wrong):
                sock.linger = 0
                sock.connect(executor.address)
                sock.send_multipart([pack_header(MessageType.JOIN), poison])
                sock.send_multipart([pack_header(MessageType.STATUS)])
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
                raw.sendall(b"\xff" * 64 + poison)
                time.sleep(0.5)
            for sock in (plain, wrong):
                assert not sock.poll(500), "a stranger got an answer"
                sock.close()
        finally:
            ctx.term()
        assert not canary.exists()
        assert executor.submit(abs, -3).result(timeout=TIMEOUT) == 3
        assert executor._owner.head.auth.refused >= 2
    assert not canary.exists()


def test_malformed_frames_from_an_authenticated_peer_are_dropped(key_file):
    """FAULTS 39: bad version byte, unknown type, truncated header, garbage pickle."""
    with futurepool.Executor(1, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        with node_peer(executor.address, key_file) as peer:
            good = pack_header(MessageType.JOIN)
            for frames in ([good[:2] + b"\x63" + good[3:], b""], [good[:3] + b"\x7f" + good[4:]],
                           [good[:5]], [good, b"not a pickle"], [good, pickle.dumps(42)]):
                peer.send_multipart(frames)
            assert wait_until(lambda: executor._owner.head.dropped >= 4, TIMEOUT)
        assert executor.submit(abs, -3).result(timeout=TIMEOUT) == 3


def test_a_node_registers_afresh_with_the_next_head(key_file):
    """FAULTS 35: the head restarts on the same address; the node joins the new one."""
    address = f"tcp://127.0.0.1:{_free_port()}"
    with futurepool.Executor(0, listen=address, key_file=key_file) as first:
        proc = start_worker(address, key_file, workers=1)
        try:
            assert joined(first, 1)
            assert first.submit(where, 1).result(timeout=TIMEOUT)[1] == 1
        except BaseException:
            stop(proc)
            raise
    try:
        with futurepool.Executor(0, listen=address, key_file=key_file) as second:
            assert joined(second, 1), "the node did not come back to the next head"
            assert second.submit(where, 2).result(timeout=TIMEOUT)[1] == 2
    finally:
        code, _out, err = stop(proc)
    assert code == 0, err


def test_a_frozen_node_does_not_resurrect_fenced_work(key_file, tmp_path):
    """FAULTS 34: frozen past the deadline, thawed: its late result is dropped, once."""
    env = {"FUTUREPOOL_NODE_TIMEOUT": "1.5", "FUTUREPOOL_HEARTBEAT_INTERVAL": "0.2"}
    from futurepool import config

    old = config.NODE_TIMEOUT, config.HEARTBEAT_INTERVAL
    config.NODE_TIMEOUT, config.HEARTBEAT_INTERVAL = 1.5, 0.2
    try:
        with futurepool.Executor(1, listen="tcp://127.0.0.1:0", key_file=key_file,
                                 max_retries=1) as executor:
            proc = start_worker(executor.address, key_file, workers=1, env=env)
            try:
                assert joined(executor, 2)
                busy = executor.submit(time.sleep, 1.0)  # the local worker is taken
                task = executor.submit(where, "once", 1.0)
                time.sleep(0.3)
                proc.send_signal(19)  # SIGSTOP
                namespace, value = task.result(timeout=TIMEOUT)  # re-run after the deadline
                assert value == "once"
                proc.send_signal(18)  # SIGCONT: its late result must not count again
                busy.result(timeout=TIMEOUT)
                assert wait_until(lambda: executor._max_workers == 2, TIMEOUT)
                assert task.result() == (namespace, "once")
            finally:
                proc.send_signal(18)
                stop(proc)
    finally:
        config.NODE_TIMEOUT, config.HEARTBEAT_INTERVAL = old



def test_a_node_speaking_another_protocol_is_refused_with_the_difference(key_file):
    """A node running other futurepool code: its JOIN is read and refused, not ignored."""
    from futurepool.core.head import versions
    from futurepool.protocol.framing import decode_header
    from futurepool.protocol.messages import HEADER, MAGIC, PROTOCOL_VERSION
    from futurepool.store import serialize

    theirs = dict(versions(), protocol=str(PROTOCOL_VERSION + 1))
    hello = {"versions": theirs, "host": "elsewhere", "workers": 1, "pid": 1,
             "token": b"t" * 32}
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION + 1, MessageType.JOIN, 0, 0, 0, 0)
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        with node_peer(executor.address, key_file) as peer:
            peer.send_multipart([header, serialize.dumps_plain(hello)])
            assert peer.poll(TIMEOUT * 1000), "no answer to a JOIN of another protocol"
            answer = peer.recv_multipart()
        assert decode_header(answer[0]).kind == MessageType.REFUSED
        text = answer[1].decode()
        assert "protocol" in text and str(PROTOCOL_VERSION + 1) in text, text
        assert executor._max_workers == 0
