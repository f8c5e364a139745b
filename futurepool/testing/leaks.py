"""Leak checks: processes, threads, and files (run directories, shared memory).

Every check works the same way: take a snapshot before the code under test
runs, then afterwards wait up to a deadline for everything that appeared in
between to go away, polling rather than sleeping a fixed time. If something
is still there at the deadline, the check cleans it up (kills the processes,
removes the files) so that the next test starts clean, and raises
``AssertionError`` naming each leftover. Threads cannot be killed; they are
only reported, with the line each one is stuck at.

The patterns follow Dask (``check_process_leak``, ``check_thread_leak``),
CPython (``support.reap_children``, ``threading_setup``) and loky (psutil
checks of the children after each test).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable

import psutil

__all__ = [
    "SHM_DIR",
    "assert_no_leaked_files",
    "assert_no_leaked_processes",
    "assert_no_leaked_threads",
    "descendants",
    "kill_processes",
    "list_entries",
    "tagged_processes",
    "wait_until",
]

#: Where POSIX shared memory segments appear as files (Linux).
SHM_DIR = "/dev/shm"


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    """Call ``predicate`` every ``interval`` seconds until it returns true.

    Args:
        predicate: called without arguments; any truthy result ends the wait.
        timeout: seconds to keep trying. The predicate is called at least
            once, and once more when the deadline has passed.
        interval: seconds between calls.

    Returns:
        ``True`` if the predicate became true in time, else ``False``.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval, remaining))


def _count(items: list, singular: str, plural: str) -> tuple[str, str]:
    """``('1 thread', 'was')``, ``('2 threads', 'were')``."""
    if len(items) == 1:
        return f"1 {singular}", "was"
    return f"{len(items)} {plural}", "were"


# --- processes -----------------------------------------------------------------


def descendants(root: psutil.Process | None = None) -> list[psutil.Process]:
    """Children of ``root`` (default: this process), recursively, zombies included."""
    root = root if root is not None else psutil.Process()
    try:
        return root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tagged_processes(name: str, value: str) -> list[psutil.Process]:
    """Processes other than this one that were started with ``name=value`` in their environment.

    This finds what left the process tree: a node whose parent (a driver run
    in a subprocess) was killed is re-parented to init, but still carries the
    environment it was started with. Processes whose environment cannot be
    read (other users', zombies) are skipped.
    """
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(name) == value:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def kill_processes(procs: Iterable[psutil.Process], timeout: float = 5.0) -> None:
    """SIGKILL ``procs`` and wait up to ``timeout`` seconds for them to exit.

    All of them are stopped (SIGSTOP) first, so that a supervisor among them
    cannot restart a worker that was just killed. Those that are children of
    this process are reaped.
    """
    procs = list(procs)
    for action in (psutil.Process.suspend, psutil.Process.kill):
        for proc in procs:
            try:
                action(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    # wait_procs reaps our own children; for the others it polls until they
    # are gone or only a zombie that another parent must reap.
    psutil.wait_procs(procs, timeout=timeout)


def _multiprocessing_helpers() -> set[int]:
    """Pids of the stdlib's per-interpreter helper processes.

    multiprocessing starts its resource tracker and forkserver on first use and
    keeps them until the interpreter exits, by design; they are not leaks of
    the test that happened to start them. Their workers still are.
    """
    from multiprocessing import forkserver, resource_tracker

    pids = {
        getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None),
        getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None),
    }
    pids.discard(None)
    return pids


def _lingering(procs: Iterable[psutil.Process], family: set[psutil.Process]) -> set[psutil.Process]:
    """Those of ``procs`` still running, or dead but not reaped by a process of ours.

    A zombie whose parent is outside ``family`` (re-parented to init) is
    somebody else's to reap and no longer counts.
    """
    alive = set()
    for proc in procs:
        try:
            if not proc.is_running():
                continue
            if proc.status() == psutil.STATUS_ZOMBIE and proc not in family:
                continue
        except psutil.NoSuchProcess:
            continue
        alive.add(proc)
    return alive


def _describe_process(proc: psutil.Process) -> str:
    try:
        with proc.oneshot():
            ppid, status, name = proc.ppid(), proc.status(), proc.name()
            if status == psutil.STATUS_ZOMBIE:
                return f"pid {proc.pid} (parent {ppid}, zombie, never reaped): [{name}]"
            cmdline = " ".join(proc.cmdline()) or f"[{name}]"
    except psutil.NoSuchProcess:
        return f"pid {proc.pid} (exited meanwhile)"
    except psutil.AccessDenied:
        return f"pid {proc.pid} (access denied)"
    return f"pid {proc.pid} (parent {ppid}, {status}): {cmdline}"


