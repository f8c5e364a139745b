"""Nothing outlives an executor: processes, threads and the run directory (FAULTS.md 27, 44, 45).

Each way an executor's life can end is covered: ``shutdown()``; garbage
collection without shutdown; interpreter exit with futures still pending,
also after ``shutdown(wait=False)``; the driver killed with SIGKILL while
tasks run; Ctrl-C in the driver. Whatever involves the driver's own exit or
death runs in a subprocess driver (FAULTS.md §4).

After each scenario, the node and worker processes recorded while the pool
ran must be gone, no process started during the test whose command line
mentions futurepool may be left, and the executor's run directory (the
``ipc://`` socket's home under ``futurepool.config.TMPDIR``) must be removed.
The autouse fixtures in ``tests/conftest.py`` check the same things again,
more broadly, after every test.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import weakref

import psutil
import pytest

import futurepool
from futurepool import config
from futurepool.core.processes import NODE_PROCESS_NAME
from futurepool.testing import (
    DRIVER_TAG,
    descendants,
    kill_processes,
    run_driver,
    tagged_processes,
    wait_until,
)

TIMEOUT = 30.0
#: Seconds the processes of a pool get to disappear once their end is due.
GONE_TIMEOUT = 5.0
#: Seconds a driver gets to exit after Ctrl-C.
CTRL_C_TIMEOUT = 5.0

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(futurepool.__file__)))

#: Prepended to every driver: prints the driver's node and worker processes.
DRIVER_PRELUDE = """
import json, os, sys, time
import psutil
import futurepool

def report_pool(**extra):
    me = psutil.Process()
    nodes = [p for p in me.children() if p.name() == "futurepool-node"]
    procs = nodes + [w for n in nodes for w in n.children(recursive=True)]
    print(json.dumps({"pool": [[p.pid, p.create_time()] for p in procs],
                      "nodes": [p.pid for p in nodes], **extra}), flush=True)
"""


# --- tasks -------------------------------------------------------------------------


def getpid():
    return os.getpid()


def sleep_and_return(seconds, value):
    time.sleep(seconds)
    return value


# --- helpers -----------------------------------------------------------------------


def _run_entries() -> set[str]:
    try:
        return set(os.listdir(config.TMPDIR))
    except FileNotFoundError:
        return set()


def _is_node(proc: psutil.Process) -> bool:
    try:
        return proc.name() == NODE_PROCESS_NAME
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def pool_processes() -> list[psutil.Process]:
    """This process's futurepool nodes and their workers."""
    nodes = [p for p in psutil.Process().children() if _is_node(p)]
    return nodes + [w for n in nodes for w in descendants(n)]


def _gone(proc: psutil.Process) -> bool:
    # A zombie whose parent died is init's to reap: it no longer runs anything.
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _recorded(pairs) -> list[psutil.Process]:
    """psutil handles for ``[pid, create_time]`` pairs a driver printed (gone ones skipped)."""
    procs = []
    for pid, created in pairs:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01:
                procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    return procs


def _describe(procs) -> str:
    lines = []
    for proc in procs:
        try:
            lines.append(f"  pid {proc.pid} ({proc.status()}): {' '.join(proc.cmdline())[:150]}")
        except psutil.Error:
            lines.append(f"  pid {proc.pid} (gone meanwhile)")
    return "\n".join(lines)


def assert_gone(procs, timeout=GONE_TIMEOUT, what="pool processes") -> None:
    procs = list(procs)
    if not wait_until(lambda: all(_gone(p) for p in procs), timeout, interval=0.05):
        left = [p for p in procs if not _gone(p)]
        pytest.fail(f"{len(left)} {what} still there {timeout:g} s later:\n{_describe(left)}")


def futurepool_processes(since: float) -> list[psutil.Process]:
    """Live processes started after ``since`` whose command line mentions futurepool.

    Limited to this test session's processes (their FUTUREPOOL_TMPDIR), so
    that parallel test workers do not see each other's pools; this process
    and its ancestors (whose command line may name the repository) excluded.
    """
    me = psutil.Process()
    skip = {me.pid} | {p.pid for p in me.parents()}
    found = []
    for proc in psutil.process_iter():
        if proc.pid in skip:
            continue
        try:
            if proc.create_time() < since - 0.05 or _gone(proc):
                continue
            if "futurepool" not in " ".join(proc.cmdline()) + proc.name():
                continue
            if proc.environ().get("FUTUREPOOL_TMPDIR") != os.environ.get("FUTUREPOOL_TMPDIR"):
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        found.append(proc)
    return found


