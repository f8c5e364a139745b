"""Lineage reconstruction (issue 10, point 6; FAULTS 24 and 29).

A task's large result lives only on node1 (``futurepool worker`` in its own
network namespace, its own store directory); node1 is SIGKILLed. What needs
the result then re-runs the task that made it (on node2), up to
``max_reconstructions``; past it, with reconstruction off, or for a value no
task made, ``ObjectLostError`` names the value and the lost node.

Hosts and helpers are those of ``test_objects`` (same fixture, same layout).
"""

from __future__ import annotations

import concurrent.futures
import gc
import signal
import time

import pytest

import futurepool
from futurepool import config
from futurepool.core.directory import HEAD, host_of
from futurepool.errors import ObjectLostError
from futurepool.testing import wait_until

from ._nodes import TIMEOUT, stop
from ._objects import hold, made_by_a_child, make, where_total
from .test_objects import MB, hosts, made_on_node1, primary  # noqa: F401 - hosts: a fixture

pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("network_available")]


def executor_for(hosts, **kwargs) -> futurepool.Executor:  # noqa: F811 - the fixture's value
    return futurepool.Executor(0, listen=f"tcp://{hosts.net.address('head')}:0",
                               key_file=hosts.key_file, **kwargs)


def kill(hosts, executor, member: str, index: int, declared: bool = True) -> None:  # noqa: F811
    """SIGKILL ``member``'s ``futurepool worker``; wait (``declared``) until the head
    has declared it lost."""
    proc = hosts.nodes.pop(member)
    proc.send_signal(signal.SIGKILL)
    if declared:
        assert wait_until(lambda: index not in executor._owner.head.by_index, TIMEOUT), \
            f"{member} was not declared lost"
    stop(proc)
    # Its workers see their node die and remove what they wrote.
    assert wait_until(lambda: not hosts.files(member), TIMEOUT), hosts.files(member)


def lineage(executor):
    return executor._owner.objects.lineage


@pytest.mark.parametrize("cut", ["kill", "link_down"])
def test_a_dependent_task_rebuilds_a_result_lost_with_its_node(hosts, cut):  # noqa: F811
    """FAULTS 24 (1): the node with the only copy is killed (or its link goes down past
    NODE_TIMEOUT); a dependent task submitted once the head declared it lost re-runs
    the producer (on the other node) and succeeds. (Killed with a dependent already
    pulling: the FAULTS 29 test below.)"""
    with executor_for(hosts) as executor:
        future, block = made_on_node1(hosts, executor, 20 * MB)
        old = block.location.name
        del block
        hosts.start(executor, "node2")
        if cut == "kill":
            kill(hosts, executor, "node1", 0)
        else:
            hosts.net.link_down("node1")
            assert wait_until(lambda: 0 not in executor._owner.head.by_index, TIMEOUT)
        where, total = executor.submit(where_total, future).result(timeout=TIMEOUT)
        assert where == hosts.ns("node2") and total == 7 * 20 * MB
        new = primary(future).location
        assert new.name != old and host_of(new) == 1, new
        assert lineage(executor).rebuilt == future._lineage.rebuilds == 1
        # The same future, rebuilt: a second dependent needs nothing more.
        assert executor.submit(where_total, future).result(timeout=TIMEOUT)[1] == 7 * 20 * MB
        assert lineage(executor).rebuilt == 1
        if cut == "link_down":  # it comes back, hears its session is over, drops it all
            hosts.net.link_up("node1")
            stop(hosts.nodes.pop("node1"))
            assert wait_until(lambda: not hosts.files("node1"), TIMEOUT), hosts.files("node1")
        del future


def test_result_in_the_driver_rebuilds_a_lost_result(hosts):  # noqa: F811
    """FAULTS 24 (2): ``result()`` in the driver re-runs the producer, then reads it."""
    with executor_for(hosts) as executor:
        future, block = made_on_node1(hosts, executor, 20 * MB)
        del block
        hosts.start(executor, "node2")
        kill(hosts, executor, "node1", 0)
        array = future.result(timeout=TIMEOUT)
        assert len(array) == 20 * MB and array.count(7) == 20 * MB
        assert lineage(executor).rebuilt == 1
        name = primary(future).location.name
        assert HEAD in executor._owner.objects.copies[name]
        del array, future


