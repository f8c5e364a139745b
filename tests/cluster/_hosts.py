"""Running documented commands on "hosts" that are network namespaces.

The recipe and README tests run the commands the documents give, as text,
in a clean environment whose ``PATH`` starts with a directory of stand-ins:
``futurepool`` and ``python3`` run this checkout with this interpreter (so
head and nodes agree on every version), ``srun`` and ``ssh`` reach other
namespaces (:mod:`tests.cluster._stand_ins`). Output goes to files, not
pipes, so that a process left behind never blocks a read; every wait here
has a deadline.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from futurepool.testing import wait_until

from ._stand_ins import as_host

__all__ = ["REPO", "Output", "as_host", "clean_env", "namespace_id", "stand_ins", "stop"]

REPO = Path(__file__).resolve().parents[2]

#: What the test session's leak checks need every futurepool process to inherit.
_HARNESS_VARIABLES = ("FUTUREPOOL_TMPDIR", "FUTUREPOOL_SHM_PREFIX")


def stand_ins(directory: Path) -> Path:
    """Write the stand-in commands into ``directory``; returns it, for ``PATH``."""
    directory.mkdir(parents=True, exist_ok=True)
    python = shlex.quote(sys.executable)
    scripts = {
        "futurepool": f'PYTHONPATH={shlex.quote(str(REPO))} exec {python} -m futurepool "$@"',
        "python3": f'PYTHONPATH={shlex.quote(str(REPO))} exec {python} "$@"',
    }
    for tool in ("srun", "ssh"):
        module = shlex.quote(str(REPO / "tests" / "cluster" / "_stand_ins.py"))
        scripts[tool] = f'exec {python} {module} {tool} "$@"'
    for name, body in scripts.items():
        path = directory / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return directory


def clean_env(bin_dir: Path, home: Path, **extra: str) -> dict[str, str]:
    """A login-like environment: the stand-ins first on PATH, ``HOME``, and ``extra``.

    The test session's FUTUREPOOL_TMPDIR and FUTUREPOOL_SHM_PREFIX are kept,
    so that its leak checks find what these processes leave.
    """
    env = {"PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": str(home), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    env.update({name: os.environ[name] for name in _HARNESS_VARIABLES if name in os.environ})
    env.update(extra)
    return env


def namespace_id(netns: str) -> str:
    """What ``os.readlink("/proc/self/ns/net")`` says inside the named namespace."""
    return f"net:[{os.stat(os.path.join('/run/netns', netns)).st_ino}]"


class Output:
    """A file a process writes to, read as it grows."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "w")  # handed to Popen; closed by close()

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.text().splitlines()

    def wait_for(self, pattern: str, timeout: float,
                 proc: subprocess.Popen | None = None) -> re.Match:
        """The first match of ``pattern`` in a line; fails if ``proc`` exits first."""
        regex = re.compile(pattern)

        def first() -> re.Match | None:
            return next((m for m in map(regex.search, self.lines()) if m), None)

        wait_until(lambda: first() is not None or (proc is not None and proc.poll() is not None),
                   timeout, interval=0.05)
        match = first()  # once more: a process that exited may have written it last
        assert match, (f"no line matching {pattern!r} within {timeout} s in {self.path.name}"
                       f"{'' if proc is None else f' (exit code {proc.poll()})'}:\n"
                       f"{self.text()[-4000:]}")
        return match

    def close(self) -> None:
        self.file.close()


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, *, timeout: float,
         group: bool = False) -> tuple[int, float]:
    """Send ``sig`` (to the process group: a terminal's Ctrl-C) and wait; (exit code, seconds).

    Killed, and the test failed, if it outlives ``timeout``.
    """
    started = time.monotonic()
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
        raise AssertionError(f"{proc.args} did not exit within {timeout} s of signal"
                             f" {signal.Signals(sig).name}") from None
    return code, time.monotonic() - started
