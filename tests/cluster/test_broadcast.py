"""Pipelined broadcast (issue 10, point 4): a host still receiving a value forwards it.

One value made on ``node1`` is needed at once by tasks on ``node2``, ``node3``
and ``node4``: the directory chains their pulls (node1 → node2 → node3 → node4),
each forwarding the chunks that have landed in its reserved segment while
it still receives. Hosts, stores and checks as in ``test_objects.py``.
"""

from __future__ import annotations

import gc
import os
import signal
import time
import zlib

import pytest

from futurepool.errors import WorkerCrashedError
from futurepool.testing import wait_until

from ._nodes import TIMEOUT, stop
from ._objects import hold, pattern, where_crc
from .test_objects import head_files, network_of
from .test_objects import made_on_node1 as objects_made_on_node1

pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("network_available")]

MB = 1_000_000


@pytest.fixture
def hosts(key_file, monkeypatch):
    with network_of(4, key_file, monkeypatch) as made:
        yield made


def made_on_node1(hosts, executor, nbytes: int):
    """The value (checked byte by byte) on node1, whose only worker is then kept busy."""
    future, block = objects_made_on_node1(hosts, executor, nbytes, pattern)
    blocker = executor.submit(hold, 60)  # node1's only worker: the tasks go elsewhere
    return future, block, blocker


def ready(hosts, executor, members) -> None:
    """Until every node's worker takes tasks (a node joins before its worker has
    started): one short task per node at once, on every one of them."""
    expected = {hosts.ns(m) for m in members}
    deadline = time.monotonic() + TIMEOUT
    while True:
        ran = [executor.submit(hold, 0.3) for _ in members]
        if {f.result(timeout=TIMEOUT) for f in ran} == expected:
            return
        assert time.monotonic() < deadline, "the nodes' workers did not all start"


def copies_here(hosts, member: str) -> list[str]:
    return [n for n in hosts.files(member) if "--2-" in n]


@pytest.mark.parametrize("address", ["", "none"], ids=["direct", "relayed"])
def test_a_value_needed_on_three_nodes_at_once_is_pulled_along_a_chain(hosts, address):
    """Relayed: no receiver can be dialled, so each link of the chain goes through the
    head's endpoint, chunk by chunk."""
    nbytes = 64 * MB
    with hosts.executor() as executor:
        future, block, blocker = made_on_node1(hosts, executor, nbytes)
        for member in ("node2", "node3", "node4"):
            hosts.start(executor, member, FUTUREPOOL_TRANSFER_ADDRESS=address)
        ready(hosts, executor, ("node2", "node3", "node4"))
        directory = executor._owner.objects
        expected = zlib.crc32(pattern(nbytes))
        tasks = [executor.submit(where_crc, future) for _ in range(3)]
        results = [task.result(timeout=3 * TIMEOUT) for task in tasks]
        assert {r[0] for r in results} == {hosts.ns(m) for m in ("node2", "node3", "node4")}
        assert all(r[1:] == (expected, nbytes) for r in results), results
        assert directory.chained_pulls == 2, "not one chain node1 → node2 → node3 → node4"
        assert directory.forwarded_pulls == 2, "a chained pull fell back to a complete copy"
        assert (executor._owner.head.transfer.relayed > 0) == (address == "none")
        copies = directory.copies[block.location.name]
        assert set(copies) == {1, 2, 3}
        assert blocker.stop()
        del future, block, copies, tasks
        gc.collect()
        members = ("node1", "node2", "node3", "node4")
        assert wait_until(lambda: not any(hosts.files(m) for m in members)
                          and not head_files(executor), TIMEOUT), \
            {m: hosts.files(m) for m in members}


def test_a_chained_source_that_hears_of_its_pull_late_still_forwards(hosts):
    """The head asks node2 to pull and node3 to pull from node2 at once, over separate
    connections: node3's first requests may reach node2 before node2's own pull has
    started. They wait for it (they are not refused, which would send node3 to node1
    too and halve node1's link for both). Testing faults make every pull start late,
    the earlier receivers the later."""
    nbytes = 32 * MB
    with hosts.executor() as executor:
        future, block, blocker = made_on_node1(hosts, executor, nbytes)
        for member, delay in (("node2", 0.8), ("node3", 0.4), ("node4", 0.0)):
            hosts.start(executor, member, FUTUREPOOL_TESTING_FAULTS=f"delay-pull:{delay}")
        ready(hosts, executor, ("node2", "node3", "node4"))
        directory = executor._owner.objects
        tasks = [executor.submit(where_crc, future) for _ in range(3)]
        assert wait_until(lambda: len(directory.pulls) == 3, TIMEOUT)
        order = sorted(directory.pulls.values(), key=lambda wanted: wanted.depth)
        # (node2 is sent tasks first, so it heads the chain: each downstream starts early.)
        assert [wanted.dest for wanted in order] == [1, 2, 3]
        results = [task.result(timeout=3 * TIMEOUT) for task in tasks]
        assert all(r[1:] == (zlib.crc32(pattern(nbytes)), nbytes) for r in results), results
        assert directory.chained_pulls == 2
        assert directory.forwarded_pulls == 2, "a chained pull was refused by its source"
        assert blocker.stop()
        del future, block, tasks, order
        gc.collect()
        assert wait_until(lambda: not any(hosts.files(m) for m in hosts.dirs), TIMEOUT)


