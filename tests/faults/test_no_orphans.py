"""Nothing a task starts outlives its worker (issue 11, point 5; FAULTS.md 27).

A task may start processes of its own: a ``subprocess``, a stdlib
``ProcessPoolExecutor``, a daemon that double-forks away into a session of
its own. When the worker that ran it exits (recycled by
``max_tasks_per_child``, killed, crashed) its node ends what it left; when
the executor ends (shutdown, the driver's death), the node ends everything
below it. A process orphaned below a worker that is still alive is that
worker's, and stays. ``core/node.py`` explains the rule ("who owns the
processes a task starts"); these scenarios check it with real processes.

Tasks report the pids of what they started; the test turns them into
``psutil.Process`` objects (which know their start time, so a recycled pid
is never mistaken for the process) and waits, with a deadline, until each is
gone. A zombie counts as gone: it no longer runs, and whoever adopted it
reaps it. The autouse leak checks (tests/conftest.py) then look again, more
broadly. Linux only: elsewhere the node cannot adopt orphans.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest

import futurepool
from futurepool.core.node import ORPHAN_GRACE
from futurepool.testing import DRIVER_TAG, descendants, kill_processes, tagged_processes, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="child subreapers (PR_SET_CHILD_SUBREAPER) are Linux only")

#: Seconds any single result may take.
TIMEOUT = 30.0
#: Seconds what a dead worker left gets to disappear: the node's SIGTERM grace
#: for processes that ignore SIGTERM, plus slack for a loaded machine.
GONE_TIMEOUT = ORPHAN_GRACE + 9.0

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(futurepool.__file__)))

# Objects a task must keep alive after it returns (in the worker): a Popen or a
# pool dropped while its processes run would warn, or stop them itself.
_kept: list = []


# --- tasks (workers import this module by name) -----------------------------------------


def start_sleep(seconds: float) -> tuple[int, int]:
    """Start ``sleep`` as a child of this worker; (worker pid, sleep pid)."""
    proc = subprocess.Popen(["sleep", str(seconds)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kept.append(proc)
    return os.getpid(), proc.pid


def start_daemon(seconds: float) -> tuple[int, int]:
    """Start ``sleep`` the way a daemon starts: a shell in a new session puts it in
    the background and exits, so nothing that this task started is its parent any
    more. (worker pid, sleep pid)."""
    done = subprocess.run(
        ["sh", "-c", f"sleep {seconds} </dev/null >/dev/null 2>&1 & echo $!"],
        start_new_session=True, capture_output=True, text=True, timeout=TIMEOUT, check=True)
    return os.getpid(), int(done.stdout)


def start_stdlib_pool(workers: int) -> tuple[int, list[int]]:
    """Start a stdlib ProcessPoolExecutor and leave it running, idle, as the issue's
    task did; (worker pid, pids of every process below this worker).

    Spawn, not fork: a worker has threads, and from 3.12 on a fork there warns
    (an error under this suite's warning filters, which forked workers inherit).
    """
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    _kept.append(pool)
    # The stdlib starts workers on demand: one per task submitted while none is idle.
    list(pool.map(time.sleep, [0.3] * workers, timeout=TIMEOUT))
    below = [proc.pid for proc in psutil.Process().children(recursive=True)]
    return os.getpid(), below


def start_nested_executor(workers: int) -> tuple[int, list[int]]:
    """Start a futurepool executor of its own and leave it running, idle;
    (worker pid, pids of every process below this worker). Spawn, for the reason
    :func:`start_stdlib_pool` gives."""
    executor = futurepool.Executor(workers, mp_context=multiprocessing.get_context("spawn"))
    _kept.append(executor)
    list(executor.map(time.sleep, [0.3] * workers, timeout=TIMEOUT))
    below = [proc.pid for proc in psutil.Process().children(recursive=True)]
    return os.getpid(), below


def start_terminable_children(directory: str) -> tuple[int, list[int]]:
    """Start two Python children: one cleans up on SIGTERM (it writes ``terminated``),
    one ignores SIGTERM. Returns once both have set their handlers; (worker pid, pids)."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        directory, mode = sys.argv[1:3]
        def clean_up(*_):
            open(os.path.join(directory, "terminated"), "w").close()
            sys.exit(0)
        signal.signal(signal.SIGTERM, clean_up if mode == "handle" else signal.SIG_IGN)
        open(os.path.join(directory, mode), "w").close()
        time.sleep(60)
    """)
    pids = []
    for mode in ("handle", "ignore"):
        proc = subprocess.Popen([sys.executable, "-c", code, directory, mode],
                                stdin=subprocess.DEVNULL)
        _kept.append(proc)
        pids.append(proc.pid)
    ready = lambda: all(os.path.exists(os.path.join(directory, m)) for m in ("handle", "ignore"))
    if not wait_until(ready, TIMEOUT):
        raise TimeoutError("the children did not set their SIGTERM handlers in time")
    return os.getpid(), pids


# --- helpers ------------------------------------------------------------------------------


def _processes(pids) -> list[psutil.Process]:
    """psutil handles for ``pids``; one already gone is left out (it is gone)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return procs


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _describe(procs) -> str:
    lines = []
    for proc in procs:
        try:
            lines.append(f"pid {proc.pid} (parent {proc.ppid()}, {proc.status()}):"
                         f" {' '.join(proc.cmdline())}")
        except psutil.Error:
            lines.append(f"pid {proc.pid} (gone meanwhile)")
    return "\n".join(lines)


def assert_gone(procs, timeout: float = GONE_TIMEOUT) -> None:
    procs = list(procs)
    if not wait_until(lambda: all(_gone(p) for p in procs), timeout, interval=0.05):
        left = [p for p in procs if not _gone(p)]
        pytest.fail(f"{len(left)} process(es) still there {timeout:g} s later:\n{_describe(left)}")


def assert_running(procs) -> None:
    left = [p for p in procs if _gone(p)]
    assert not left, f"gone too early: {[p.pid for p in left]}"


def _shutdown(executor: futurepool.Executor) -> None:
    executor.shutdown(wait=True, cancel_futures=True)


# --- a worker exits: what it left goes ------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_recycled_workers_subprocess_is_killed(method):
    """max_tasks_per_child=1: the worker leaves after its task; the ``sleep`` it
    started must not stay behind (under either way the node starts)."""
    executor = futurepool.Executor(max_workers=1, max_tasks_per_child=1,
                                   mp_context=multiprocessing.get_context(method))
    try:
        worker_pid, sleep_pid = executor.submit(start_sleep, 60).result(timeout=TIMEOUT)
        assert_gone(_processes([worker_pid, sleep_pid]))
        # The node took the sleep's exit for no worker's: the pool goes on as before.
        assert executor.submit(os.getpid).result(timeout=TIMEOUT) != worker_pid
        assert len(executor._processes) == 1
    finally:
        _shutdown(executor)


def test_a_killed_workers_stdlib_pool_is_killed():
    """The issue's case, by SIGKILL: a task started a stdlib pool and returned; its
    worker is killed; the pool's workers (and its resource tracker, if the task's
    first use of multiprocessing started one) go too, and the node replaces only
    the futurepool worker."""
    executor = futurepool.Executor(max_workers=1)
    try:
        worker_pid, below = executor.submit(start_stdlib_pool, 2).result(timeout=TIMEOUT)
        procs = _processes(below)
        assert len(procs) >= 2, below
        os.kill(worker_pid, signal.SIGKILL)
        assert_gone(procs + _processes([worker_pid]))
        replaced = lambda: len(executor._processes) == 1 and worker_pid not in executor._processes
        assert wait_until(replaced, TIMEOUT), "the killed worker was not replaced"
        assert executor.submit(os.getpid).result(timeout=TIMEOUT) != worker_pid
    finally:
        _shutdown(executor)


def test_a_killed_workers_nested_executor_is_killed():
    """A task started a futurepool executor and returned; its worker is killed. The
    nested node and its workers go, and (the leak checks see to it) so do the
    nested executor's run directory and shared-memory segments. The nested node
    would also leave by itself (its driver's command pipe closed); the node's
    SIGTERM must not cut its clean-up short."""
    executor = futurepool.Executor(max_workers=1)
    try:
        worker_pid, below = executor.submit(start_nested_executor, 2).result(timeout=TIMEOUT)
        procs = _processes(below)
        assert len(procs) >= 3, below  # the nested node and its two workers
        os.kill(worker_pid, signal.SIGKILL)
        assert_gone(procs + _processes([worker_pid]))
        assert executor.submit(os.getpid).result(timeout=TIMEOUT) != worker_pid
    finally:
        _shutdown(executor)


def test_sigterm_comes_first_and_sigkill_after_the_grace(tmp_path):
    """What a dead worker left gets SIGTERM, so that it can clean up; what ignores
    SIGTERM is killed ORPHAN_GRACE seconds later all the same."""
    executor = futurepool.Executor(max_workers=1, max_tasks_per_child=1)
    try:
        worker_pid, pids = executor.submit(start_terminable_children,
                                           str(tmp_path)).result(timeout=TIMEOUT)
        # The worker has left by now, and the node may have ended them already.
        assert_gone(_processes(pids + [worker_pid]))
        assert (tmp_path / "terminated").exists(), "the child's SIGTERM handler did not run"
    finally:
        _shutdown(executor)


def test_an_orphan_below_a_live_worker_stays_until_shutdown():
    """A daemon a task started belongs to that task's worker while it lives, even
    in a session of its own and with its launcher gone: another worker's death
    does not take it. Shutdown does."""
    executor = futurepool.Executor(max_workers=2)
    try:
        worker_pid, sleep_pid = executor.submit(start_daemon, 60).result(timeout=TIMEOUT)
        (sleep,) = _processes([sleep_pid])
        # Its launcher exited: the worker, a child subreaper, adopted it.
        assert sleep.ppid() == worker_pid
        assert os.getsid(sleep.pid) != os.getsid(worker_pid)
        assert wait_until(lambda: len(executor._processes) == 2, TIMEOUT)
        (other,) = [pid for pid in executor._processes if pid != worker_pid]
        os.kill(other, signal.SIGKILL)
        assert_gone(_processes([other]))
        assert wait_until(lambda: other not in executor._processes
                          and len(executor._processes) == 2, TIMEOUT)
        # Long enough for the node to have signalled it if it took it for an orphan:
        # a pass of its loop follows the other worker's exit at once.
        time.sleep(ORPHAN_GRACE + 0.5)
        assert_running([sleep])
        assert sleep.ppid() == worker_pid
    finally:
        _shutdown(executor)
    # shutdown(wait=True) returns once the node has left, and it leaves last.
    assert_gone([sleep], timeout=1.0)


# --- the driver dies: everything goes ----------------------------------------------------------

_SIGTERMED_DRIVER = """
import concurrent.futures as cf
import json, os, time
import psutil
import futurepool

def start_stdlib_pool(path):
    # The default start method, as in the issue (fork before 3.14).
    pool = cf.ProcessPoolExecutor(2)
    list(pool.map(time.sleep, [0.3, 0.3], timeout=30))
    me = psutil.Process()
    below = [p.pid for p in me.children(recursive=True)]
    with open(path + ".tmp", "w") as f:
        json.dump({"node": me.ppid(), "worker": me.pid, "below": below}, f)
    os.rename(path + ".tmp", path)
    time.sleep(60)

executor = futurepool.Executor(max_workers=1)
executor.submit(start_stdlib_pool, os.environ["PIDS_PATH"]).result(timeout=60)
"""


def test_sigterm_to_the_driver_leaves_no_process(tmp_path):
    """The issue's case as seen: a task started a stdlib pool and the driver got
    SIGTERM. The node sees end of file on its command pipe, kills its worker, then
    what that worker left; nothing started on the driver's behalf remains."""
    path = str(tmp_path / "pids.json")
    tag = uuid.uuid4().hex
    env = {**os.environ, DRIVER_TAG: tag, "PIDS_PATH": path,
           "PYTHONPATH": os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")]))}
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        driver = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-c", _SIGTERMED_DRIVER],
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
            start_new_session=True)  # signals from the test run never reach it
    try:
        found = wait_until(lambda: os.path.exists(path) or driver.poll() is not None, TIMEOUT)
        assert found and os.path.exists(path), (tmp_path / "err").read_text()
        with open(path) as f:
            report = json.load(f)
        procs = _processes([report["node"], report["worker"], *report["below"]])
        assert len(procs) >= 4, report
        assert_running(procs)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(TIMEOUT) == -signal.SIGTERM
        assert_gone(procs)
        left = wait_until(lambda: not tagged_processes(DRIVER_TAG, tag), GONE_TIMEOUT)
        assert left, _describe(tagged_processes(DRIVER_TAG, tag))
    finally:
        try:
            mine = {psutil.Process(driver.pid), *descendants(psutil.Process(driver.pid))}
        except psutil.NoSuchProcess:
            mine = set()
        kill_processes(mine | set(tagged_processes(DRIVER_TAG, tag)))
        driver.wait(TIMEOUT)
