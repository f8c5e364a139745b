"""Tasks for the object-store tests; importable by workers (module level only)."""

from __future__ import annotations

import os
import time

import numpy as np

MiB = 1 << 20
#: Seconds a task waits for a gate file before giving up.
GATE_TIMEOUT = 20.0

# A worker-side stash: a task that keeps a view here borrows the segment.
_stash: list = []


def array(nbytes: int, value: float = 1.0):
    return np.full(nbytes // 8, value)


def total(a) -> float:
    return float(np.asarray(a).sum())


def total_all(*arrays) -> float:
    return float(sum(np.asarray(a).sum() for a in arrays))


def describe(a) -> dict:
    """How an argument arrived in the worker."""
    return {"writeable": bool(a.flags.writeable), "owndata": bool(a.flags.owndata),
            "base": type(a.base).__name__, "sum": float(a.sum()), "pid": os.getpid()}


def identity(value):
    return value


def big_bytes(nbytes: int) -> bytes:
    return b"z" * nbytes


def getpid() -> int:
    return os.getpid()


def stash(a) -> int:
    """Keep a view of the argument after the task returns."""
    _stash.append(a)
    return os.getpid()


def unstash() -> int:
    _stash.clear()
    return os.getpid()


def wait_for(path: str) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.005)


def read_twice(a, ready: str, gate: str) -> tuple:
    """Sum the argument, say so, wait for the test to act on its segment, sum again."""
    first = float(a.sum())
    open(ready, "w").close()
    wait_for(gate)
    return first, float(a.sum())
