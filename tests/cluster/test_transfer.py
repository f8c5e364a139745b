"""The transfer endpoints themselves (store.transfer), on loopback, in this process.

What the cluster tests cannot easily reach: who may ask for chunks, what may
be asked for, and what a puller leaves behind when every source fails.
"""

from __future__ import annotations

import os
import queue
import time

import numpy as np
import pytest
import zmq

from futurepool import config
from futurepool.protocol import security
from futurepool.protocol.framing import decode_header, pack_header
from futurepool.protocol.messages import CHUNK_BODY, MessageType
from futurepool.protocol.zap import AuthenticatorThread
from futurepool.store import segments, transfer
from futurepool.testing import wait_until

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


def test_a_large_pull_lands_whole_in_a_fresh_segment_then_in_a_reused_one(stores, endpoints):
    """The first copy is written through its file (segments.write_file), the second
    into the first's pages, reused once it was freed (through their mapping)."""
    head_store, c_store = stores(), stores()._replace(pool_bytes=1 << 30)
    head, _ = endpoints(head_store, head=True, bind="tcp://127.0.0.1:0")
    c, c_done = endpoints(c_store, head=False, bind=None, hub=head.address, node_index=1)
    nbytes = 24 * config.TRANSFER_CHUNK + 12345
    inodes, writer = [], segments.SegmentWriter(head_store, -1)
    for seed in (1, 2):
        data = np.random.default_rng(seed).integers(0, 255, nbytes, dtype=np.uint8)
        on_head = writer.write(memoryview(data))
        c.pull(seed, nbytes, [(-1, "", on_head.name, False)])
        _, location, why = c_done.get(timeout=TIMEOUT)
        assert location is not None and not location.spilled, why
        assert np.array_equal(np.frombuffer(segments.read(location, c_store.dirs), np.uint8),
                              data)
        inodes.append(os.stat(os.path.join(c_store.shm_dir, location.name)).st_ino)
        c.drop([location])
    assert inodes[0] == inodes[1], "the second pull did not reuse the first one's segment"


def test_a_pull_whose_filesystem_fills_up_lands_whole_in_the_spill_directory(
        keys, endpoints, tmpfs, tmp_path):
    """Another program fills shared memory after the pull's segment was made: its next
    chunk cannot be written (ENOSPC), and the pull starts again in the spill
    directory; nothing stays in shared memory. The holder is a socket of this test,
    so that the filesystem fills between two chunks."""
    shm, spill = tmpfs("48m"), str(tmp_path / "spill")
    os.mkdir(spill)
    c_store = segments.new_settings(shm, spill, config.SHM_PREFIX, 40 << 20, 0.5, 0,
                                    config.INLINE_THRESHOLD, writers=2)
    c, c_done = endpoints(c_store, head=False, bind=None)
    nbytes = 24 << 20
    data = os.urandom(nbytes)
    ctx = zmq.Context()
    auth = AuthenticatorThread(ctx, security.admitted_keys(keys, security.Role.NODE))
    holder = ctx.socket(zmq.ROUTER)
    try:
        holder.linger = 0
        security.make_curve_server(holder, keys, role=security.Role.NODE)
        auth.watch(holder)
        port = holder.bind_to_random_port("tcp://127.0.0.1")
        c.pull(1, nbytes, [(3, f"tcp://127.0.0.1:{port}", "piece", False)])
        served, filler = 0, os.path.join(shm, "filler")
        deadline = time.monotonic() + TIMEOUT
        while c_done.empty():
            if not holder.poll(50):
                assert time.monotonic() < deadline, "the puller stopped asking"
                continue
            peer, head, body = holder.recv_multipart()
            header = decode_header(head)
            _, offset, length, _, chunk = CHUNK_BODY.unpack_from(body)
            for index, start in enumerate(range(offset, offset + length, chunk), header.count):
                end = min(start + chunk, offset + length)
                holder.send_multipart([peer, pack_header(MessageType.CHUNK, index, header.ident),
                                       data[start:end]])
            served += 1
            if served == 1:  # another program takes what is left
                with open(filler, "wb") as f, pytest.raises(OSError):
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
        _, location, why = c_done.get(timeout=TIMEOUT)
        assert location is not None and location.spilled, why
        assert bytes(segments.read(location, c_store.dirs)) == data
        assert os.listdir(shm) == ["filler"], "a half-written segment stayed in shared memory"
        c.drop([location])
        assert wait_until(lambda: not os.listdir(spill), TIMEOUT)
    finally:
        holder.close()  # (before its authenticator, see zap.Authenticator)
        auth.stop()
        ctx.term()


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
                                 CHUNK_BODY.pack(-1, 0, 1000, piece.nbytes, 0)
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
                             CHUNK_BODY.pack(-1, 0, 1000, piece.nbytes, 0) + piece.name.encode()])
        assert sock.poll(TIMEOUT * 1000)
        header, chunk = sock.recv_multipart()
        assert decode_header(header).kind == MessageType.CHUNK and chunk == b"y" * 1000
        # A run of more chunks than a request may name: refused, nothing sent.
        sock.send_multipart([pack_header(MessageType.CHUNK_REQUEST, 0, 2),
                             CHUNK_BODY.pack(-1, 0, 5000, piece.nbytes, 1) + piece.name.encode()])
        assert sock.poll(TIMEOUT * 1000)
        header, body = sock.recv_multipart()
        assert decode_header(header).kind == MessageType.CHUNK_ERROR and b"too many" in body
        sock.close()
    finally:
        ctx.term()


