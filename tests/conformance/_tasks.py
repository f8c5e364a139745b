"""Tasks for the conformance and Pool tests (one module, so none is written twice).

Workers import this module by name (``multiprocessing`` pickles functions by
reference under spawn, and cloudpickle does the same for importable
modules), so everything here is module level and depends on no test-time
state. It imports only the stdlib on purpose: every spawn worker of the
stdlib pools imports it, and keeping pytest and futurepool out of that
import halves a spawn worker's start-up (about 0.2 s instead of 0.4 s), which
is most of what these tests cost.

Tasks that must stay busy wait for a *gate* file the test creates; every
wait here gives up after ``GATE_TIMEOUT`` seconds so that nothing can hang
for good.
"""

from __future__ import annotations

import os
import threading
import time

#: Seconds a task waits for its gate before giving up.
GATE_TIMEOUT = 20.0


class CustomError(Exception):
    """A user exception type that must come back as itself."""


class TwoArgumentError(Exception):
    """Pickles as ``TwoArgumentError(first)``, which cannot be called: it never unpickles."""

    def __init__(self, first, second):
        super().__init__(first)
        self.second = second


class LockedError(Exception):
    """Holds a lock, so it cannot be pickled at all."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


# --- plain tasks -----------------------------------------------------------------


def square(x):
    return x * x


def add(x, y=0):
    return x + y


def inc(x):
    return x + 1


def identity(x):
    return x


def echo(*args, **kwargs):
    return args, kwargs


def noop(*_args):
    return None


def getpid(_=None):
    return os.getpid()


def raise_error(message):
    raise CustomError(message)


def raise_if_negative(x):
    if x < 0:
        raise CustomError(f"negative: {x}")
    return x


def make_lock(_=None):
    """A result no pickler can handle."""
    return threading.Lock()


def lock_unless_zero(x):
    return x if x == 0 else threading.Lock()


def raise_base_exception(kind):
    """Raise a BaseException that is not an Exception: the stdlib's worker does not catch these."""
    if kind == "keyboard_interrupt":
        raise KeyboardInterrupt("raised by the task")
    if kind == "system_exit":
        raise SystemExit(3)
    raise ValueError(f"unknown kind {kind!r}")


def raise_two_argument_error(_=None):
    raise TwoArgumentError("only the first survives", "second")


def raise_locked_error(_=None):
    raise LockedError("cannot travel")


def payload(size):
    """``size`` bytes, to make results heavy enough for memory to notice."""
    return b"x" * size


# --- chunk positions ---------------------------------------------------------------


class Marker:
    """An item of ``map`` whose calls count how far into its chunk they are.

    ``map(chunk_position, [Marker()] * n)`` passes the same object n times.
    A chunk is pickled as one unit, so inside one chunk the worker gets one
    object back for all its items, and a new object for the next chunk:
    the count restarts at 0 exactly where a chunk starts.
    """

    def __init__(self):
        self.calls = 0


def chunk_position(marker):
    position = marker.calls
    marker.calls += 1
    return position


def chunk_position_of_pair(marker, _other):
    """``starmap`` form of :func:`chunk_position`."""
    return chunk_position(marker)


# --- gates -----------------------------------------------------------------------------


def touch(path):
    with open(path, "a"):
        pass


