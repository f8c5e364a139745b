"""CPython's process-pool suite with every task on a remote node: the cluster's transparency.

The executor is :class:`futurepool.testing.cluster.RemoteExecutor`: a head
that runs no task itself, joined by one ``futurepool worker`` process over
CurveZMQ on loopback, so every task and result crosses the cluster's whole
path (join handshake, spawn semantics with the main script shipped, the
node's relay). Only CPython's *spawn* classes are bound: a remote host has
spawn semantics whatever the start method says.

Skipped, besides :data:`futurepool.testing.cpython_suite.SKIPS`, what cannot
hold for workers on another host, each with its reason below.
"""

from __future__ import annotations

import pytest

from futurepool.testing import cpython_suite

pytestmark = pytest.mark.timeout(cpython_suite.TEST_TIMEOUT)

_OTHER_HOST = ("reads executor._processes, this host's worker processes: a remote node's"
               " workers are processes of another host, so it is empty")
_QUEUE_IN_INITARGS = ("passes a multiprocessing Queue in initargs, which reaches only workers"
                      " on the driver's host: a remote node is refused, by design")

REMOTE_SKIPS = {
    **cpython_suite.SKIPS,
    "ProcessPoolSpawnProcessPoolExecutorTest.test_saturation": _OTHER_HOST,
    "ProcessPoolSpawnProcessPoolExecutorTest.test_idle_process_reuse_one": _OTHER_HOST,
    "ProcessPoolSpawnProcessPoolExecutorTest.test_idle_process_reuse_multiple": _OTHER_HOST,
    "ProcessPoolSpawnProcessPoolExecutorTest.test_max_tasks_per_child": _OTHER_HOST,
    "ProcessPoolSpawnProcessPoolShutdownTest.test_processes_terminate": _OTHER_HOST,
    "ProcessPoolSpawnFailingInitializerTest.test_initializer": _QUEUE_IN_INITARGS,
}

try:
    _CLASSES = cpython_suite.build_test_classes(
        "futurepool.testing.cluster:RemoteExecutor", module=__name__, skips=REMOTE_SKIPS,
        start_methods=("spawn",))
except cpython_suite.CPythonSuiteUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

# Stops the process-wide resource tracker (see test_cpython_concurrent_futures.py);
# with a Queue in initargs it is the refused case above anyway.
_CLASSES.pop("FailingInitializerResourcesTest", None)
globals().update(_CLASSES)