def test_a_pull_in_progress_serves_what_has_landed_and_defers_the_rest(
        stores, endpoints, keys, monkeypatch):
    """Pipelined broadcast: b pulls a piece from a holder the test plays (answering out of
    order); a peer asking b for the piece by its primary name gets the chunks that have
    landed at once, the others when they land, and CHUNK_ERROR when b's own pull fails.
    A run of chunks asked at once is served chunk by chunk, each when it has landed.
    Nothing else is served under that name (another size), and nothing stays in b's store."""
    monkeypatch.setattr(config, "TRANSFER_CHUNK", 1000)
    monkeypatch.setattr(config, "TRANSFER_WINDOW", 3)
    monkeypatch.setattr(config, "TRANSFER_RUN", 1)  # b asks for its chunks one by one
    b_store = stores()
    b, b_done = endpoints(b_store, head=False, bind="tcp://127.0.0.1:0")
    key = f"{b_store.session}-abc-4294967296-0"  # as the directory names the primary
    data = os.urandom(5000)
    ctx = zmq.Context()
    try:
        holder = ctx.socket(zmq.ROUTER)
        holder.linger = 0
        security.make_curve_server(holder, keys, role=security.Role.NODE)
        holder.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 0)  # a stand-in: no ZAP handler here
        port = holder.bind_to_random_port("tcp://127.0.0.1")
        peer = ctx.socket(zmq.DEALER)
        peer.linger = 0
        security.make_curve_client(peer, keys, role=security.Role.NODE,
                                   server=security.Role.NODE)
        peer.connect(b.address)

        b.pull(1, len(data), [(0, f"tcp://127.0.0.1:{port}", key, False, key)])
        asked = {}
        for _ in range(3):  # b's window
            assert holder.poll(TIMEOUT * 1000)
            route, header, body = holder.recv_multipart()
            header = decode_header(header)
            assert header.kind == MessageType.CHUNK_REQUEST
            asked[header.count] = header.ident
        assert sorted(asked) == [0, 1, 2]

        def answer(index):
            holder.send_multipart([route, pack_header(MessageType.CHUNK, index, asked[index]),
                                   data[index * 1000:(index + 1) * 1000]])

        def ask(tid, offset, length, nbytes=5000, chunk=0, index=None):
            peer.send_multipart([pack_header(MessageType.CHUNK_REQUEST,
                                             tid if index is None else index, tid),
                                 CHUNK_BODY.pack(-1, offset, length, nbytes, chunk)
                                 + key.encode()])

        def reply():
            assert peer.poll(TIMEOUT * 1000), "no answer"
            header, body = peer.recv_multipart()
            header = decode_header(header)
            return header.kind, header.ident, body

        answer(1)  # out of order: chunk 1 lands first
        assert wait_until(lambda: b.forwarded == 0 and key in b._partial
                          and 1 in b._partial[key].landed, TIMEOUT)
        ask(10, 0, 1000)     # not landed yet: deferred
        ask(11, 1000, 1000)  # landed: at once
        assert reply() == (MessageType.CHUNK, 11, data[1000:2000])
        assert not peer.poll(200), "a chunk that has not landed was served"
        answer(0)
        assert reply() == (MessageType.CHUNK, 10, data[0:1000])
        ask(12, 500, 1000)  # spans chunks 0 and 1: both landed
        assert reply() == (MessageType.CHUNK, 12, data[500:1500])
        ask(13, 0, 1000, nbytes=999_999)  # not this piece's size: not served
        kind, ident, body = reply()
        assert (kind, ident) == (MessageType.CHUNK_ERROR, 13), body
        assert wait_until(lambda: b.forwarded == 3, TIMEOUT), b.forwarded  # (counted after)
        ask(15, 0, 3000, chunk=1000, index=0)  # a run: chunks 0 and 1 now, 2 deferred
        assert [reply() for _ in range(2)] == [(MessageType.CHUNK, 15, data[0:1000]),
                                               (MessageType.CHUNK, 15, data[1000:2000])]
        assert wait_until(lambda: b.forwarded == 5, TIMEOUT), b.forwarded
        ask(14, 4000, 1000)  # deferred, then b's own pull fails
        assert not peer.poll(200)
        holder.send_multipart([route, pack_header(MessageType.CHUNK_ERROR, 2, asked[2]),
                               b"gone"])
        failed = sorted(reply() for _ in range(2))
        assert [(kind, ident) for kind, ident, _ in failed] == \
            [(MessageType.CHUNK_ERROR, 14), (MessageType.CHUNK_ERROR, 15)]
        for _, _, body in failed:
            assert b"its own pull failed" in body and b"gone" in body, body
        pull_id, location, why = b_done.get(timeout=TIMEOUT)
        assert (pull_id, location) == (1, None) and "gone" in why
        assert key not in b._partial and _files(b_store) == []
    finally:
        ctx.destroy(linger=0)


