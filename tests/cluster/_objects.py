"""What tasks run in the objects-across-hosts tests (importable on every node)."""

from __future__ import annotations

import os
import time

import numpy as np


def make(nbytes: int, value: int = 7):
    """A large result: it stays in the store of the node that ran this."""
    return np.full(nbytes, value, dtype=np.uint8)


def where_total(array, seconds: float = 0.0):
    """Which network namespace this ran in, and the sum of ``array``."""
    time.sleep(seconds)
    return os.readlink("/proc/self/ns/net"), int(array.sum(dtype=np.uint64))


def hold(seconds: float):
    """Keep a worker busy."""
    time.sleep(seconds)
    return os.readlink("/proc/self/ns/net")
