"""The start method decides what workers inherit, as with the stdlib (issue 8).

* fork (the default on Linux before 3.14): workers see the driver's memory as
  it was when the executor started: ``multiprocessing`` objects of the
  default context in ``initargs``, module state of the main script;
* spawn and forkserver: workers import the main script as ``__mp_main__``,
  so its top-level functions share its globals with the initializer, and a
  script without the main-module guard gets an error that says so;
* ``_processes`` (and ``Pool._pool``) are shaped as the stdlib's; workers
  start on demand under spawn/forkserver and all at once under fork;
* a ``SharedMemory`` passed to a task is never unlinked under the caller.

Scripts whose ``__main__`` matters run as real scripts in a fresh
interpreter, the way users run them; each prints one JSON line.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap

import pytest

import futurepool
from futurepool.errors import WorkerCrashedError
from futurepool.testing import wait_until

from . import _tasks as T
from ._support import TIMEOUT, Gates, read_pid

METHODS = ["fork", "spawn", "forkserver"]
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(tmp_path, source: str, *args: str, name: str = "script.py",
               timeout: float = 120.0) -> tuple[subprocess.CompletedProcess, object]:
    """Run ``source`` as a script in a fresh interpreter; its last stdout line as JSON."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_REPO, str(tmp_path)]))
    proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path, env=env)
    lines = proc.stdout.strip().splitlines()
    try:
        value = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        value = None
    return proc, value


@pytest.fixture
def gates(tmp_path):
    g = Gates(str(tmp_path / "gates"))
    yield g
    g.open_all()


# --- point 1: multiprocessing objects of the default context in initargs -------------


def _context_objects():
    ctx = multiprocessing.get_context()
    return {
        "Queue": ctx.Queue, "JoinableQueue": ctx.JoinableQueue, "Lock": ctx.Lock,
        "RLock": ctx.RLock, "Event": ctx.Event, "Semaphore": ctx.Semaphore,
        "Value": lambda: ctx.Value("i", 0), "Array": lambda: ctx.Array("i", 4),
    }


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork",
                    reason="the default context is not fork on this platform")
@pytest.mark.parametrize("kind", sorted(_context_objects()))
@pytest.mark.parametrize("facade", ["executor", "pool"])
def test_default_context_objects_in_initargs(kind, facade):
    """Issue 8.1: the stdlib's fork workers take these in initargs; so do ours."""
    obj = _context_objects()[kind]()
    if facade == "executor":
        with futurepool.Executor(2, initializer=T.keep_global, initargs=(obj,)) as executor:
            result = executor.submit(T.use_kept, kind).result(timeout=TIMEOUT)
    else:
        with futurepool.Pool(2, initializer=T.keep_global, initargs=(obj,)) as pool:
            result = pool.apply_async(T.use_kept, (kind,)).get(timeout=TIMEOUT)
    assert result == "ok"
    T.check_kept_in_driver(obj, kind)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork",
                    reason="the default context is not fork on this platform")
def test_logging_cookbook_queue_handler():
    """The logging cookbook's pattern: a default-context Queue, a QueueHandler per worker."""
    queue = multiprocessing.Queue()
    with futurepool.Executor(2, initializer=T.install_queue_handler,
                             initargs=(queue,)) as executor:
        assert executor.submit(T.log_line, "hello").result(timeout=TIMEOUT) is None
    record = queue.get(timeout=TIMEOUT)
    assert isinstance(record, logging.LogRecord)
    assert record.getMessage() == "hello"
    assert record.processName.startswith("ForkProcess-")
    queue.close()
    queue.join_thread()


# --- point 2: module state of the main script ---------------------------------------

_MAIN_STATE = """
import json, multiprocessing, os, sys
import futurepool

STATE = None
CACHE = {}

def init(value):
    global STATE
    STATE = value
    CACHE["opened"] = os.getpid()

def read(_):
    CACHE["calls"] = CACHE.get("calls", 0) + 1
    return STATE, CACHE["opened"] == os.getpid(), CACHE["calls"]

if __name__ == "__main__":
    method = sys.argv[1]
    ctx = multiprocessing.get_context(method)
    out = {}
    with futurepool.Executor(1, mp_context=ctx, initializer=init, initargs=(42,)) as ex:
        out["executor"] = [ex.submit(read, i).result(timeout=60) for i in range(3)]
    with futurepool.Pool(1, initializer=init, initargs=(43,), context=ctx) as pool:
        out["pool"] = pool.map(read, range(3))
    print(json.dumps(out))
"""


