"""Helper processes that drive another system for a benchmark, both ends of the pipe.

``bench_cluster.py`` and ``bench_nested.py`` run Dask and Ray in a helper
process (``_cluster_driver.py``, ``_nested_driver.py``) under the interpreter
that has them installed, and talk to it in JSON lines::

    benchmark                                   helper (serve)
    ---------                                   --------------
    JsonLines.read()      <-- {"hello": VERSION}
    JsonLines.call(op)    --> {"op": OP, "timeout": s, ...}
                          <-- {...} or {"error": "..."}
    JsonLines.call("close") --> {"op": "close", ...}
                          <-- {}                    (then exits)

The benchmark's end (:class:`JsonLines`, :func:`stop`) runs here; the
helper's end (:func:`serve`) runs under the other interpreter, which may lack
futurepool's dependencies: this module imports only the standard library at
its top, and :func:`stop` imports psutil and ``futurepool.testing`` when called.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable

#: Seconds a helper gets to answer past the timeout its command carries.
ANSWER_SLACK = 5.0
#: Seconds a command waits when it carries no timeout.
DEFAULT_TIMEOUT = 60.0


# --- the benchmark's end ---------------------------------------------------------------------


def tail(path: str, lines: int, width: int | None = None) -> str:
    """The last ``lines`` non-blank lines of the log at ``path`` (each cut to
    ``width`` characters), joined by `` | ``; empty if it cannot be read."""
    try:
        with open(path, errors="replace") as f:
            found = [x for x in f.read().strip().splitlines() if x.strip()]
    except OSError:
        return ""
    return " | ".join(x[:width] for x in found[-lines:])


class JsonLines:
    """A helper process's pipe: commands to its stdin, one JSON answer a line
    from its stdout, each within a deadline.

    Args:
        proc: the helper, started with ``stdin=PIPE, stdout=PIPE``.
        what: its name in error messages ("client", "ray").
        log: called for the end of its log (stderr), quoted in errors.
        grace: seconds to wait for its exit code once it closed its output.
    """

    def __init__(self, proc: subprocess.Popen, what: str, log: Callable[[], str],
                 grace: float):
        self.proc, self.what, self.log, self.grace = proc, what, log, grace
        self.buffer = b""

    def read(self, timeout: float) -> dict:
        """The next JSON line, skipping lines that are not JSON objects.

        Raises:
            TimeoutError: none came within ``timeout`` seconds.
            RuntimeError: the helper closed its output (exited).
        """
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            line, newline, rest = self.buffer.partition(b"\n")
            if newline:
                self.buffer = rest
                if line.startswith(b"{"):  # libraries may print lines of their own
                    return json.loads(line)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from {self.what} within {timeout:.0f} s:"
                                   f" {self.log()}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(self.grace)
                    raise RuntimeError(f"{self.what} closed its output (exit code"
                                       f" {self.proc.poll()}): {self.log()}")
                self.buffer += chunk

    def send(self, op: str, timeout: float, **fields) -> None:
        """Write the command ``{"op": op, "timeout": timeout, **fields}``."""
        self.proc.stdin.write((json.dumps({"op": op, "timeout": timeout, **fields}) + "\n")
                              .encode())
        self.proc.stdin.flush()

    def call(self, op: str, timeout: float, **fields) -> dict:
        """Send a command; its answer, read within ``timeout`` + ANSWER_SLACK seconds.

        Raises:
            RuntimeError: the helper answered with an error (or exited).
            TimeoutError: it did not answer in time.
        """
        self.send(op, timeout, **fields)
        answer = self.read(timeout + ANSWER_SLACK)
        if "error" in answer:
            raise RuntimeError(f"{self.what} {op}: {answer['error']}")
        return answer


def stop(popens: list[subprocess.Popen], tag_name: str, tag: str, grace: float) -> None:
    """SIGTERM ``popens`` and every process carrying ``tag_name=tag`` in its
    environment, wait ``grace`` seconds; SIGKILL what is left.

    Besides ``popens``: every process with the tag (Ray's daemons and Dask's
    workers, wherever they are in the process tree) and their children, which
    Ray starts with an environment of their own, remembered from the first
    look on (they outlive their parent).
    """
    import psutil

    from futurepool.testing import kill_processes, tagged_processes, wait_until

    known = {}

    def running(proc) -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def left() -> list:
        for proc in tagged_processes(tag_name, tag):
            known.setdefault(proc.pid, proc)
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    known.setdefault(child.pid, child)
        return [proc for proc in known.values() if running(proc)]

    for p in popens:
        if p.poll() is None:
            p.terminate()
    for proc in left():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    if wait_until(lambda: all(p.poll() is not None for p in popens) and not left(), grace):
        return
    deadline = time.monotonic() + grace
    while (procs := left()) and time.monotonic() < deadline:  # a daemon may start another
        kill_processes(procs, timeout=max(0.1, deadline - time.monotonic()))
    for p in popens:
        if p.poll() is None:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(grace)


# --- the helper's end ------------------------------------------------------------------------

#: What a helper does for one command: ``(driver, command, timeout) -> answer``
#: (``None`` answers ``{}``).
Op = Callable[[object, dict, float], "dict | None"]


def serve(driver, ops: dict[str, Op], max_error: int | None = None) -> int:
    """Print ``{"hello": driver.version}``, then answer each command line of stdin
    with one JSON line on stdout, until ``close`` (``driver.close()``) or EOF.

    An exception in an op answers ``{"error": "Type: message"}`` (cut to
    ``max_error`` characters), so the benchmark fails the cell, not this loop.
    """
    print(json.dumps({"hello": driver.version}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op, timeout = command["op"], command.get("timeout", DEFAULT_TIMEOUT)
        try:
            if op == "close":
                driver.close()
                print(json.dumps({}), flush=True)
                return 0
            if op in ops:
                answer = ops[op](driver, command, timeout) or {}
            else:
                answer = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # reported to the benchmark, which fails the cell
            answer = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:max_error]}
        print(json.dumps(answer), flush=True)
    return 0
