"""Objects across hosts (issue 10): pulls, copies, frees, locality, cut transfers.

Hosts are network namespaces (``futurepool.testing.netns``): the head is this
test process, ``node1`` and ``node2`` run ``futurepool worker``. Each node
gets a store directory of its own (``FUTUREPOOL_SHM_DIR``, a folder in
``/dev/shm``), so that a node can only read another's pieces by pulling them,
as on separate machines, and so that each host's view can be checked for
leftovers. Pools of freed segments are off (``STORE_POOL_BYTES=0``): a freed
piece is unlinked at once, so "freed on every host" is "its file is gone".
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import os
import shutil
import signal
import time

import pytest

import futurepool
from futurepool import config
from futurepool.core import status
from futurepool.core.directory import HEAD, host_of
from futurepool.errors import ObjectLostError, ObjectStoreFullError
from futurepool.testing import netns, wait_until
from futurepool.testing.netns import Network

from ._hosts import namespace_id
from ._nodes import TIMEOUT, joined, start_worker, stop
from ._objects import hold, make, where_total

pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("network_available")]

MB = 1_000_000


class Hosts:
    """The network, the nodes started on it, and each node's store directory."""

    def __init__(self, net: Network, key_file: str):
        self.net = net
        self.key_file = key_file
        self.nodes: dict[str, object] = {}
        self.dirs: dict[str, str] = {}
        for member in net.nodes:
            path = os.path.join("/dev/shm", f"{os.environ['FUTUREPOOL_SHM_PREFIX']}{member}-"
                                            f"{net.token}")
            os.mkdir(path, 0o700)
            self.dirs[member] = path

    def executor(self) -> futurepool.Executor:
        return futurepool.Executor(0, listen=f"tcp://{self.net.address('head')}:0",
                                   key_file=self.key_file)

    def start(self, executor, member: str, workers: int = 1, **env: str) -> None:
        env = {"FUTUREPOOL_SHM_DIR": self.dirs[member], "FUTUREPOOL_STORE_POOL_BYTES": "0",
               "FUTUREPOOL_TRANSFER_TIMEOUT": "2", "FUTUREPOOL_NODE_TIMEOUT": "1.5",
               "FUTUREPOOL_HEARTBEAT_INTERVAL": "0.2", **env}
        slots = executor._max_workers + workers
        self.nodes[member] = start_worker(executor.address, self.key_file, net=self.net,
                                          member=member, workers=workers, env=env)
        assert joined(executor, slots), f"{member} did not join"

    def files(self, member: str) -> list[str]:
        return sorted(os.listdir(self.dirs[member]))

    def ns(self, member: str) -> str:
        return namespace_id(self.net.namespace(member))

    def close(self) -> None:
        for proc in self.nodes.values():
            stop(proc)
        for member, path in self.dirs.items():
            left = os.listdir(path)
            shutil.rmtree(path, ignore_errors=True)
            assert not left, f"{member}'s store kept {left}"


@contextlib.contextmanager
def network_of(nodes: int, key_file, monkeypatch):
    """``nodes`` hosts besides the head, with this module's settings; checked at the end."""
    monkeypatch.setattr(config, "STORE_POOL_BYTES", 0)
    monkeypatch.setattr(config, "NODE_TIMEOUT", 1.5)
    monkeypatch.setattr(config, "HEARTBEAT_INTERVAL", 0.2)
    monkeypatch.setattr(config, "TRANSFER_TIMEOUT", 2.0)
    with Network(nodes=nodes, head_in_root=True) as net:
        made = Hosts(net, key_file)
        try:
            yield made
        finally:
            made.close()


@pytest.fixture
def hosts(key_file, monkeypatch):
    with network_of(2, key_file, monkeypatch) as made:
        yield made


def primary(future) -> object:
    """The stored piece (a Block) holding a done future's value (a large pickle is one)."""
    inband, pieces = future._encoded
    return pieces[0] if pieces else inband


