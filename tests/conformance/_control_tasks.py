"""Tasks for ``test_control.py`` and ``tests/cluster``: they run in workers.

Each one that is meant to be interrupted notes, in a file, that it started
(so the test knows the interrupt hit a running task) and, in its ``finally``
block, that it was left (so the test sees that clean-up ran).
"""

from __future__ import annotations

import os
import time


def _note(path, text):
    if path:
        with open(path, "a") as file:
            file.write(text + "\n")


def spin(started=None, left=None):
    """A pure-Python loop that never ends."""
    _note(started, "started")
    try:
        while True:
            pass
    finally:
        _note(left, "finally")


def sleep_for(seconds, started=None, left=None):
    """``time.sleep``: a C call that blocks."""
    _note(started, "started")
    try:
        time.sleep(seconds)
        return seconds
    finally:
        _note(left, "finally")


def read_pipe(started=None, left=None):
    """A blocking ``os.read`` on a pipe nobody writes to."""
    read_end, write_end = os.pipe()
    _note(started, "started")
    try:
        return os.read(read_end, 1)
    finally:
        os.close(read_end)
        os.close(write_end)
        _note(left, "finally")


def swallow(started=None):
    """Catches every interrupt and keeps sleeping: only a kill ends it."""
    _note(started, "started")
    while True:
        try:
            time.sleep(60)
        except BaseException:  # noqa: BLE001, S110 - the point of the task
            _note(started, "swallowed")


def attempt(path, seconds):
    """Notes each attempt, then sleeps."""
    _note(path, "attempt")
    time.sleep(seconds)
    return seconds


def getpid(_=None):
    return os.getpid()


def exit_now():
    """Ends its worker without a result."""
    os._exit(3)


# --- resources and memory limits (issue 12, points 4 and 5) ----------------------------


def hold(path, seconds):
    """Notes when it ran (system-wide monotonic clock) and the GPUs it was given.

    One line per call: ``START END CUDA_VISIBLE_DEVICES`` (``-`` when unset),
    appended when it ends, so a test can check that intervals never overlap.
    """
    start = time.monotonic()
    devices = os.environ.get("CUDA_VISIBLE_DEVICES", "-")
    time.sleep(seconds)
    end = time.monotonic()
    _note(path, f"{start!r} {end!r} {devices}")
    return devices


def devices(_=None):
    """The CUDA_VISIBLE_DEVICES this task sees (None: unset)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def grow(step, path=None, limit=1 << 34):
    """Allocates ``step`` bytes at a time (pages touched) until ``limit``: a steady leak."""
    _note(path, "attempt")
    blocks = []
    total = 0
    while total < limit:
        blocks.append(bytearray(b"\x01") * step)
        total += step
        time.sleep(0.005)  # about 1.5 GB/s: steady, and far from the limit in 10 ms
    return total


def fill_at_once(nbytes):
    """One C call that writes ``nbytes`` while holding the GIL (the watchdog cannot look)."""
    data = b"\x01" * nbytes
    return len(data)


def allocate(nbytes):
    """Touches ``nbytes`` and frees them: what a task under its limit does."""
    data = bytearray(b"\x02") * nbytes
    return len(data)


def impossible_allocation(_=None):
    """A MemoryError raised inside the task by the allocator (FAULTS 19)."""
    return bytearray(1 << 62)


def capped_allocation(nbytes):
    """A MemoryError under RLIMIT_AS, the limit restored afterwards (FAULTS 19).

    The cap leaves room for what the worker's other threads allocate
    meanwhile: half of ``nbytes`` above the address space already in use.
    """
    import resource

    with open("/proc/self/statm") as file:
        in_use = int(file.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (in_use + nbytes // 2, hard))
    try:
        return bytearray(nbytes)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def whoami(seconds=0.0):
    """``(pid, CUDA_VISIBLE_DEVICES)`` of the worker that ran it, after ``seconds``."""
    time.sleep(seconds)
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


_leaked: list = []


def leak(nbytes):
    """Keeps ``nbytes`` more for as long as its worker lives; returns that worker's pid."""
    _leaked.append(bytearray(b"\x03") * nbytes)
    return os.getpid()
