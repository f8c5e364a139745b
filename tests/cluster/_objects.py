"""What tasks run in the objects-across-hosts tests (importable on every node).

Values are ``bytearray`` (pickled out of band with protocol 5, so a large one
is a stored piece, as a NumPy array is) so that no third-party package is needed.
"""

from __future__ import annotations

import os
import time


def make(nbytes: int, value: int = 7) -> bytearray:
    """A large result: it stays in the store of the node that ran this."""
    return bytearray([value]) * nbytes


def where_total(array, seconds: float = 0.0):
    """Which network namespace this ran in, and the sum of ``array`` (all 7s)."""
    time.sleep(seconds)
    return os.readlink("/proc/self/ns/net"), 7 * array.count(7)


def hold(seconds: float):
    """Keep a worker busy."""
    time.sleep(seconds)
    return os.readlink("/proc/self/ns/net")


def pid_of(value, seconds: float = 0.0) -> int:
    """Which process ran this (``value``: a large argument, only to be placed by)."""
    time.sleep(seconds)
    return os.getpid()


def pattern(nbytes: int) -> bytearray:
    """A large result whose every byte is checked (not all one value): 0, 1, ... 250, 0, ..."""
    block = bytes(range(251))
    whole, part = divmod(nbytes, len(block))
    return bytearray(block * whole + block[:part])


def where_crc(array, seconds: float = 0.0):
    """Which network namespace this ran in, and the CRC-32 and length of ``array``."""
    import zlib

    time.sleep(seconds)
    return os.readlink("/proc/self/ns/net"), zlib.crc32(array), len(array)


def made_where(nbytes: int):
    """A large result, and which network namespace made it."""
    return os.readlink("/proc/self/ns/net"), make(nbytes)


def made_by_a_child(nbytes: int):
    """A task that submits a task (nested ownership): its child makes ``nbytes``
    wherever the head places it; this owner sums them where it runs. Returns the
    child's namespace, this one's, and the sum."""
    import futurepool

    child = futurepool.current_executor().submit(made_where, nbytes)
    where, array = child.result()
    return where, os.readlink("/proc/self/ns/net"), 7 * array.count(7)