def test_a_pull_from_a_host_still_pulling_completes(stores, endpoints, monkeypatch, tmp_path):
    """a holds it, b pulls from a, c pulls from b only (by the primary name): c gets every
    byte, forwarded while b receives or from b's finished copy."""
    monkeypatch.setattr(config, "TRANSFER_CHUNK", 64 << 10)
    a_store = stores()
    b_store, c_store = (a_store._replace(  # one cluster, one session; a store per host
        shm_dir=str(tmp_path / f"{host}-shm"), spill_dir=str(tmp_path / f"{host}-spill"))
        for host in "bc")
    for store in (b_store, c_store):
        os.mkdir(store.shm_dir)
        os.mkdir(store.spill_dir)
    a, _ = endpoints(a_store, head=False, bind="tcp://127.0.0.1:0")
    b, b_done = endpoints(b_store, head=False, bind="tcp://127.0.0.1:0")
    c, c_done = endpoints(c_store, head=False, bind="tcp://127.0.0.1:0")
    data = os.urandom(200 * (64 << 10) + 7)
    on_a = segments.SegmentWriter(a_store, 5).write(memoryview(data))
    key = on_a.name
    b.pull(1, len(data), [(0, a.address, key, False, key)])
    assert wait_until(lambda: key in b._partial or not b_done.empty(), TIMEOUT)
    c.pull(2, len(data), [(1, b.address, key, False, key)])
    for store, done in ((b_store, b_done), (c_store, c_done)):
        _, location, why = done.get(timeout=TIMEOUT)
        assert location is not None, why
        assert bytes(segments.read(location, store.dirs)) == data
        copy = location
    b.drop([b._aliases[key]])
    c.drop([copy])
    assert key not in b._aliases
    assert wait_until(lambda: not os.listdir(b_store.shm_dir) and not os.listdir(c_store.shm_dir),
                      TIMEOUT)