def write_atomically(path, text):
    """Create ``path`` holding ``text``; a reader never sees it half written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def wait_for_path(path, timeout=GATE_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def block(gate, started=None, value=None):
    """Return ``value`` once the file ``gate`` exists; first write our pid to ``started``."""
    if started is not None:
        write_atomically(started, str(os.getpid()))
    wait_for_path(gate)
    return value


def gated_item(item):
    """``item`` is ``(value, gate)``: wait for ``gate`` unless it is None, return ``value``."""
    value, gate = item
    if gate is not None:
        wait_for_path(gate)
    return value


def square_unless_victim(item):
    """``item`` is ``(x, started)``: return x * x, or, with ``started``, wait to be killed.

    The victim writes its pid to ``started`` and then waits for a gate that
    is never opened (``started + ".never"``); if nobody kills it, it fails
    with TimeoutError after ``GATE_TIMEOUT`` seconds, which no test accepts.
    """
    x, started = item
    if started is not None:
        write_atomically(started, str(os.getpid()))
        wait_for_path(started + ".never")
    return x * x


def mark_and_return(path, value):
    """Create ``path`` (so the test knows this ran), return ``value``."""
    touch(path)
    return value


def gated_note(item):
    """``item`` is ``(value, gate, directory)``: as :func:`gated_item`, then note the value.

    The file ``done-<value>`` in ``directory`` tells the test that this item
    has been computed, whether or not anybody has been handed its result.
    """
    value, gate, directory = item
    if gate is not None:
        wait_for_path(gate)
    touch(os.path.join(directory, f"done-{value}"))
    return value


# --- initializers ----------------------------------------------------------------------------

_initialized_with = None


def remember_and_report(token, channel):
    """Initializer: keep ``token`` for the tasks and tell the test it ran, and where."""
    global _initialized_with
    _initialized_with = token
    channel.put((token, os.getpid(), threading.get_ident()))


def initialized_with(_=None):
    return _initialized_with, os.getpid(), threading.get_ident()


def log_start(path):
    """Initializer: append our pid to ``path``, one line per worker start."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


# --- values that record their route ------------------------------------------------------------


class Traveller:
    """Records the pid of every process that pickles it.

    Made in one worker and read in another, it arrives with ``route ==
    [maker]`` if the pickled bytes went straight from worker to worker; a
    driver that unpickled the value and pickled it again adds its own pid.
    """

    def __init__(self, maker, route=()):
        self.maker = maker
        self.route = list(route)

    def __reduce__(self):
        return (Traveller, (self.maker, [*self.route, os.getpid()]))


def make_traveller(_=None):
    return Traveller(os.getpid())


def route_of(traveller):
    """(who made it, who pickled it on the way, who reads it)."""
    return traveller.maker, list(traveller.route), os.getpid()


# --- start methods (test_start_methods.py) ---------------------------------------------

_KEPT = None


def keep_global(obj):
    """An initializer that keeps a ``multiprocessing`` object for later tasks."""
    global _KEPT
    _KEPT = obj


def use_kept(kind):
    """Use what :func:`keep_global` kept, so that the driver can see it was used."""
    obj = _KEPT
    if kind in ("Queue", "JoinableQueue"):
        obj.put("from the worker")
        obj.close()
        obj.join_thread()  # flushed before the result is reported
    elif kind in ("Lock", "RLock", "Semaphore"):
        if not obj.acquire(timeout=GATE_TIMEOUT):
            return "could not acquire"
        obj.release()
    elif kind == "Event":
        obj.set()
    elif kind == "Value":
        with obj.get_lock():
            obj.value += 1
    elif kind == "Array":
        obj[0] = 7
    return "ok"


def check_kept_in_driver(obj, kind):
    """What :func:`use_kept` did, seen from the driver."""
    if kind in ("Queue", "JoinableQueue"):
        assert obj.get(timeout=GATE_TIMEOUT) == "from the worker"
        if kind == "JoinableQueue":
            obj.task_done()
        obj.close()
        obj.join_thread()
    elif kind in ("Lock", "RLock", "Semaphore"):
        assert obj.acquire(timeout=GATE_TIMEOUT)
        obj.release()
    elif kind == "Event":
        assert obj.is_set()
    elif kind == "Value":
        assert obj.value == 1
    elif kind == "Array":
        assert obj[0] == 7


def install_queue_handler(queue):
    """The logging cookbook's worker configuration: every record goes to ``queue``."""
    import logging.handlers

    logger = logging.getLogger("futurepool.tests.cookbook")
    logger.handlers[:] = [logging.handlers.QueueHandler(queue)]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def log_line(message):
    import logging

    logging.getLogger("futurepool.tests.cookbook").info(message)


def getpid_after(seconds):
    time.sleep(seconds)
    return os.getpid()