def made_on_node1(hosts, executor, nbytes: int, maker=make):
    """A future whose array (made by ``maker``) lives on node1 (the only node when it runs)."""
    hosts.start(executor, "node1")
    future = executor.submit(maker, nbytes)
    concurrent.futures.wait([future], TIMEOUT)
    block = primary(future)
    assert host_of(block.location) == 0
    assert block.location.name in hosts.files("node1")
    return future, block


def head_files(executor) -> list[str]:
    settings = executor._owner.store.settings
    return [n for n in os.listdir(settings.shm_dir) if n.startswith(settings.session + "-")]


@pytest.mark.parametrize("node1_address", ["", "none"], ids=["direct", "relayed"])
def test_a_task_on_another_node_pulls_its_argument(hosts, node1_address):
    """B made it, C needs it: C pulls it from B directly, or through the head when
    B has no address anyone can dial."""
    with hosts.executor() as executor:
        hosts.start(executor, "node1", FUTUREPOOL_TRANSFER_ADDRESS=node1_address)
        future = executor.submit(make, 30 * MB)
        concurrent.futures.wait([future], TIMEOUT)
        block = primary(future)
        blocker = executor.submit(hold, 30)  # node1's only worker: the next task goes elsewhere
        hosts.start(executor, "node2")
        node1, node2 = (executor._owner.head.by_index[i] for i in (0, 1))
        assert bool(node1.transfer) == (node1_address == "") and node2.transfer
        where, total = executor.submit(where_total, future).result(timeout=TIMEOUT)
        assert where == hosts.ns("node2")
        assert total == 7 * 30 * MB
        copies = executor._owner.objects.copies[block.location.name]
        assert set(copies) == {1}, "the copy is on node2 only (nothing went to the head)"
        assert copies[1].name in hosts.files("node2")
        relayed = executor._owner.head.transfer.relayed
        assert (relayed > 0) == (node1_address == "none"), relayed
        assert blocker.stop()


def test_result_in_the_driver_pulls_into_the_heads_store_and_frees_everywhere(hosts):
    """FAULTS 25 across hosts: the last reference gone, every copy on every host goes."""
    with hosts.executor() as executor:
        future, block = made_on_node1(hosts, executor, 20 * MB)
        name = block.location.name
        blocker = executor.submit(hold, 30)
        hosts.start(executor, "node2")
        array = future.result(timeout=TIMEOUT)
        assert len(array) == 20 * MB and array.count(7) == 20 * MB
        copies = executor._owner.objects.copies[name]
        assert copies[HEAD].name in head_files(executor)
        where, _ = executor.submit(where_total, future).result(timeout=TIMEOUT)
        assert where == hosts.ns("node2")
        assert set(copies) == {HEAD, 1}
        node2_copy = copies[1].name
        assert node2_copy in hosts.files("node2")
        head_copy = copies[HEAD].name
        # A writer frees what it wrote between tasks (as on one host): let node1's go.
        assert blocker.stop()
        del array, future, block, copies
        gc.collect()
        assert wait_until(lambda: not hosts.files("node1") and not hosts.files("node2")
                          and head_copy not in head_files(executor), TIMEOUT), \
            (hosts.files("node1"), hosts.files("node2"), head_files(executor))
        assert name not in executor._owner.objects.copies


def test_tasks_go_where_their_argument_is(hosts):
    """Locality: with free slots on both nodes, tasks over a large value run where it is."""
    with hosts.executor() as executor:
        hosts.start(executor, "node1", workers=2)
        hosts.start(executor, "node2", workers=2)
        future = executor.submit(make, 10 * MB)
        concurrent.futures.wait([future], TIMEOUT)
        holder = "node1" if host_of(primary(future).location) == 0 else "node2"
        together = [executor.submit(where_total, future, 0.3) for _ in range(2)]
        assert {f.result(timeout=TIMEOUT)[0] for f in together} == {hosts.ns(holder)}
        for _ in range(4):
            assert executor.submit(where_total, future).result(timeout=TIMEOUT)[0] \
                == hosts.ns(holder)
        assert primary(future).location.name not in executor._owner.objects.copies
        # With the holder's two slots full, a third task runs on the other node (a pull).
        busy = [executor.submit(where_total, future, 2.0) for _ in range(2)]
        time.sleep(0.3)
        other = executor.submit(where_total, future).result(timeout=TIMEOUT)[0]
        assert other != hosts.ns(holder)
        assert {f.result(timeout=TIMEOUT)[0] for f in busy} == {hosts.ns(holder)}