@pytest.mark.parametrize("method", METHODS)
def test_main_script_state_set_by_the_initializer(tmp_path, method):
    """Issue 8.2: the initializer's globals are what later tasks see (a per-worker cache)."""
    proc, out = run_script(tmp_path, _MAIN_STATE, method)
    assert proc.returncode == 0, proc.stderr
    assert out["executor"] == [[42, True, 1], [42, True, 2], [42, True, 3]], out
    assert out["pool"] == [[43, True, 1], [43, True, 2], [43, True, 3]], out


_LATE_DEFINITION = """
import json, multiprocessing
import futurepool

def early(x):
    return x + 1

if __name__ == "__main__":
    with futurepool.Executor(1) as ex:
        first = ex.submit(early, 1).result(timeout=60)
        def late(x):          # defined after the workers were forked: travels by value
            return x * 10
        second = ex.submit(late, 2).result(timeout=60)
        third = ex.submit(lambda: 7).result(timeout=60)
    print(json.dumps([first, second, third]))
"""


def test_functions_defined_after_the_start_travel_by_value(tmp_path):
    proc, out = run_script(tmp_path, _LATE_DEFINITION)
    assert proc.returncode == 0, proc.stderr
    assert out == [2, 20, 7]


_MAIN_CLASSES = """
import json, multiprocessing, sys
import futurepool

class Point:
    def __init__(self, x):
        self.x = x

class MyError(Exception):
    pass

def make(x):
    return Point(x)

def boom():
    raise MyError("from the worker")

if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    with futurepool.Executor(1, mp_context=ctx) as ex:
        point = ex.submit(make, 3).result(timeout=60)
        try:
            ex.submit(boom).result(timeout=60)
            caught = "nothing raised"
        except MyError as exc:
            caught = str(exc)
    print(json.dumps([type(point) is Point, point.x, caught]))
"""


@pytest.mark.parametrize("method", METHODS)
def test_classes_of_the_main_script_arrive_as_themselves(tmp_path, method):
    """Results and exceptions of the script's own classes: ``except MyError`` catches."""
    proc, out = run_script(tmp_path, _MAIN_CLASSES, method)
    assert proc.returncode == 0, proc.stderr
    assert out == [True, 3, "from the worker"]


# --- point 5 and 6: _processes, Pool._pool, workers on demand -------------------------


@pytest.mark.parametrize("method", METHODS)
def test_processes_are_shaped_as_the_stdlibs(method):
    ctx = multiprocessing.get_context(method)
    with futurepool.Executor(4, mp_context=ctx) as executor:
        assert executor._processes == {}
        pids = {executor.submit(os.getpid).result(timeout=TIMEOUT) for _ in range(3)}
        processes = executor._processes
        expected = 4 if method == "fork" else 1  # on demand, an idle worker is reused
        assert len(processes) == expected, processes
        assert pids <= set(processes)
        for pid, process in processes.items():
            assert process.pid == pid and process.is_alive() and process.exitcode is None
            assert process.name.startswith(
                {"fork": "ForkProcess-", "spawn": "SpawnProcess-",
                 "forkserver": "ForkServerProcess-"}[method])
    assert executor._processes is None
    for process in processes.values():
        process.join(TIMEOUT)
        assert not process.is_alive() and process.exitcode == 0


def test_spawn_workers_start_on_demand_up_to_max_workers(gates):
    ctx = multiprocessing.get_context("spawn")
    with futurepool.Executor(3, mp_context=ctx) as executor:
        gate = gates.new()
        futures = [executor.submit(T.block, gate, None, i) for i in range(10)]
        assert len(executor._processes) == 3
        gates.open(gate)
        assert [f.result(timeout=TIMEOUT) for f in futures] == list(range(10))


def test_terminating_a_worker_through_processes_fails_only_its_task(gates):
    with futurepool.Executor(2) as executor:
        gate, started = gates.new(), gates.started_marker()
        running = executor.submit(T.block, gate, started, "never")
        pid = read_pid(started)
        executor._processes[pid].terminate()
        with pytest.raises(WorkerCrashedError, match="SIGTERM"):
            running.result(timeout=TIMEOUT)
        assert executor.submit(T.inc, 1).result(timeout=TIMEOUT) == 2
        assert wait_until(lambda: pid not in executor._processes
                          and len(executor._processes) == 2, TIMEOUT)


def test_pool_keeps_its_workers_in_pool_list():
    with futurepool.Pool(3, context=multiprocessing.get_context("spawn")) as pool:
        workers = pool._pool
        assert len(workers) == 3 and all(w.is_alive() for w in workers)
        assert set(pool.map(T.getpid_after, [0.05] * 6)) <= {w.pid for w in workers}
    for worker in workers:
        worker.join(TIMEOUT)
        assert not worker.is_alive()