def assert_no_futurepool_processes(since: float, timeout=GONE_TIMEOUT) -> None:
    if not wait_until(lambda: not futurepool_processes(since), timeout, interval=0.05):
        left = futurepool_processes(since)
        pytest.fail(f"processes mentioning futurepool left behind:\n{_describe(left)}")


def assert_run_dirs_removed(before: set[str], timeout=GONE_TIMEOUT) -> None:
    if not wait_until(lambda: not (_run_entries() - before), timeout, interval=0.05):
        pytest.fail(f"run directories left in {config.TMPDIR}: {sorted(_run_entries() - before)}")


def _driver_env(extra=None) -> dict:
    path = os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, **(extra or {})}


class Driver:
    """A driver script run in the background, in its own session, for signals.

    Its output goes to files (a pipe would be held open by whatever it left
    behind). Every process it starts carries a tag in its environment, so
    :meth:`kill_everything` finds them even outside its process tree.
    """

    def __init__(self, code: str, directory, env=None):
        self.tag = uuid.uuid4().hex
        self.out_path = os.path.join(directory, f"driver-{self.tag}.out")
        self.err_path = os.path.join(directory, f"driver-{self.tag}.err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env={**os.environ, **_driver_env(env), DRIVER_TAG: self.tag},
                start_new_session=True,  # its own process group, as a terminal job is
            )

    @property
    def stdout(self) -> str:
        with open(self.out_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    @property
    def stderr(self) -> str:
        with open(self.err_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def read_json(self, key: str, timeout: float = TIMEOUT) -> dict:
        """The first JSON line of the driver's stdout that has ``key``."""
        found = {}

        def look() -> bool:
            for line in self.stdout.splitlines():
                if line.startswith("{"):
                    record = json.loads(line)
                    if key in record:
                        found.update(record)
                        return True
            return self.proc.poll() is not None

        wait_until(look, timeout, interval=0.02)
        if not found:
            pytest.fail(f"the driver printed no {key!r} (exit code {self.proc.poll()}):\n"
                        f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}")
        return found

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_everything(self) -> None:
        try:
            procs = {psutil.Process(self.proc.pid), *descendants(psutil.Process(self.proc.pid))}
        except psutil.NoSuchProcess:
            procs = set()
        kill_processes(procs | set(tagged_processes(DRIVER_TAG, self.tag)))
        self.proc.wait(TIMEOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.kill_everything()  # whatever the test's outcome: nothing outlives it
        return False


def _run(code: str, env=None) -> subprocess.CompletedProcess:
    try:
        return run_driver(DRIVER_PRELUDE + textwrap.dedent(code), timeout=TIMEOUT,
                          env=_driver_env(env))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the driver did not exit within {TIMEOUT:g} s:\n"
                    f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")


# --- in-process ends ----------------------------------------------------------------


def test_shutdown_leaves_nothing_behind():
    since = time.time()
    dirs_before = _run_entries()
    threads_before = set(threading.enumerate())
    executor = futurepool.Executor(max_workers=2)
    try:
        futures = [executor.submit(sleep_and_return, 0.2, i) for i in range(4)]
        assert [f.result(timeout=TIMEOUT) for f in futures] == [0, 1, 2, 3]
        pids = {executor.submit(getpid).result(timeout=TIMEOUT) for _ in range(4)}
        procs = pool_processes()
        nodes = [p for p in procs if p.ppid() == os.getpid()]  # workers share its cmdline
        assert len(nodes) == 1 and len(procs) == 3, _describe(procs)
        assert pids <= {p.pid for p in procs} - {nodes[0].pid}
        assert len(_run_entries() - dirs_before) == 1
    finally:
        executor.shutdown(wait=True)
    # shutdown(wait=True) returns once everything has ended: no grace period.
    assert all(_gone(p) for p in procs), _describe(p for p in procs if not _gone(p))
    assert _run_entries() - dirs_before == set()
    assert set(threading.enumerate()) - threads_before == set()
    assert futurepool_processes(since) == []


def test_a_command_posted_as_the_io_thread_closes_touches_no_descriptor():
    """A thread posting a command (a finalizer's free, shutdown) can find the I/O thread
    asleep just before it wakes, exits and closes its wake-up descriptor: the post must
    then write nothing, neither failing (EBADF) nor into whatever file got that number."""
    executor = futurepool.Executor(max_workers=1)
    assert executor.submit(abs, -1).result(timeout=TIMEOUT) == 1
    owner = executor._owner
    executor.shutdown(wait=True)
    read_end, write_end = os.pipe()  # (the lowest free numbers: the closed one, likely)
    try:
        owner.sleeping = True  # as it was when the poster looked
        owner.post(("shutdown", False))
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):
            os.read(read_end, 8)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_garbage_collected_executor_finishes_its_work_then_stops():
    since = time.time()
    dirs_before = _run_entries()
    threads_before = set(threading.enumerate())
    executor = futurepool.Executor(max_workers=2)
    try:
        futures = [executor.submit(sleep_and_return, 0.2, i) for i in range(6)]
        assert wait_until(lambda: len(pool_processes()) == 3, TIMEOUT)
    except BaseException:
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    procs = pool_processes()
    collected = weakref.ref(executor)
    del executor
    gc.collect()
    assert collected() is None, "something still holds the executor"
    # Pending futures still complete, as with the stdlib ...
    assert [f.result(timeout=TIMEOUT) for f in futures] == list(range(6))
    # ... then the pool goes away by itself.
    assert_gone(procs)
    assert_run_dirs_removed(dirs_before)
    assert wait_until(lambda: not (set(threading.enumerate()) - threads_before), GONE_TIMEOUT), (
        set(threading.enumerate()) - threads_before)
    assert_no_futurepool_processes(since)


# --- interpreter exit ------------------------------------------------------------------

_EXIT_WITH_PENDING = """
def work(i):
    time.sleep(0.2)
    open(os.path.join(os.environ["OUT_DIR"], f"done-{i}"), "w").close()
    return i

executor = futurepool.Executor(max_workers=2)
futures = [executor.submit(work, i) for i in range(6)]
futures[0].result(timeout=30)
report_pool()
{ending}
# Falls off the end with futures pending.
"""


@pytest.mark.parametrize(
    "ending",
    ["", "executor.shutdown(wait=False)"],
    ids=["no-shutdown", "shutdown-wait-false"],
)
def test_interpreter_exit_with_pending_futures_completes_them(tmp_path, ending):
    since = time.time()
    dirs_before = _run_entries()
    done = _run(_EXIT_WITH_PENDING.replace("{ending}", ending), env={"OUT_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    # As with the stdlib, exit waits for the work that was submitted.
    assert sorted(os.listdir(tmp_path)) == [f"done-{i}" for i in range(6)]
    report = json.loads(done.stdout.splitlines()[0])
    assert len(report["pool"]) == 3, report
    assert_gone(_recorded(report["pool"]))
    assert_run_dirs_removed(dirs_before)
    assert_no_futurepool_processes(since)


def test_shutdown_cancel_futures_without_wait_then_interpreter_exit(tmp_path):
    since = time.time()
    dirs_before = _run_entries()
    ending = "executor.shutdown(wait=False, cancel_futures=True)"
    code = _EXIT_WITH_PENDING.replace("{ending}", ending).replace("range(6)", "range(20)")
    started = time.monotonic()
    done = _run(code, env={"OUT_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    ran = len(os.listdir(tmp_path))
    assert 1 <= ran < 20, "cancel_futures=True still ran every queued task"
    assert time.monotonic() - started < 10
    assert_gone(_recorded(json.loads(done.stdout.splitlines()[0])["pool"]))
    assert_run_dirs_removed(dirs_before)
    assert_no_futurepool_processes(since)


# --- the driver dies ----------------------------------------------------------------------

_BUSY_DRIVER = """
executor = futurepool.Executor(max_workers=2)
executor.submit(os.getpid).result(timeout=30)
futures = [executor.submit(time.sleep, 30) for _ in range(3)]
while not futures[0].running():
    time.sleep(0.01)
report_pool()
for future in futures:
    future.result()
"""


def test_driver_killed_mid_task_takes_its_pool_along(tmp_path):
    since = time.time()
    dirs_before = _run_entries()
    with Driver(DRIVER_PRELUDE + _BUSY_DRIVER, tmp_path) as driver:
        report = driver.read_json("pool")
        procs = _recorded(report["pool"])
        assert len(procs) == 3, report
        assert len(_run_entries() - dirs_before) == 1
        driver.proc.send_signal(signal.SIGKILL)
        assert driver.wait(TIMEOUT) == -signal.SIGKILL
        # The node sees its command pipe close, kills its workers and exits
        # (FAULTS.md 27); nobody is left to wait for the sleeping tasks.
        assert_gone(procs)
        # The driver could not remove its run directory; the node does.
        assert_run_dirs_removed(dirs_before)
        assert_no_futurepool_processes(since)
        assert "Traceback" not in driver.stderr, driver.stderr


# --- Ctrl-C ---------------------------------------------------------------------------

_CTRL_C_IN_WITH = """
futures = []
try:
    with futurepool.Executor(max_workers=1) as executor:
        executor.submit(os.getpid).result(timeout=30)
        futures += [executor.submit(time.sleep, 30) for _ in range(4)]
        while not futures[0].running():
            time.sleep(0.01)
        report_pool()
        futures[0].result()
finally:
    print(json.dumps({"states": [
        ("cancelled" if f.cancelled() else type(f.exception(timeout=0)).__name__)
        if f.done() else "pending" for f in futures]}), flush=True)
"""

_CTRL_C_AT_TOP_LEVEL = """
executor = futurepool.Executor(max_workers=1)
executor.submit(os.getpid).result(timeout=30)
futures = [executor.submit(time.sleep, 30) for _ in range(4)]
while not futures[0].running():
    time.sleep(0.01)
report_pool()
futures[0].result()  # Ctrl-C here is not handled: it ends the interpreter
"""


@pytest.mark.parametrize("code", [_CTRL_C_IN_WITH, _CTRL_C_AT_TOP_LEVEL],
                         ids=["in-with-block", "unhandled-at-top-level"])
def test_ctrl_c_stops_the_pool_at_once(tmp_path, code):
    since = time.time()
    dirs_before = _run_entries()
    with Driver(DRIVER_PRELUDE + code, tmp_path) as driver:
        report = driver.read_json("pool")
        procs = _recorded(report["pool"])
        assert len(procs) == 2, report
        pressed = time.monotonic()
        os.killpg(driver.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        code_ = driver.wait(CTRL_C_TIMEOUT + 5)
        took = time.monotonic() - pressed
        stderr = driver.stderr
        assert code_ is not None, f"the driver was still running 10 s after Ctrl-C:\n{stderr}"
        # Unlike the stdlib, the running sleep(30) is not waited for (FAULTS.md 44).
        assert took < CTRL_C_TIMEOUT, f"exit took {took:.1f} s"
        # KeyboardInterrupt reaches the main thread once; workers print nothing.
        assert code_ == -signal.SIGINT, stderr
        assert stderr.count("Traceback (most recent call last)") == 1, stderr
        assert stderr.rstrip().endswith("KeyboardInterrupt"), stderr
        assert [line for line in stderr.splitlines() if "KeyboardInterrupt" in line] == [
            "KeyboardInterrupt"], stderr
        if code is _CTRL_C_IN_WITH:
            states = driver.read_json("states", timeout=1)["states"]
            # The running task's worker was stopped; what waited was cancelled.
            assert states[0] == "WorkerCrashedError", states
            assert states[-1] == "cancelled", states
            assert set(states) <= {"WorkerCrashedError", "cancelled"}, states
        assert_gone(procs)
        assert_run_dirs_removed(dirs_before)
        assert_no_futurepool_processes(since)