def test_the_middle_of_a_chain_killed_mid_transfer(hosts):
    """node1 → node2 → node3, node2 SIGKILLed while both receive: node3's pull moves on
    to node1 (keeping the chunks it has) and its task completes; never a hang."""
    nbytes = 40 * MB
    with hosts.executor() as executor:
        future, block, blocker = made_on_node1(hosts, executor, nbytes)
        hosts.start(executor, "node2")
        hosts.start(executor, "node3")
        ready(hosts, executor, ("node2", "node3"))
        directory = executor._owner.objects
        hosts.net.shape("node1", 16_000_000)  # 40 MB take 20 s out of node1
        started = time.monotonic()
        first = executor.submit(where_crc, future)
        second = executor.submit(where_crc, future)
        assert wait_until(lambda: copies_here(hosts, "node2") and copies_here(hosts, "node3"),
                          TIMEOUT), "node2 and node3 did not start receiving"
        assert directory.chained_pulls == 1
        chained = [w for w in directory.pulls.values() if w.depth == 2]
        assert len(chained) == 1 and chained[0].sources[0][0] in (1, 2)
        middle = "node2" if chained[0].sources[0][0] == 1 else "node3"
        downstream = "node3" if middle == "node2" else "node2"
        time.sleep(1.5)  # some chunks land in the middle, and go on downstream
        hosts.nodes[middle].send_signal(signal.SIGKILL)
        hosts.net.unshape("node1")  # the rest comes from node1 at link speed
        expected = (ns := hosts.ns(downstream), zlib.crc32(pattern(nbytes)), nbytes)
        outcomes = []
        for task in (first, second):
            try:
                outcomes.append(task.result(timeout=3 * TIMEOUT))
            except WorkerCrashedError as exc:  # the killed node's own task (no retries)
                assert "was lost" in str(exc)
                outcomes.append("lost")
        assert sorted(outcomes, key=str) == sorted([expected, "lost"], key=str), (outcomes, ns)
        assert time.monotonic() - started < 3 * TIMEOUT
        assert len(copies_here(hosts, downstream)) == 1
        stop(hosts.nodes.pop(middle))
        assert blocker.stop()
        del future, block, first, second, task, chained
        gc.collect()
        assert wait_until(lambda: not hosts.files("node1") and not hosts.files(downstream),
                          TIMEOUT), (hosts.files("node1"), hosts.files(downstream))
        # The killed node's store is its session's leftovers: its process is gone.
        for name in hosts.files(middle):
            os.unlink(os.path.join(hosts.dirs[middle], name))


def test_a_chain_link_whose_downstream_is_lost_heads_another(hosts):
    """node1 → X → Y, Y's node killed while both receive: X's pull forwards again, so a
    third host that needs the value chains from X, not from node1 once more."""
    nbytes = 40 * MB
    with hosts.executor() as executor:
        future, block, blocker = made_on_node1(hosts, executor, nbytes)
        members = ("node2", "node3", "node4")
        for member in members:
            hosts.start(executor, member)
        ready(hosts, executor, members)
        directory = executor._owner.objects
        hosts.net.shape("node1", 16_000_000)  # 40 MB take 20 s out of node1
        try:
            first = executor.submit(where_crc, future)
            second = executor.submit(where_crc, future)
            assert wait_until(lambda: len(directory.pulls) == 2, TIMEOUT)
            head, middle = sorted(directory.pulls.values(), key=lambda w: w.depth)
            assert middle.sources[0][0] == head.dest, "not chained"
            index = {1: "node2", 2: "node3", 3: "node4"}
            hosts.nodes[index[middle.dest]].send_signal(signal.SIGKILL)
            assert wait_until(lambda: len(directory.pulls) == 1, TIMEOUT), "its node not lost"
            third = executor.submit(where_crc, future)
            assert wait_until(lambda: len(directory.pulls) == 2, TIMEOUT)
            (new,) = [w for w in directory.pulls.values() if w is not head]
            assert new.sources[0][0] == head.dest and new.depth == 2, new.sources
        finally:
            hosts.net.unshape("node1")
        expected = (zlib.crc32(pattern(nbytes)), nbytes)
        assert first.result(timeout=3 * TIMEOUT)[1:] == expected
        assert third.result(timeout=3 * TIMEOUT)[1:] == expected
        with pytest.raises(WorkerCrashedError):
            second.result(timeout=TIMEOUT)
        killed = index[middle.dest]
        stop(hosts.nodes.pop(killed))
        assert blocker.stop()
        del future, block, first, second, third, head, middle, new
        gc.collect()
        alive = [m for m in ("node1", *members) if m != killed]
        assert wait_until(lambda: not any(hosts.files(m) for m in alive), TIMEOUT)
        for name in hosts.files(killed):  # its session's leftovers: its process is gone
            os.unlink(os.path.join(hosts.dirs[killed], name))
