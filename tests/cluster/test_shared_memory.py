"""The stdlib's shared memory across hosts (issue 10, point 7; ``futurepool.store.shared``).

Hosts are network namespaces, and here each node also has a ``/dev/shm`` of
its own (a tmpfs in a private mount namespace), as a separate machine does:
a segment's name means nothing there, so a task gets a mirror of the
driver's segment, and what it changes is written back into the original
before its future completes. The node's store directory lives inside its
private ``/dev/shm``; what is left there is read through ``/proc/PID/root``
while the node runs, and the tmpfs goes with the node's mount namespace.
"""

from __future__ import annotations

import array
import concurrent.futures
import contextlib
import gc
import os
import signal
import subprocess
import time
from multiprocessing import shared_memory

import pytest

import futurepool
from futurepool import config
from futurepool.store import shared
from futurepool.testing import wait_until
from futurepool.testing.netns import Network

from ._hosts import namespace_id
from ._nodes import TIMEOUT, joined, stop, worker_command

pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("network_available")]

#: The node's store, inside its own /dev/shm.
STORE = "/dev/shm/futurepool-store"


# --- tasks (importable on every node) -------------------------------------------------

def fill(shm, start: int, stop: int, seconds: float = 0.0):
    """Write int64 ``i * 3 + 1`` at every index of [start, stop); where this ran."""
    time.sleep(seconds)
    shm.buf[start * 8:stop * 8] = array.array("q", range(start * 3 + 1, stop * 3 + 1, 3)).tobytes()
    return os.readlink("/proc/self/ns/net"), shared.host_token(), shm.name


def fill_strided(shm, first: int, value: int, seconds: float = 0.0):
    """Bytes first, first + 2, ...: ``value`` (two tasks share every chunk, byte by byte)."""
    time.sleep(seconds)
    shm.buf[first::2] = bytes([value]) * len(shm.buf[first::2])
    return os.readlink("/proc/self/ns/net")


def fill_and_raise(shm):
    shm.buf[:4] = b"done"
    raise ValueError("after writing")


def fill_and_die(shm):
    shm.buf[:4] = b"dead"
    os.kill(os.getpid(), signal.SIGKILL)


def set_item(shareable, index: int, value):
    shareable[index] = value
    return os.readlink("/proc/self/ns/net"), list(shareable), shareable


def hold(seconds: float):
    time.sleep(seconds)


# --- the hosts --------------------------------------------------------------------------

class Hosts:
    """The network, and a node per member, each with a private /dev/shm."""

    def __init__(self, net: Network, key_file: str):
        self.net = net
        self.key_file = key_file
        self.nodes: dict[str, object] = {}

    def executor(self) -> futurepool.Executor:
        return futurepool.Executor(0, listen=f"tcp://{self.net.address('head')}:0",
                                   key_file=self.key_file)

    def start(self, executor, member: str) -> None:
        command = worker_command(executor.address, self.key_file, workers=1)
        script = (f"mount -t tmpfs -o size=256m,mode=1777 futurepool-test /dev/shm"
                  f" && mkdir -m 700 {STORE} && exec \"$@\"")
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))), FUTUREPOOL_SHM_DIR=STORE,
            FUTUREPOOL_STORE_POOL_BYTES="0", FUTUREPOOL_HEARTBEAT_INTERVAL="0.2")
        slots = executor._max_workers + 1
        self.nodes[member] = self.net.popen(
            member, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                     "sh", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env)
        assert joined(executor, slots), f"{member} did not join"

    def shm_files(self, member: str) -> list[str]:
        """What the node's /dev/shm holds besides its (empty) store directory."""
        root = f"/proc/{self.nodes[member].pid}/root/dev/shm"
        return sorted(os.listdir(root)) + sorted(os.listdir(root + STORE[len("/dev/shm"):]))

    def close(self) -> None:
        for proc in self.nodes.values():
            stop(proc)


@pytest.fixture
def hosts(key_file, monkeypatch):
    monkeypatch.setattr(config, "STORE_POOL_BYTES", 0)
    with Network(nodes=3, head_in_root=True) as net:
        made = Hosts(net, key_file)
        try:
            yield made
        finally:
            made.close()


@contextlib.contextmanager
def segment(nbytes: int):
    shm = shared_memory.SharedMemory(create=True, size=nbytes)
    try:
        yield shm
    finally:
        shm.close()
        shm.unlink()


def nothing_left(hosts, executor) -> None:
    """No mirror, copy or export left on any host once the futures are gone."""
    gc.collect()
    assert wait_until(lambda: all(hosts.shm_files(m) == ["futurepool-store"]
                                  for m in hosts.nodes), TIMEOUT), \
        {m: hosts.shm_files(m) for m in hosts.nodes}
    assert wait_until(lambda: not executor._owner.store.exports, TIMEOUT)
    assert not executor._owner.objects.copies


