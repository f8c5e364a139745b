"""A cluster on this machine, for tests: an executor whose every task runs on a remote node.

:class:`RemoteExecutor` is a drop-in ``ProcessPoolExecutor`` (same
signature) that listens on loopback, runs no task itself, and starts one
``futurepool worker --connect`` process with ``max_workers`` workers, which
joins it before the constructor returns. Every task therefore crosses the
cluster's path: CurveZMQ over TCP, the join handshake, spawn semantics with
the main script shipped, results relayed by the node. CPython's own
process-pool suite runs against it (``python -m futurepool.testing.cpython_suite
--executor futurepool.testing.cluster:RemoteExecutor``) to measure how
transparent the cluster is.

What is not the same as a local pool, on purpose: ``_processes`` is empty
(pids belong to the node's host), and workers start when the node joins.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref

from .. import config
from ..executor import Executor, _cpus
from ..protocol import security

__all__ = ["RemoteExecutor"]

#: Seconds the node may take to start and join.
JOIN_TIMEOUT = 60.0

_key_lock = threading.Lock()
_key_file: str | None = None


def _session_key_file() -> str:
    """One key file per process, in a private directory removed at exit."""
    global _key_file
    with _key_lock:
        if _key_file is None:
            directory = tempfile.mkdtemp(prefix="futurepool-keys-")
            atexit.register(shutil.rmtree, directory, True)
            _key_file = security.create_key_file(os.path.join(directory, "cluster.key"))
        return _key_file


class RemoteExecutor(Executor):
    """A ``ProcessPoolExecutor`` whose workers all live in one remote node process."""

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(),
                 *, max_tasks_per_child=None, max_retries=0):
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        workers = max_workers or _cpus()
        key_file = _session_key_file()
        super().__init__(0, mp_context, initializer, initargs,
                         max_tasks_per_child=max_tasks_per_child, max_retries=max_retries,
                         listen="tcp://127.0.0.1:0", key_file=key_file)
        self._owner.output.prefix = False  # one machine: print as a local pool does
        self._node = subprocess.Popen(
            [sys.executable, "-m", "futurepool", "worker", "--connect", self.address,
             "--key-file", key_file, "--workers", str(workers), "--once"],
            stdin=subprocess.DEVNULL, start_new_session=True)
        # Dropped without shutdown (the owner then says BYE): the node is still reaped.
        weakref.finalize(self, _reap_in_background, self._node)
        deadline = time.monotonic() + JOIN_TIMEOUT
        while self._max_workers < workers:
            if self._node.poll() is not None or time.monotonic() > deadline:
                self._end_node()
                super().shutdown(wait=True, cancel_futures=True)
                raise RuntimeError(f"the remote node did not join within {JOIN_TIMEOUT} s"
                                   f" (exit code {self._node.returncode})")
            time.sleep(0.005)

    def _stop(self, request, wait):  # shutdown(), terminate_workers(), kill_workers()
        super()._stop(request, wait)
        if wait:
            self._end_node()
        else:  # the node leaves when the head says BYE; reap it in the background
            _reap_in_background(self._node)

    def _end_node(self) -> None:
        _reap(self._node)


def _reap(node: subprocess.Popen) -> None:
    try:
        node.wait(config.SHUTDOWN_TIMEOUT + config.NODE_TIMEOUT)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait()


def _reap_in_background(node: subprocess.Popen) -> None:
    if node.poll() is None:
        threading.Thread(target=_reap, args=(node,), name="futurepool-reap-node",
                         daemon=True).start()
