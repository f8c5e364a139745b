"""Driver-side helpers shared by the ``Pool`` tests (conformance and faults).

* :func:`bounded` runs a call that takes no timeout of its own (``map``,
  ``apply``, ``join``...) with a deadline, and fails the test with every
  thread's stack if it hangs.
* :func:`end_pool` terminates and joins a pool, with the same deadline;
  :func:`end_pools` does it for a fixture's pools and collects them.
* :class:`Gates` hands out gate files for tasks to wait on
  (:func:`tests.conformance._tasks.block`) and opens them all at the end.
* :func:`read_pid` reads the pid a blocked task wrote.

Workers never import this module (it imports pytest).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import traceback

import pytest

from futurepool.testing import wait_until

from . import _tasks as T

#: Seconds any single result, or a call without a timeout of its own, may take.
TIMEOUT = 30.0


def stacks() -> str:
    """Every thread's stack, for a failure message about something that hangs."""
    frames = sys._current_frames()
    return "\n".join(
        f"--- {thread.name}\n" + "".join(traceback.format_stack(frames[thread.ident]))
        for thread in threading.enumerate() if thread.ident in frames)


def bounded(fn, *args, timeout: float = TIMEOUT, **kwargs):
    """``fn(*args, **kwargs)``, failing the test if it has not returned within ``timeout``.

    The call runs on a helper thread; its return value is returned and its
    exception (any ``BaseException``) re-raised here. A call that hangs is
    left behind on its (daemon) thread: the test fails, and the leak check
    reports the thread if ending the pool does not free it.
    """
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller as is
            outcome["error"] = exc

    name = getattr(fn, "__qualname__", repr(fn))
    thread = threading.Thread(target=run, name=f"bounded {name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{name}() did not return within {timeout} s:\n{stacks()}", pytrace=False)
    if "error" in outcome:
        error = outcome.pop("error")
        try:
            raise error
        finally:
            del error
    return outcome["value"]


def end_pool(pool, timeout: float = TIMEOUT) -> None:
    """``terminate()`` then ``join()`` (both idempotent in every implementation), bounded."""

    def finish():
        pool.terminate()
        pool.join()

    bounded(finish, timeout=timeout)


def end_pools(pools: list) -> None:
    """End every pool in ``pools``, forget them, and collect the garbage now.

    A pool that a test's frame kept alive through a reference cycle (an
    exception's traceback: ``pytest.raises(...) as info``) would otherwise be
    freed by whatever garbage collection comes next. For the stdlib's pool
    that frees its queues' semaphores, whose finalizers call the resource
    tracker; when that collection happens inside the tracker (a later test
    registering a semaphore), Python 3.13 refuses the reentrant call and
    warns, and the warning fails that later test. Collected here, outside
    the tracker, they go quietly.
    """
    try:
        for pool in pools:
            end_pool(pool)
    finally:
        pools.clear()
        gc.collect()


def read_pid(path: str, timeout: float = TIMEOUT) -> int:
    """The pid a task wrote to ``path`` (atomically), once it is there."""
    assert wait_until(lambda: os.path.exists(path), timeout), f"no task wrote {path}"
    with open(path) as f:
        return int(f.read())


class Gates:
    """Gate files that blocked tasks wait for; all are opened when the test ends."""

    def __init__(self, directory: str):
        self.directory = directory
        self.paths: list[str] = []
        os.makedirs(directory, exist_ok=True)

    def new(self) -> str:
        path = os.path.join(self.directory, f"gate-{len(self.paths)}")
        self.paths.append(path)
        return path

    def marker(self, name: str) -> str:
        """A path a task may create (e.g. ``started``); not a gate."""
        return os.path.join(self.directory, name)

    def started_marker(self) -> str:
        """A fresh ``started`` path for the next blocked task."""
        return self.marker(f"started-{len(self.paths)}")

    @staticmethod
    def open(path: str) -> None:
        T.touch(path)

    def open_all(self) -> None:
        for path in self.paths:
            T.touch(path)


def only(impl, *allowed, reason):
    """Skip the test unless ``impl`` is one of ``allowed``."""
    if impl not in allowed:
        pytest.skip(reason)


def options_refusal(error, **option) -> BaseException:
    """What ``options(**option)`` raises (it must raise ``error``) on an executor that
    never starts: validation needs no worker."""
    import futurepool

    executor = futurepool.Executor(1)
    try:
        with pytest.raises(error) as caught:
            executor.options(**option)
        return caught.value
    finally:
        executor.shutdown()
