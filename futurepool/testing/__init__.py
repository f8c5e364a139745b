"""Helpers for testing code that uses futurepool, and for futurepool's own tests.

* :func:`wait_until` polls a condition with a deadline instead of sleeping.
* Leak checks (:mod:`futurepool.testing.leaks`): processes, threads, run
  directories and shared-memory segments left behind by a test.
* :func:`run_driver` runs a snippet in a separate interpreter, for anything
  that involves the driver's own death, Ctrl-C or interpreter exit.

These modules import no other part of futurepool (only psutil and the
stdlib), so they stay usable in tests of any layer of the package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping

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

# Seconds to collect a killed driver's remaining output before giving up on it.
_DRAIN_TIMEOUT = 5.0


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
            every process it started were killed first, and the output it
            had written is attached.
    """
    args = [sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)]
    full_env = {**os.environ, **(env or {})}
    with subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=cwd,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException as exc:
            _kill_tree(proc.pid)
            try:
                stdout, stderr = proc.communicate(timeout=_DRAIN_TIMEOUT)
            except subprocess.TimeoutExpired:
                # A process that escaped the tree still holds the pipes; the
                # output is lost, Popen.__exit__ closes them and reaps.
                stdout = stderr = None
            if isinstance(exc, subprocess.TimeoutExpired):
                raise subprocess.TimeoutExpired(args, timeout, stdout, stderr) from None
            raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _kill_tree(pid: int) -> None:
    """Kill ``pid`` and its descendants, collected before any of them dies."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    kill_processes([root, *descendants(root)])
