"""The hosts of ``bench_cluster.py``: the processes a cell starts in them, the link, setns.

Hosts are network namespaces (``futurepool.testing.netns``). Every process a
cell starts is tagged (``RUN_TAG``) and logged to a file of the cell's own
folder, and stopped with the cell, whatever it spawned; a failed one is
reported with the last lines of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import _harness
import _helpers
from _helpers import JsonLines

#: The helper processes: TCP echo server, CURVE floor, Dask and Ray drivers.
DRIVER = os.path.join(_harness.HERE, "_cluster_driver.py")
#: Environment variable marking every process a cell starts (Ray's daemons
#: leave our process tree), so that its close finds and stops all of them.
RUN_TAG = "FUTUREPOOL_BENCH_CLUSTER"
#: Seconds a cell's processes get to exit on their own (then SIGTERM, then
#: as long again before SIGKILL); the harness's close backstop is 10 s.
STOP_GRACE = 2.0
#: Lines of a failed process's log quoted in the error.
LOG_LINES = 5


def _tail(path: str) -> str:
    return _helpers.tail(path, LOG_LINES)


class Processes:
    """The processes one cell starts: tagged, logged to files, stopped together."""

    def __init__(self, ctx, name: str):
        self.ctx, self.name = ctx, name
        self.tag = uuid.uuid4().hex
        self.dir = tempfile.mkdtemp(prefix=name[0], dir=ctx.tmp)  # short: socket paths
        self.popens: list[subprocess.Popen] = []

    def env(self, **extra) -> dict:
        return {**os.environ, RUN_TAG: self.tag, **extra}

    def log(self, what: str) -> str:
        return os.path.join(self.dir, f"{what}.log")

    def start(self, member: str, what: str, argv: list, *, stdin=subprocess.DEVNULL,
              stdout=None, env=None) -> subprocess.Popen:
        """``argv`` in ``member``'s namespace; stderr (and stdout unless given) to ``what``.log."""
        with open(self.log(what), "ab") as log:
            proc = self.ctx.net.popen(member, argv, stdin=stdin, stdout=stdout or log,
                                      stderr=log, env=env or self.env(), cwd=self.dir)
        self.popens.append(proc)
        return proc

    def run(self, member: str, what: str, argv: list, timeout: float, env=None) -> None:
        """Run ``argv`` to its end in ``member``'s namespace; raise with its log if it fails."""
        proc = self.start(member, what, argv, env=env)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{what} still running after {timeout:.0f} s:"
                               f" {_tail(self.log(what))}") from None
        if code != 0:
            raise RuntimeError(f"{what} exited with {code}: {_tail(self.log(what))}")

    def check(self, proc: subprocess.Popen, what: str) -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(self.log(what))}")

    def stop(self) -> None:
        """SIGTERM what this cell started, and every process with its tag; SIGKILL
        what is left after STOP_GRACE (see _helpers.stop)."""
        _helpers.stop(self.popens, RUN_TAG, self.tag, STOP_GRACE)


def helper(procs: Processes, member: str, what: str, python: str, *args,
            env=None) -> JsonLines:
    proc = procs.start(member, what, [python, DRIVER, *args], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, env=env)
    return JsonLines(proc, what, lambda: _tail(procs.log(what)), STOP_GRACE)


class LinkProbe:
    """A 1-byte TCP echo between the head's namespace (here) and ``member``'s at ``address``."""

    def __init__(self, ctx, member: str, address: str, cell):
        self.procs = Processes(ctx, "link")
        self.sock = None
        server = helper(self.procs, member, "echo", sys.executable, "echo", address)
        port = server.read(cell.left())["port"]
        self.sock = socket.create_connection((address, port), timeout=cell.left())
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round_trip(self, n: int) -> float:
        """Median µs of ``n`` round trips."""
        samples = []
        clock = time.perf_counter
        for _ in range(n):
            t0 = clock()
            self.sock.sendall(b"x")
            if not self.sock.recv(1):
                raise RuntimeError("the echo server closed the connection")
            samples.append(clock() - t0)
        return statistics.median(samples) * 1e6

    def close(self, failed: bool) -> None:
        if self.sock is not None:
            self.sock.close()  # the server exits at EOF
        self.procs.stop()


_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    """Move this thread, and the threads and processes it starts, into namespace ``fd``."""
    if hasattr(os, "setns"):  # 3.12
        os.setns(fd, os.CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def inside(namespace: str):
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


__all__ = ["DRIVER", "RUN_TAG", "STOP_GRACE", "LinkProbe", "Processes", "helper", "inside"]
