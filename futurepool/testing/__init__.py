"""Helpers for testing code that uses futurepool, and for futurepool's own tests.

* :func:`wait_until` polls a condition with a deadline instead of sleeping.
* Leak checks (:mod:`futurepool.testing.leaks`): processes, threads, run
  directories and shared-memory segments left behind by a test.
* :func:`run_driver` runs a snippet in a separate interpreter, for anything
  that involves the driver's own death, Ctrl-C or interpreter exit.

This module and :mod:`futurepool.testing.leaks` import no other part of
futurepool (only psutil and the stdlib), so they serve tests of any layer.
"""

from __future__ import annotations

import locale
import os
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Mapping
from typing import IO

import psutil

from futurepool.testing.leaks import (
    SHM_DIR,
    assert_no_leaked_files,
    assert_no_leaked_processes,
    assert_no_leaked_threads,
    descendants,
    kill_processes,
    list_entries,
    tagged_processes,
    wait_until,
)

__all__ = [
    "DRIVER_TAG",
    "SHM_DIR",
    "assert_no_leaked_files",
    "assert_no_leaked_processes",
    "assert_no_leaked_threads",
    "descendants",
    "kill_processes",
    "list_entries",
    "run_driver",
    "tagged_processes",
    "wait_until",
]

#: Environment variable that marks every process a driver starts, so that
#: ones that left its process tree can still be found and killed.
DRIVER_TAG = "FUTUREPOOL_TESTING_DRIVER"


def run_driver(
    code: str,
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, the way a user's script would run.

    The driver gets this process's environment (so ``FUTUREPOOL_*`` settings
    apply to it too) updated with ``env``, no stdin, and faulthandler enabled
    so that a crash prints every thread's stack. ``code`` is dedented first.
    Its output goes to temporary files, not pipes, so a process it left
    behind cannot keep this call waiting once the driver itself has exited.

    Args:
        code: Python source to run with ``python -c``.
        timeout: seconds the driver may run.
        env: extra environment variables for the driver.
        cwd: working directory (default: the current one).

    Returns:
        The finished process, with ``returncode`` and text ``stdout`` /
        ``stderr``.

    Raises:
        subprocess.TimeoutExpired: the driver ran past ``timeout``; it and
            every process it started were killed first, and its output is
            attached.
    """
    args = [sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)]
    tag = uuid.uuid4().hex
    full_env = {**os.environ, **(env or {}), DRIVER_TAG: tag}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=full_env, cwd=cwd
        )
        try:
            proc.wait(timeout)
        except BaseException as exc:  # the timeout, or Ctrl-C in the test run
            _kill_tree(proc.pid, tag)
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise subprocess.TimeoutExpired(args, timeout, _read(out), _read(err)) from None
            raise
        return subprocess.CompletedProcess(args, proc.returncode, _read(out), _read(err))


def _read(file: IO[bytes]) -> str:
    # Decoded as subprocess.run(text=True) would.
    file.seek(0)
    return file.read().decode(locale.getpreferredencoding(False), errors="replace")


def _kill_tree(pid: int, tag: str) -> None:
    """Kill ``pid``, its descendants and every process started with ``tag``."""
    try:
        root = psutil.Process(pid)
        procs = {root, *descendants(root)}
    except psutil.NoSuchProcess:
        procs = set()
    kill_processes(procs | set(tagged_processes(DRIVER_TAG, tag)))