@pytest.mark.parametrize("input_kept", [True, False], ids=["input-kept", "input-freed"])
def test_recursive_rebuild_of_lost_inputs(hosts, input_kept):  # noqa: F811
    """A result and the input it was made from were both only on the lost node: the
    input is rebuilt first, then the result, then the dependent runs. ``input-freed``:
    the input's future was dropped (its value freed) before: lineage keeps only what
    made it, and it is made again into a future only the re-run holds."""
    with executor_for(hosts) as executor:
        hosts.start(executor, "node1")
        first = executor.submit(make, 5 * MB)
        second = executor.submit(_double, first)
        concurrent.futures.wait([second], TIMEOUT)
        assert host_of(primary(first).location) == host_of(primary(second).location) == 0
        if not input_kept:
            name = primary(first).location.name
            del first
            gc.collect()
            assert wait_until(lambda: name not in hosts.files("node1"), TIMEOUT), \
                "the input's value was not freed"
        hosts.start(executor, "node2")
        kill(hosts, executor, "node1", 0)
        assert executor.submit(_count, second).result(timeout=TIMEOUT) == 10 * MB
        assert lineage(executor).rebuilt == 2
        assert second._lineage.rebuilds == 1
        if input_kept:
            assert first._lineage.rebuilds == 1
            assert host_of(primary(first).location) == 1
            del first
        del second


def _double(array):
    return array * 2


def _count(array):
    return array.count(7)


@pytest.mark.parametrize("how", ["keyword", "environment"])
def test_reconstruction_off_raises_object_lost(hosts, monkeypatch, how):  # noqa: F811
    """FAULTS 24 (3): ``max_reconstructions=0`` (or FUTUREPOOL_MAX_RECONSTRUCTIONS=0):
    ObjectLostError naming the value and the lost node, for a dependent and result()."""
    if how == "keyword":
        executor = executor_for(hosts, max_reconstructions=0)
    else:
        monkeypatch.setattr(config, "MAX_RECONSTRUCTIONS", 0)
        executor = executor_for(hosts)
    with executor:
        future, block = made_on_node1(hosts, executor, 5 * MB)
        name = block.location.name
        del block
        assert not hasattr(future, "_lineage"), "off: no lineage is kept"
        hosts.start(executor, "node2")
        kill(hosts, executor, "node1", 0)
        with pytest.raises(ObjectLostError, match=name) as info:
            executor.submit(where_total, future).result(timeout=TIMEOUT)
        assert "node 0" in str(info.value) and "Reconstruction is off" in str(info.value)
        assert info.value.name == name and "node 0" in info.value.host
        with pytest.raises(ObjectLostError, match="Reconstruction is off"):
            future.result(timeout=TIMEOUT)
        assert lineage(executor).rebuilt == 0
        # The executor is fine.
        assert executor.submit(abs, -3).result(timeout=TIMEOUT) == 3
        del future


def test_past_max_reconstructions_raises_attempts_exceeded(hosts):  # noqa: F811
    """FAULTS 24 (4): with max_reconstructions=1, the result is rebuilt once (on node2);
    node2 is lost too: the next read says reconstruction attempts were exceeded."""
    with executor_for(hosts, max_reconstructions=1) as executor:
        future, block = made_on_node1(hosts, executor, 5 * MB)
        del block
        hosts.start(executor, "node2")
        kill(hosts, executor, "node1", 0)
        assert executor.submit(where_total, future).result(timeout=TIMEOUT)[0] \
            == hosts.ns("node2")
        name = primary(future).location.name
        assert host_of(primary(future).location) == 1
        kill(hosts, executor, "node2", 1)
        with pytest.raises(ObjectLostError, match="Reconstruction attempts exceeded") as info:
            future.result(timeout=TIMEOUT)
        assert info.value.name == name and "node 1" in str(info.value)
        assert "max_reconstructions=1" in str(info.value)
        assert lineage(executor).rebuilt == 1
        del future


def _make_slowly(nbytes: int, seconds: float) -> bytearray:
    time.sleep(seconds)
    return make(nbytes)


def test_a_node_lost_while_it_rebuilds(hosts):  # noqa: F811
    """The node running a rebuild is lost too (the producer's nodes keep dying): that
    counts as an attempt and the rebuild runs again on the next node that joins."""
    with executor_for(hosts, max_reconstructions=2) as executor:
        hosts.start(executor, "node1")
        future = executor.submit(_make_slowly, 5 * MB, 2.0)
        concurrent.futures.wait([future], TIMEOUT)
        assert host_of(primary(future).location) == 0
        hosts.start(executor, "node2")
        kill(hosts, executor, "node1", 0)
        dependent = executor.submit(where_total, future)
        owner = executor._owner
        assert wait_until(lambda: any(slot.inflight and slot.link.index == 1 for slot
                                      in list(owner.scheduler.workers.values())), TIMEOUT), \
            "the rebuild did not start on node2"
        kill(hosts, executor, "node2", 1)
        hosts.start(executor, "node1")  # a new node (index 2) in node1's namespace
        assert dependent.result(timeout=TIMEOUT) == (hosts.ns("node1"), 7 * 5 * MB)
        assert lineage(executor).rebuilt == future._lineage.rebuilds == 2
        del future