# --- tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("nbytes", [4096, 8 << 20], ids=["inline", "stored"])
def test_quarters_filled_on_three_hosts_read_back_exactly_in_the_driver(hosts, nbytes):
    """Issue 10, point 7: disjoint slices of one segment, filled by tasks on three other
    hosts (mirrors: another /dev/shm each), compose exactly as on one host."""
    n = nbytes // 8
    with hosts.executor() as executor, segment(nbytes) as shm:
        for member in ("node1", "node2", "node3"):
            hosts.start(executor, member)
        futures = [executor.submit(fill, shm, q * n // 4, (q + 1) * n // 4, 0.5)
                   for q in range(4)]
        ran = [f.result(timeout=TIMEOUT) for f in futures]
        # Every write-back landed before its future completed.
        assert array.array("q", bytes(shm.buf)) == array.array("q", range(1, 3 * n + 1, 3))
        assert {ns for ns, _, _ in ran} == {namespace_id(hosts.net.namespace(m))
                                            for m in ("node1", "node2", "node3")}
        assert shared.host_token() not in {token for _, token, _ in ran}, "mirrors"
        assert {name for _, _, name in ran} == {shm.name}, "a mirror answers to its name"
        del futures
        nothing_left(hosts, executor)


def test_interleaved_writers_on_two_hosts_keep_each_others_bytes(hosts):
    """Write-backs are exact to the byte: a[0::2] and a[1::2] from two hosts both survive,
    though every chunk each one sends back holds bytes of the other's."""
    with hosts.executor() as executor, segment(3 << 20) as shm:
        shm.buf[:] = b"\xee" * len(shm.buf)
        hosts.start(executor, "node1")
        hosts.start(executor, "node2")
        # Both mirrors are taken before either write-back (each node has one slot).
        first = executor.submit(fill_strided, shm, 0, 0x11, 0.5)
        second = executor.submit(fill_strided, shm, 1, 0x22, 0.5)
        assert first.result(timeout=TIMEOUT) != second.result(timeout=TIMEOUT)
        assert bytes(shm.buf) == b"\x11\x22" * (len(shm.buf) // 2)
        del first, second
        nothing_left(hosts, executor)


def test_a_task_that_raises_still_writes_back_and_a_shareable_list_crosses(hosts):
    """What a task changed before it raised is written back (as on one host, where the
    writes are simply there), and a ShareableList arrives as one on another host."""
    with hosts.executor() as executor, segment(1 << 20) as shm:
        hosts.start(executor, "node1")
        with pytest.raises(ValueError, match="after writing"):
            executor.submit(fill_and_raise, shm).result(timeout=TIMEOUT)
        assert bytes(shm.buf[:4]) == b"done"
        listed = shared_memory.ShareableList([1, "two", 3.0])
        try:
            where, seen, back = executor.submit(set_item, listed, 1, "TWO").result(
                timeout=TIMEOUT)
            assert where == namespace_id(hosts.net.namespace("node1"))
            assert seen == [1, "TWO", 3.0]
            assert list(listed) == [1, "TWO", 3.0]
            # Returned from the task, the list is the driver's own again, as on one host.
            assert back.shm.name == listed.shm.name and list(back) == [1, "TWO", 3.0]
            back.shm.close()
        finally:
            listed.shm.close()
            listed.shm.unlink()
        nothing_left(hosts, executor)


def test_a_worker_killed_in_a_task_writes_nothing_back_and_leaves_no_mirror(hosts):
    """Only a task that ended writes back; the node removes a dead worker's mirrors."""
    with hosts.executor() as executor, segment(1 << 20) as shm:
        hosts.start(executor, "node1")
        with pytest.raises(futurepool.WorkerCrashedError):
            executor.submit(fill_and_die, shm).result(timeout=TIMEOUT)
        assert bytes(shm.buf[:4]) == bytes(4)
        nothing_left(hosts, executor)


def test_a_segment_on_the_heads_host_is_attached_there_not_mirrored(key_file):
    """On the driver's host a task attaches the segment itself (zero copy), as with the
    stdlib: nothing is exported into the store, nothing written back."""
    with futurepool.Executor(1) as executor, segment(8 << 20) as shm:
        where, token, name = executor.submit(fill, shm, 0, 1 << 20).result(timeout=TIMEOUT)
        assert name == shm.name
        assert token == shared.host_token()
        assert array.array("q", bytes(shm.buf[:8 << 20]))[:3].tolist() == [1, 4, 7]
        assert concurrent.futures.wait([executor.submit(hold, 0)], TIMEOUT).done


def test_tasks_over_a_large_segment_go_to_its_host_while_it_has_free_workers(hosts):
    """Locality: the segment counts as bytes held by the driver's host."""
    with futurepool.Executor(2, listen=f"tcp://{hosts.net.address('head')}:0",
                             key_file=hosts.key_file) as executor, segment(8 << 20) as shm:
        hosts.start(executor, "node1")
        futures = [executor.submit(fill, shm, 0, 1, 0.3) for _ in range(2)]
        assert {f.result(timeout=TIMEOUT)[1] for f in futures} == {shared.host_token()}
        del futures
        nothing_left(hosts, executor)
