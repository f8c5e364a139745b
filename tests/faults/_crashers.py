"""Tasks, arguments and results that crash a worker on cue (FAULTS.md §3 A).

Workers import this module by name (cloudpickle pickles module-level
functions and classes by reference), so everything here must stay importable
as ``tests.faults._crashers`` and must not depend on test-time state.

The one vocabulary shared by every helper is :func:`crash`: ``kind`` says how
the current process fails at that point ("raise", "sys_exit", "segfault",
"os_exit", "libc_exit", "sigkill", "abort"). The classes place that call at
one of the five points of the loky / CPython crash matrix: pickling or
unpickling the call, running it, pickling or unpickling its result, plus the
garbage collection of the call's arguments.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import faulthandler
import os
import signal
import sys
import time

#: Exit codes used by the crash kinds, so that tests can assert on them.
OS_EXIT_CODE = 3
LIBC_EXIT_CODE = 0
SYS_EXIT_CODE = 7


class CrashTestError(Exception):
    """The ordinary exception raised by the "raise" crash kind."""


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def crash(kind: str):
    """Fail the calling process in the way ``kind`` names.

    ``segfault`` leaves faulthandler as it is: if the worker enabled it, its
    traceback is what FAULTS.md item 2 wants to find in the node's log.
    ``libc_exit`` is C-level ``exit()``: no Python clean-up, stdio flushed.
    """
    if kind == "raise":
        raise CrashTestError(f"crash point reached in pid {os.getpid()}")
    if kind == "sys_exit":
        sys.exit(SYS_EXIT_CODE)
    if kind == "segfault":
        faulthandler._sigsegv()
    elif kind == "os_exit":
        os._exit(OS_EXIT_CODE)
    elif kind == "libc_exit":
        _libc().exit(LIBC_EXIT_CODE)
    elif kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "abort":
        os.abort()
    else:
        raise ValueError(f"unknown crash kind {kind!r}")
    # A signal may take a moment to be delivered; never return normally.
    time.sleep(30)
    raise AssertionError(f"crash({kind!r}) returned")


# --- plain tasks ----------------------------------------------------------------


def get_pid() -> int:
    return os.getpid()


def identity(value):
    return value


def add(a, b):
    return a + b


def pid_after(seconds: float) -> int:
    """Sleep, then return the worker's pid (keeps a worker busy for a while)."""
    time.sleep(seconds)
    return os.getpid()


def big_result(size: int) -> bytes:
    """A result large enough that sending it takes zmq a while."""
    return b"x" * size


def make_lock():
    """Returns something no pickler accepts (FAULTS.md item 8)."""
    import threading

    return threading.Lock()


def payload_value(payload) -> object:
    """A dependent task: reads the value of a :class:`Payload` it was given."""
    return payload.value


def return_instance(cls, *args):
    """The task's result is ``cls(*args)``: puts a class at the result-pickling point."""
    return cls(*args)


def raise_error(message: str):
    raise CrashTestError(message)


def write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def crash_after(seconds: float, kind: str):
    """Sleep, then crash: leaves the caller time to attach done-callbacks first."""
    time.sleep(seconds)
    crash(kind)


def crash_once(marker: str, kind: str):
    """Crash the first time (creating ``marker`` with our pid); succeed on a re-run.

    ``kind="wait_for_kill"`` does not crash by itself: it sleeps so that the
    test can SIGKILL the worker whose pid it finds in ``marker``.
    """
    if os.path.exists(marker):
        return ("recovered", os.getpid())
    write_atomically(marker, str(os.getpid()))
    if kind == "wait_for_kill":
        time.sleep(30)
        raise AssertionError("the test did not kill this worker")
    crash(kind)


def log_pid_and_crash(log_path: str, kind: str):
    """Append our pid to ``log_path`` (one line per attempt), then crash."""
    with open(log_path, "a") as f:
        f.write(f"{os.getpid()}\n")
    crash(kind)


def crash_after_reporting(path: str, kind: str):
    """Write our pid to ``path``, then crash; the test compares it with the error's pid."""
    write_atomically(path, str(os.getpid()))
    if kind == "wait_for_kill":
        time.sleep(30)
        raise AssertionError("the test did not kill this worker")
    crash(kind)


# --- crash at a (un)pickling point --------------------------------------------------


class CrashOnPickle:
    """Crashes whoever pickles it (the driver at submit, or a worker for a result)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __reduce__(self):
        crash(self.kind)


class CrashOnUnpickle:
    """Pickles fine; crashes whoever unpickles it (a worker, or the driver)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __reduce__(self):
        return crash, (self.kind,)


class Payload:
    """A plain value that :class:`FailsToLoadIn` turns into where it may be loaded."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return type(other) is Payload and other.value == self.value

    def __hash__(self):
        return hash(self.value)


def _load_unless_in(where: str, driver_pid: int, value):
    in_driver = os.getpid() == driver_pid
    if (where == "driver") == in_driver:
        raise CrashTestError(f"refusing to load in the {where} (pid {os.getpid()})")
    return Payload(value)


class FailsToLoadIn:
    """Unpickles into a :class:`Payload` everywhere except ``where``.

    ``where`` is ``"driver"`` (the process whose pid is ``driver_pid``) or
    ``"workers"`` (every other process). Tells apart "this consumer could not
    load the object" from "the object is broken for everyone".
    """

    def __init__(self, where: str, driver_pid: int, value):
        self.where = where
        self.driver_pid = driver_pid
        self.value = value

    def __reduce__(self):
        return _load_unless_in, (self.where, self.driver_pid, self.value)


# --- crash at garbage collection ----------------------------------------------------


class CrashInDel:
    """Crashes in ``__del__`` in any process but the one that made it.

    The driver's own copy is collected harmlessly; the worker's copy (an
    argument of a task) crashes the worker whenever the worker frees it.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self.creator_pid = os.getpid()

    def __del__(self):
        if os.getpid() != self.creator_pid:
            crash(self.kind)


def pid_with_argument(_argument) -> int:
    return os.getpid()


# --- crash races -------------------------------------------------------------------


def rendezvous_and_kill(directory: str, index: int, count: int, timeout: float):
    """Meet ``count`` sibling tasks, then kill one of them (FAULTS.md item 12).

    Every task writes its pid to ``directory/<index>`` and waits until all
    ``count`` have done so. Then even indices are killers: task ``i`` SIGKILLs
    the worker of task ``i + 1`` (with one worker, task 0 kills itself) and
    returns ``("killer", pid)``; odd indices are victims and sleep until
    killed. All killers fire at about the same moment.
    """
    write_atomically(os.path.join(directory, str(index)), str(os.getpid()))
    deadline = time.monotonic() + timeout
    while len([n for n in os.listdir(directory) if n.isdigit()]) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {index}: only {os.listdir(directory)} of {count} met")
        time.sleep(0.005)
    if count == 1:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(timeout)
    if index % 2 == 0:
        partner = os.path.join(directory, str(index + 1))
        if os.path.exists(partner):
            with open(partner) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        return ("killer", os.getpid())
    time.sleep(timeout)
    return ("survived", os.getpid())


# --- initializers ---------------------------------------------------------------------


def failing_initializer(log_path: str, kind: str) -> None:
    """Append our pid to ``log_path`` (one line per worker start), then fail."""
    with open(log_path, "a") as f:
        f.write(f"{os.getpid()}\n")
    crash(kind)