def assert_no_leaked_processes(
    before: Iterable[psutil.Process],
    timeout: float = 10.0,
    *,
    env_tag: tuple[str, str] | None = None,
) -> None:
    """Wait until every process started since ``before`` has exited and been reaped.

    Args:
        before: the processes that may stay, e.g. ``descendants()`` taken
            before the test (plus ``tagged_processes(*env_tag)``).
        timeout: seconds to wait for the others to exit.
        env_tag: ``(name, value)``; when given, processes started with that
            environment variable are checked too, even outside this
            process's tree (see :func:`tagged_processes`).

    Raises:
        AssertionError: listing pid, parent, state and command line of each
            process still there at the deadline; they are killed first.
    """
    me = psutil.Process()
    before = set(before)
    tracked: set[psutil.Process] = set()

    def settled() -> bool:
        nonlocal tracked
        family = set(descendants(me))
        candidates = (family | set(tagged_processes(*env_tag))) if env_tag else family
        helpers = _multiprocessing_helpers()
        # A process stays tracked once seen, even if it then leaves our tree.
        tracked |= {p for p in candidates - before if p.pid not in helpers}
        tracked = _lingering(tracked, family | {me})
        return not tracked

    if wait_until(settled, timeout, interval=0.05):
        return
    leaked = sorted(tracked, key=lambda p: p.pid)
    report = "\n".join("  " + _describe_process(p) for p in leaked)
    kill_processes(leaked)
    what, verb = _count(leaked, "process", "processes")
    raise AssertionError(
        f"{what} started during the test {verb} still there {timeout:g} s after it "
        f"(now killed):\n{report}"
    )


# --- threads -------------------------------------------------------------------


def _describe_thread(thread: threading.Thread, frames: dict) -> str:
    frame = frames.get(thread.ident)
    where = ""
    if frame is not None:
        last = traceback.extract_stack(frame)[-1]
        where = f", at {last.filename}:{last.lineno} in {last.name}"
    return f"{thread.name!r} (daemon={thread.daemon}{where})"


def assert_no_leaked_threads(before: Iterable[threading.Thread], timeout: float = 10.0) -> None:
    """Wait until every thread started since ``before`` has ended.

    Threads that foreign (C) threads created by calling into Python
    (``threading._DummyThread``) are ignored: they are never removed.

    Raises:
        AssertionError: naming each thread still alive at the deadline and the
            line it is at.
    """
    before = set(before)

    def extra() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t not in before and not isinstance(t, threading._DummyThread)
        ]

    if wait_until(lambda: not extra(), timeout):
        return
    frames = sys._current_frames()
    leaked = extra()
    report = "\n".join("  " + _describe_thread(t, frames) for t in leaked)
    what, verb = _count(leaked, "thread", "threads")
    raise AssertionError(
        f"{what} started during the test {verb} still alive {timeout:g} s after it:\n{report}"
    )


# --- files (run directories, /dev/shm) ----------------------------------------


def list_entries(directory: str, prefix: str = "") -> set[str]:
    """Names in ``directory`` starting with ``prefix``; empty if it does not exist."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return set()
    return {name for name in names if name.startswith(prefix)}


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def assert_no_leaked_files(
    directory: str,
    before: Iterable[str],
    timeout: float = 10.0,
    *,
    prefix: str = "",
) -> None:
    """Wait until every entry created in ``directory`` since ``before`` is gone.

    Works for run directories and for ``/dev/shm``, where each segment is a
    file (``prefix`` then selects one session's segments).

    Args:
        directory: the directory to watch.
        before: names (from :func:`list_entries`) that may stay.
        timeout: seconds to wait for the others to disappear.
        prefix: only names starting with it are considered.

    Raises:
        AssertionError: listing the leftovers (directories end in ``/``); they
            are removed first.
    """
    before = set(before)

    def extra() -> set[str]:
        return list_entries(directory, prefix) - before

    if wait_until(lambda: not extra(), timeout):
        return
    leaked = sorted(extra())
    paths = [os.path.join(directory, name) for name in leaked]
    shown = [name + "/" if os.path.isdir(path) else name for name, path in zip(leaked, paths)]
    for path in paths:
        _remove(path)
    what, verb = _count(leaked, "entry", "entries")
    raise AssertionError(
        f"{what} created in {directory} during the test {verb} still there "
        f"{timeout:g} s after it (now removed): " + ", ".join(shown)
    )