@pytest.mark.parametrize("cut, second_copy", [("kill", True), ("kill", False),
                                              ("link_down", True)],
                         ids=["killed-retried", "killed-lost", "link_down-retried"])
def test_a_transfer_cut_in_flight(hosts, monkeypatch, cut, second_copy):
    """FAULTS 43: the sender is killed (or its link goes down) mid-transfer. With another
    copy (the head's) the pull starts again from it; without, and with reconstruction
    off, the task fails with ObjectLostError (with it on, the producer is re-run:
    test_lineage.py). Never a hang; the half-written segment is removed."""
    if not second_copy:
        monkeypatch.setattr(config, "MAX_RECONSTRUCTIONS", 0)
    with hosts.executor() as executor:
        future, block = made_on_node1(hosts, executor, 40 * MB)
        if second_copy:
            assert len(future.result(timeout=TIMEOUT)) == 40 * MB  # the head has a copy
        hosts.start(executor, "node2")
        executor.submit(hold, 60)  # node1's only worker
        hosts.net.shape("node1", 16_000_000)  # 40 MB take 20 s from node1
        started = time.monotonic()
        task = executor.submit(where_total, future)
        assert wait_until(lambda: any("--2-" in n for n in hosts.files("node2")), TIMEOUT), \
            "node2 did not start receiving"
        if cut == "kill":
            hosts.nodes["node1"].send_signal(signal.SIGKILL)
        else:
            hosts.net.link_down("node1")
        if second_copy:
            where, total = task.result(timeout=TIMEOUT)
            assert where == hosts.ns("node2") and total == 7 * 40 * MB
            assert len([n for n in hosts.files("node2") if "--2-" in n]) == 1
        else:
            with pytest.raises(ObjectLostError, match=block.location.name) as info:
                task.result(timeout=TIMEOUT)
            assert "node 0" in str(info.value) and "Reconstruction is off" in str(info.value)
            assert not [n for n in hosts.files("node2") if "--2-" in n], \
                "the half-written copy was left behind"
        assert time.monotonic() - started < TIMEOUT
        if cut == "link_down":
            hosts.net.link_up("node1")
        hosts.net.unshape("node1")
        stop(hosts.nodes.pop("node1"))
        assert wait_until(lambda: not hosts.files("node1"), TIMEOUT), hosts.files("node1")
        del future, block
        # The executor is still usable.
        assert executor.submit(abs, -3).result(timeout=TIMEOUT) == 3


def test_nothing_of_a_session_is_left_on_any_host(hosts):
    """A node's session ends with the head: its pieces and its copies go with it."""
    with hosts.executor() as executor:
        future, _ = made_on_node1(hosts, executor, 5 * MB)
        hosts.start(executor, "node2")
        executor.submit(hold, 30)
        assert executor.submit(where_total, future).result(timeout=TIMEOUT)[1] == 35 * MB
        assert hosts.files("node1") and hosts.files("node2")
    for member in ("node1", "node2"):
        stop(hosts.nodes.pop(member))
        assert wait_until(lambda m=member: not hosts.files(m), TIMEOUT), hosts.files(member)
    assert netns.leftovers(hosts.net.prefix)  # (the network itself goes with the fixture)


@pytest.fixture
def small_store(tmpfs):
    """A store for one node on private tmpfs mounts, so that no other test's use of
    ``/dev/shm`` changes what it sees: ``small_store(shm, spill, capacity)`` -> the
    node's environment; the mounts go at the end."""

    def store(shm: str, spill: str, capacity: int) -> dict[str, str]:
        return {"FUTUREPOOL_SHM_DIR": tmpfs(shm), "FUTUREPOOL_SPILL_DIR": tmpfs(spill),
                "FUTUREPOOL_STORE_CAPACITY": str(capacity)}

    return store


