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