def test_a_put_value_is_not_rebuilt_and_survives_its_copies(hosts):  # noqa: F811
    """FAULTS 24 (5), as it applies here: a ``put`` lives in the driver's store (the
    head), which a lost node cannot take. A node that pulled a copy is lost: the next
    task pulls it from the head again; nothing is re-run, and no lineage is kept. (A
    piece no task made, found lost, raises ObjectLostError: tests/test_lineage.py.)"""
    with executor_for(hosts) as executor:
        value = executor.put(bytearray([7]) * (5 * MB))
        assert not hasattr(value, "_lineage")
        hosts.start(executor, "node1")
        assert executor.submit(where_total, value).result(timeout=TIMEOUT)[0] \
            == hosts.ns("node1")
        hosts.start(executor, "node2")
        kill(hosts, executor, "node1", 0)
        assert executor.submit(where_total, value).result(timeout=TIMEOUT) \
            == (hosts.ns("node2"), 7 * 5 * MB)
        assert lineage(executor).rebuilt == 0
        del value


def test_a_node_killed_while_its_result_is_being_pulled(hosts):  # noqa: F811
    """FAULTS 29: node1 is SIGKILLed while node2 pulls its result for a running
    dependent: the pull fails, the producer is re-run on node2, the dependent
    completes; the rest of the cluster is unaffected."""
    with executor_for(hosts) as executor:
        future, block = made_on_node1(hosts, executor, 40 * MB)
        del block
        hosts.start(executor, "node2")
        executor.submit(hold, 60)  # node1's only worker
        hosts.net.shape("node1", 16_000_000)  # 40 MB take 20 s from node1
        task = executor.submit(where_total, future)
        assert wait_until(lambda: any("--2-" in n for n in hosts.files("node2")), TIMEOUT), \
            "node2 did not start receiving"
        kill(hosts, executor, "node1", 0, declared=False)
        hosts.net.unshape("node1")
        assert task.result(timeout=TIMEOUT) == (hosts.ns("node2"), 7 * 40 * MB)
        assert lineage(executor).rebuilt >= 1
        assert executor.submit(abs, -3).result(timeout=TIMEOUT) == 3
        del future


@pytest.mark.parametrize("limit", [3, 0], ids=["rebuilt", "reconstruction-off"])
def test_a_nested_result_lost_on_its_way_to_its_owner(hosts, limit):  # noqa: F811
    """Point 6 with nested ownership: a task on node2 owns a child that ran on node1;
    node1 is SIGKILLed while the child's 40 MB result is pulled to its owner's host
    (once there, that host's copy lives as long as the owner). The child runs again
    (on node2: its owner lends its slot) and the owner completes; with reconstruction
    off, the owner's ``result()`` raises ObjectLostError naming the value and node1."""
    with executor_for(hosts, max_reconstructions=limit) as executor:
        hosts.start(executor, "node1")
        hosts.start(executor, "node2", FUTUREPOOL_RESOURCES="owner=1")
        hosts.net.shape("node1", 16_000_000)  # 40 MB take 20 s from node1
        owner = executor.options(resources={"owner": 1}).submit(made_by_a_child, 40 * MB)
        assert wait_until(lambda: any("--2-" in n for n in hosts.files("node2")), TIMEOUT), \
            "node2 did not start receiving the child's result"
        kill(hosts, executor, "node1", 0, declared=False)
        hosts.net.unshape("node1")
        if limit:
            child, here, total = owner.result(timeout=TIMEOUT)
            assert child == here == hosts.ns("node2")
            assert total == 7 * 40 * MB
            assert lineage(executor).rebuilt == 1
        else:
            with pytest.raises(ObjectLostError, match="Reconstruction is off") as info:
                owner.result(timeout=TIMEOUT)
            assert info.value.name in str(info.value) and "node 0" in info.value.host
            assert lineage(executor).rebuilt == 0
        assert not executor._owner.relay.tasks
        assert executor.submit(abs, -3).result(timeout=TIMEOUT) == 3