# --- point 7: the main-module guard ------------------------------------------------------

_NO_GUARD = """
import multiprocessing
import futurepool

def square(x):
    return x * x

ex = futurepool.Executor(1, mp_context=multiprocessing.get_context("{method}"))
print("RESULT", ex.submit(square, 3).result(timeout=60))
ex.shutdown()
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_script_without_the_guard_gets_an_error_that_names_it(tmp_path, method):
    """Workers re-run the script's module code, whose submit fails there: the driver's
    future fails with an error naming the guard (the stdlib's workers die likewise)."""
    proc, _ = run_script(tmp_path, _NO_GUARD.format(method=method), timeout=90)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "RESULT" not in proc.stdout
    error = proc.stderr[proc.stderr.rindex("futurepool.errors.WorkerCrashedError: "):]
    assert "could not start: importing the main script" in error, error
    assert "main-module guard" in error and 'if __name__ == "__main__":' in error, error


_UNGUARDED_MODULE = """
import futurepool

def work(x):
    return x + 1

# Module-level code that starts an executor: runs again wherever the module is imported.
_ex = futurepool.Executor(1)
_ex.submit(work, 0).result(timeout=60)
_ex.shutdown()
"""

_IMPORTS_UNGUARDED = """
import multiprocessing
import futurepool

if __name__ == "__main__":
    from unguarded import work   # its module code runs here, in the driver: fine

    with futurepool.Executor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        try:
            print(ex.submit(work, 1).result(timeout=60))
        except Exception as exc:
            print("ERROR", type(exc).__name__, repr(str(exc)))
"""


def test_a_function_from_a_module_without_the_guard_fails_instead_of_hanging(tmp_path):
    (tmp_path / "unguarded.py").write_text(_UNGUARDED_MODULE)
    proc, _ = run_script(tmp_path, _IMPORTS_UNGUARDED, timeout=90)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("ERROR UnpicklingFailedError"), proc.stdout + proc.stderr
    assert "main-module guard" in last and "__main__" in last, last


# --- point 8: the stdlib's shared memory passed to tasks --------------------------------

_SHARED_MEMORY = """
import json, multiprocessing, sys
from multiprocessing import shared_memory
import futurepool

def fill(shm, value):
    shm.buf[:4] = bytes([value]) * 4
    return bytes(shm.buf[:4]).hex()

def fill_list(items, value):
    items[0] = value
    return items[0]

if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    shm = shared_memory.SharedMemory(create=True, size=4096)
    items = shared_memory.ShareableList([0, 1, 2])
    # One task per worker, each worker replaced after it: attaches die with them.
    with futurepool.Executor(2, mp_context=ctx, max_tasks_per_child=1) as ex:
        got = [ex.submit(fill, shm, v).result(timeout=60) for v in (7, 9)]
        listed = ex.submit(fill_list, items, 5).result(timeout=60)
    again = shared_memory.SharedMemory(name=shm.name)   # still there, by name
    out = {"got": got, "listed": listed, "value": again.buf[0], "item": items[0]}
    again.close()
    shm.close()
    shm.unlink()                                        # FileNotFoundError if it was lost
    items.shm.close()
    items.shm.unlink()
    print(json.dumps(out))
"""


@pytest.mark.parametrize("method", METHODS)
def test_shared_memory_passed_to_tasks_is_never_unlinked_under_the_caller(tmp_path, method):
    proc, out = run_script(tmp_path, _SHARED_MEMORY, method)
    assert proc.returncode == 0, proc.stderr
    assert out == {"got": ["07070707", "09090909"], "listed": 5, "value": 9, "item": 5}
    assert "leaked" not in proc.stderr and "resource_tracker" not in proc.stderr, proc.stderr


# --- an executor inherited by a forked worker ----------------------------------------------

_INHERITED_EXECUTOR = """
import json
import futurepool

EX = None

def submit_to_the_copy(_):
    try:
        EX.submit(abs, -1)
    except RuntimeError as exc:
        return str(exc)
    return "no error"

if __name__ == "__main__":
    EX = futurepool.Executor(1)
    EX.submit(abs, 0).result(timeout=60)     # the node is forked now, EX set
    print(json.dumps(EX.submit(submit_to_the_copy, 0).result(timeout=60)))
    EX.shutdown()
"""


def test_a_forked_copy_of_the_executor_refuses_tasks(tmp_path):
    proc, out = run_script(tmp_path, _INHERITED_EXECUTOR)
    assert proc.returncode == 0, proc.stderr
    assert "belongs to the process that created it" in out