def test_a_full_store_drops_secondary_copies_never_the_last(hosts, small_store):
    """Issue 10, point 2: node2's store holds three 8 MB copies (capacity 30 MB, and a
    spill directory too small for anything). A fourth pull finds it full: the least
    recently used secondary copy there (the head still holds its value) is dropped and
    the pull asked again; the copy whose value has no other holder left (its node was
    lost) is never dropped. A pull that dropping cannot make room for fails with
    ObjectStoreFullError saying so."""
    env = small_store("64m", "1m", 30 * MB)
    node2_store = env["FUTUREPOOL_SHM_DIR"]

    def held():
        return set(os.listdir(node2_store))

    with hosts.executor() as executor:
        directory = executor._owner.objects
        last, last_block = made_on_node1(hosts, executor, 8 * MB)
        blocker = executor.submit(hold, 60)  # node1's only worker: node2 pulls `last`
        hosts.start(executor, "node2", **env)
        node2 = hosts.ns("node2")
        assert executor.submit(where_total, last).result(timeout=TIMEOUT) == (node2, 56 * MB)
        last_copy = directory.copies[last_block.location.name][1].name
        # node1 is lost: node2's copy of `last` is the only one left.
        assert blocker.stop()
        hosts.nodes["node1"].send_signal(signal.SIGKILL)
        assert wait_until(lambda: 0 not in executor._owner.head.by_index, TIMEOUT)
        stop(hosts.nodes.pop("node1"))
        assert wait_until(lambda: not hosts.files("node1"), TIMEOUT), hosts.files("node1")

        # Values of the head (its store keeps them): node2's copies of them are secondary.
        first, second, third = (executor.put(bytearray([7]) * (8 * MB)) for _ in range(3))
        for value in (first, second, first):  # `first` used last
            assert executor.submit(where_total, value).result(timeout=TIMEOUT) \
                == (node2, 56 * MB)
        first_copy, second_copy = (directory.copies[primary(value).location.name][1].name
                                   for value in (first, second))
        assert {last_copy, first_copy, second_copy} <= held()
        assert directory.evicted_copies == 0
        # No room for a fourth copy: `second`'s goes (least recently used), not `last`'s.
        assert executor.submit(where_total, third).result(timeout=TIMEOUT) == (node2, 56 * MB)
        assert (directory.evicted_copies, directory.evicted_bytes) \
            == (1, primary(second).location.nbytes)
        assert 1 not in directory.copies.get(primary(second).location.name, {})
        assert wait_until(lambda: second_copy not in held(), TIMEOUT), held()
        assert {last_copy, first_copy} <= held()

        # 24 MB cannot fit beside `last`, whatever else goes: the other copies are
        # dropped, the pull asked again once, and the task fails saying why.
        big = executor.put(bytearray([7]) * (24 * MB))
        with pytest.raises(ObjectStoreFullError, match="the store on that host is full") as info:
            executor.submit(where_total, big).result(timeout=TIMEOUT)
        assert "2 copies of other values there" in str(info.value), info.value
        assert directory.evicted_copies == 3
        assert wait_until(lambda: held() == {last_copy}, TIMEOUT), held()  # nothing half-written
        # The last copy still serves tasks there; a dropped one is pulled again.
        assert executor.submit(where_total, last).result(timeout=TIMEOUT) == (node2, 56 * MB)
        assert executor.submit(where_total, second).result(timeout=TIMEOUT) == (node2, 56 * MB)
        answer = status.snapshot(executor._owner)  # what `futurepool status` shows
        assert answer["objects"]["evicted_copies"] == 3, answer["objects"]
        assert "3 dropped to make room" in status.render(answer)
        del last, last_block, first, second, third, big, info
    # The session's end removes node2's copies.
    assert wait_until(lambda: not held(), TIMEOUT), held()
