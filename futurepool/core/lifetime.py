"""What outlives one executor: the interpreter-exit and fork hooks, stale run directories.

* At interpreter exit every live owner finishes its work (or, after an
  unhandled Ctrl-C, stops at once), as the stdlib's executors do.
* In a process forked from this one (a worker of a fork-semantics node),
  the executors' copies stay inert.
* Run directories whose driver died are swept when the next executor starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import weakref

from ..store import segments

RUN_DIR_PREFIX = "futurepool-"


def sweep_run_dirs(base: str) -> None:
    """Remove run directories whose driver is gone.

    The driver removes its own, and its node does when the driver dies; this
    catches the rest (driver and node killed together, or the node killed
    before it learnt the directory). Names carry the driver's pid.
    """
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        if not name.startswith(RUN_DIR_PREFIX):
            continue
        pid = name[len(RUN_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not segments.pid_alive(int(pid)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def weak_method(method):
    """Call ``method`` without keeping its object alive (a no-op once it is gone)."""
    ref = weakref.WeakMethod(method)

    def call(*args, **kwargs):
        bound = ref()
        return bound(*args, **kwargs) if bound is not None else None

    return call


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --- interpreter exit --------------------------------------------------------

live_owners: weakref.WeakSet = weakref.WeakSet()
_interpreter_exiting = False


def interpreter_exiting() -> bool:
    return _interpreter_exiting


def _python_exit() -> None:
    """As the stdlib does: at exit, finish outstanding work, then stop.

    Except after an unhandled Ctrl-C: then queued work is cancelled and the
    workers are stopped at once, instead of draining the queue
    (cpython#125886).
    """
    global _interpreter_exiting
    _interpreter_exiting = True
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    owners = list(live_owners)
    for owner in owners:
        if interrupted:
            owner.request_terminate(signal.SIGTERM)
        else:
            owner.request_shutdown()
    for owner in owners:
        owner.join()


# Runs before the interpreter joins non-daemon threads, like the stdlib's
# executors (threading._register_atexit exists since 3.9).
threading._register_atexit(_python_exit)


def _forget_owners_after_fork() -> None:
    """In a process forked from this one, the executors' copies must stay inert.

    Their threads and nodes belong to the parent: a copy must never wake the
    parent's I/O thread (the eventfd is shared) nor pretend to run tasks.
    """
    for owner in list(live_owners):
        owner.sleeping = False
    live_owners.clear()


os.register_at_fork(after_in_child=_forget_owners_after_fork)
