"""The transfer endpoints themselves (store.transfer), on loopback, in this process.

What the cluster tests cannot easily reach: who may ask for chunks, what may
be asked for, and what a puller leaves behind when every source fails.
"""

from __future__ import annotations

import os
import queue

import pytest
import zmq

from futurepool import config
from futurepool.protocol import security
from futurepool.protocol.framing import decode_header, pack_header
from futurepool.protocol.messages import CHUNK_BODY, MessageType
from futurepool.store import segments, transfer

from .conftest import TIMEOUT


@pytest.fixture
def stores():
    made = []

    def make():
        settings = segments.new_settings(config.SHM_DIR, config.SPILL_DIR, config.SHM_PREFIX,
                                         0, 0.5, 0, config.INLINE_THRESHOLD, writers=2)
        made.append(settings)
        return settings

    yield make
    for settings in made:
        segments.remove_files(settings.dirs, settings.session + "-")


@pytest.fixture
def endpoints(keys):
    made = []

    def make(settings, **kwargs):
        done = queue.Queue()
        # zero_copy=False: pyzmq's garbage thread would outlive the test (module docstring
        # of store.transfer); the nodes' own processes send without copying.
        endpoint = transfer.Endpoint(keys, settings, on_done=lambda *a: done.put(a),
                                     zero_copy=False, **kwargs)
        made.append(endpoint)
        return endpoint, done

    yield make
    for endpoint in reversed(made):
        endpoint.close()


def _files(settings) -> list[str]:
    return [n for n in os.listdir(settings.shm_dir) if n.startswith(settings.session + "-")]


def test_pulls_direct_from_the_head_and_relayed(stores, endpoints):
    head_store, b_store, c_store = stores(), stores(), stores()
    head, head_done = endpoints(head_store, head=True, bind="tcp://127.0.0.1:0")
    b, _ = endpoints(b_store, head=False, bind=None, hub=head.address, node_index=0)
    c, c_done = endpoints(c_store, head=False, bind="tcp://127.0.0.1:0", hub=head.address,
                          node_index=1)
    data = os.urandom(3 * config.TRANSFER_CHUNK + 12345)  # not a whole number of chunks
    on_head = segments.SegmentWriter(head_store, -1).write(memoryview(data))
    on_b = segments.SegmentWriter(b_store, 5).write(memoryview(data))
    c.pull(1, len(data), [(-1, "", on_head.name, False)])
    c.pull(2, len(data), [(0, "", on_b.name, False)])  # b has no address: through the head
    got = {}
    for _ in range(2):
        pull_id, location, why = c_done.get(timeout=TIMEOUT)
        assert location is not None, why
        got[pull_id] = bytes(segments.read(location, c_store.dirs))
    assert got == {1: data, 2: data}
    assert head.relayed >= 4
    head.pull(3, len(data), [(0, "", on_b.name, False)])  # the head asks b itself
    _, location, why = head_done.get(timeout=TIMEOUT)
    assert bytes(segments.read(location, head_store.dirs)) == data, why


def test_only_this_sessions_pieces_are_served_and_nothing_half_written_stays(
        stores, endpoints, monkeypatch, tmp_path):
    monkeypatch.setattr(config, "TRANSFER_TIMEOUT", 0.5)
    head_store, c_store = stores(), stores()
    head, _ = endpoints(head_store, head=True, bind="tcp://127.0.0.1:0")
    c, c_done = endpoints(c_store, head=False, bind=None, hub=head.address, node_index=1)
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 4096)
    c.pull(1, 4096, [(-1, "", f"../../{secret}", False), (-1, "", "fp_other-1-1", False),
                     (7, "", "anything", False), (3, "tcp://127.0.0.1:9", "x", False)])
    pull_id, location, why = c_done.get(timeout=TIMEOUT)
    assert (pull_id, location) == (1, None)
    assert why.count("is not a piece of this host's session") == 2, why
    assert "node 7 has no transfer connection to the head" in why
    assert "no data for 0.5 s" in why
    assert head.refusals == 3
    assert _files(c_store) == [], "the reserved segment was left behind"


def test_a_peer_without_the_key_gets_nothing(stores, endpoints):
    head_store = stores()
    head, _ = endpoints(head_store, head=True, bind="tcp://127.0.0.1:0")
    piece = segments.SegmentWriter(head_store, -1).write(memoryview(b"y" * 300_000))
    ctx = zmq.Context()
    try:
        for keys in (None, security.derive_keypairs(os.urandom(32))):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            if keys is not None:
                security.make_curve_client(sock, keys)
            sock.connect(head.address)
            sock.send_multipart([pack_header(MessageType.CHUNK_REQUEST, 0, 1),
                                 CHUNK_BODY.pack(-1, 0, 1000, piece.nbytes)
                                 + piece.name.encode()])
            assert not sock.poll(1000), "a stranger got an answer"
            sock.close()
        assert head.auth.refused >= 2
        # With the key: served.
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        security.make_curve_client(sock, head.keys)
        sock.connect(head.address)
        sock.send_multipart([pack_header(MessageType.CHUNK_REQUEST, 0, 1),
                             CHUNK_BODY.pack(-1, 0, 1000, piece.nbytes) + piece.name.encode()])
        assert sock.poll(TIMEOUT * 1000)
        header, chunk = sock.recv_multipart()
        assert decode_header(header).kind == MessageType.CHUNK and chunk == b"y" * 1000
        sock.close()
    finally:
        ctx.term()
