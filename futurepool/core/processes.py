"""Starting, watching and ending processes; naming how they ended."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import subprocess
import sys
import threading

#: Exit code of a worker whose initializer failed: the node does not respawn it.
EXIT_INITIALIZER_FAILED = 77
#: Exit code of a worker that could not import the main script (spawn semantics).
EXIT_START_FAILED = 78

#: Each worker shares a 24-byte slot with its node (an anonymous shared mmap
#: made before the fork) holding ``(task_id, attempt, interrupt, kill_at)`` of
#: what it is running, 0 when idle. When a worker dies the node reads it, so
#: the owner fails exactly the task that was running and re-queues the ones
#: the worker had not started, at the cost of one memory write per task.
#: ``interrupt`` says why the task was being interrupted when the worker died
#: (a worker kills itself when an interrupted task does not end: core.worker),
#: so that the owner fails it with the right error rather than as a crash.
#: ``kill_at`` (``time.monotonic()``, system-wide on Linux; 0.0: none) is when
#: a task with a timeout must be gone: the node kills a worker still running
#: it then, in case C code holding the GIL keeps the worker's own watchdog out.
RUNNING_SLOT = struct.Struct("<QIId")
#: Where ``interrupt`` and ``kill_at`` sit in the slot, to write them alone.
SLOT_INTERRUPT = struct.Struct("<I")
SLOT_INTERRUPT_OFFSET = 12
SLOT_KILL_AT = struct.Struct("<d")
SLOT_KILL_AT_OFFSET = 16
INTERRUPT_NONE = 0
INTERRUPT_TIMEOUT = 1
INTERRUPT_STOP = 2
INTERRUPT_MEMORY = 3
#: After the running slot, ``(memory_limit, peak)`` in bytes (0: no limit): the
#: worker writes the limit of a task that has one when it starts it (and 0 when
#: it ends), so the node can watch the worker's memory too; whoever kills the
#: worker past its limit writes the peak it saw, and marks ``INTERRUPT_MEMORY``.
MEMORY_SLOT = struct.Struct("<QQ")
MEMORY_SLOT_OFFSET = RUNNING_SLOT.size
#: The size of the shared mmap per worker.
SLOT_SIZE = RUNNING_SLOT.size + MEMORY_SLOT.size
#: What a worker sends its node when it starts a task with a memory limit, so
#: that the node starts watching at once rather than at its next heartbeat.
MEMORY_WATCH_SIGNAL = signal.SIGUSR1
#: ``task_id`` while the pool's initializer runs.
INITIALIZING = (1 << 64) - 1

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = None


_PR_SET_NAME = 15
#: What ``ps -o comm``, ``top`` and ``psutil.Process.name()`` show for our processes
#: (a node forked from the driver keeps the driver's command line).
NODE_PROCESS_NAME = "futurepool-node"
WORKER_PROCESS_NAME = "futurepool-wrk"


def _prctl(option: int, arg) -> int:
    """``prctl(2)``: 0 on success, -1 on failure or off Linux."""
    global _libc
    if not sys.platform.startswith("linux"):
        return -1
    if _libc is None:
        # The process's own symbols (libc is loaded): find_library would run ldconfig.
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.prctl(option, arg, 0, 0, 0)


def set_process_name(name: str) -> None:
    """Set this process's short name (15 bytes at most; Linux only)."""
    _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies.

    Used by workers (forked by the single-threaded node, so the "parent
    thread" caveat of PR_SET_PDEATHSIG does not bite). Elsewhere a no-op.
    """
    _prctl(_PR_SET_PDEATHSIG, int(sig))


def set_child_subreaper() -> bool:
    """Make this process the reaper of orphans below it; whether that took effect.

    A process whose parent dies is re-parented to its nearest living
    ancestor marked so (else to init): with the mark, what our children
    leave behind when they die stays below us, where we can wait for it and
    kill it. Not inherited across ``fork``, kept across ``exec``. Linux 3.4
    and later (PR_SET_CHILD_SUBREAPER); elsewhere a no-op that returns False.
    """
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1) == 0


def child_pids() -> set[int]:
    """Pids of this process's children, exited but unreaped ones included (Linux).

    One small file per thread of ours (``/proc/self/task/*/children``), which
    is cheap enough to read on every pass of a supervision loop; where the
    kernel lacks it (CONFIG_PROC_CHILDREN unset), psutil scans ``/proc``.
    The kernel may skip a child that exits while the file is read; callers
    read it again on their next pass.
    """
    pids: set[int] = set()
    try:
        tids = os.listdir("/proc/self/task")
    except FileNotFoundError:
        tids = None
    for tid in tids or ():
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                pids.update(int(pid) for pid in f.read().split())
        except FileNotFoundError:
            if os.path.isdir(f"/proc/self/task/{tid}"):
                tids = None  # the thread is there, the file is not: no such file here
                break
            # else the thread ended meanwhile; its children moved to another thread
            # of ours, and the caller's next pass sees them there
    if tids is None:
        import psutil  # only here: it costs milliseconds to import

        return {proc.pid for proc in psutil.Process().children()}
    return pids


def describe_status(status: int) -> tuple[int | None, str | None]:
    """``os.waitpid`` status -> ``(exitcode, signal_name)``; exactly one is set."""
    if os.WIFSIGNALED(status):
        return None, signal_name(os.WTERMSIG(status))
    return os.waitstatus_to_exitcode(status), None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def start_node(cmd_fd: int, event_fd: int, tracker_fd: int,
               inherited_fds: tuple[int, ...]) -> subprocess.Popen:
    """Start this host's node as a fresh interpreter (spawn semantics).

    ``cmd_fd`` (its read end) and ``event_fd`` (its write end) are passed by
    number, and so is ``tracker_fd``, the driver's ``multiprocessing``
    resource tracker (-1: none), which workers share as spawned children
    do; ``inherited_fds`` are descriptors that pickled initargs refer to
    (see ``serialize.dumps_for_spawn``). Its stdout and stderr are ours, so
    what tasks print shows where the caller's output goes.

    The interpreter runs with ``-S``: the node is given the driver's complete
    ``sys.path`` on its command line instead, which saves the ``site`` start-up (tens of ms with
    some ``.pth`` files) on every pool start. It runs in its own session so a
    terminal's Ctrl-C reaches only the driver, which decides what stops.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = [package_root] + [p for p in sys.path if p != package_root]
    boot = f"import sys; sys.path[:] = {path!r}; from futurepool.core.node import main; main()"
    return subprocess.Popen(
        [sys.executable, "-S", "-c", boot, str(cmd_fd), str(event_fd), str(tracker_fd)],
        stdin=subprocess.DEVNULL, pass_fds=(cmd_fd, event_fd, *inherited_fds),
        start_new_session=True,
    )


class WorkerProcess:
    """One worker process, shaped like the ``multiprocessing.Process`` objects the
    stdlib keeps in ``ProcessPoolExecutor._processes`` and ``Pool._pool``.

    The worker is the node's child, not ours: its exit is learnt from the
    node's report (the owner's I/O thread calls :meth:`_exited`), and signals
    go through psutil, which checks the process's start time so that a pid
    recycled after the exit report is never signalled.
    """

    def __init__(self, worker_id: int, pid: int, name: str):
        self.worker_id = worker_id
        self.pid = pid
        self.name = name
        self.daemon = False
        self.exitcode: int | None = None
        self._done = threading.Event()

    @property
    def ident(self) -> int:
        return self.pid

    @property
    def sentinel(self):
        raise ValueError("a futurepool worker has no sentinel; use join(timeout)")

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def close(self) -> None:
        if self.is_alive():
            raise ValueError("Cannot close a process while it is still running. You should"
                             " first call join() or terminate().")

    def _signal(self, sig: int) -> None:
        import psutil  # only here: it costs milliseconds to import

        if self._done.is_set():
            return
        try:
            psutil.Process(self.pid).send_signal(sig)
        except psutil.Error:  # gone
            pass

    def _exited(self, exitcode: int | None, signal_name: str | None) -> None:
        """Called by the owner when the node reports the exit (or the node is gone)."""
        if signal_name is not None:
            signum = getattr(signal, signal_name, None)
            self.exitcode = -int(signum) if signum is not None else -1
        else:
            self.exitcode = exitcode
        self._done.set()

    def __repr__(self) -> str:
        state = "started" if self.is_alive() else f"stopped exitcode={self.exitcode}"
        return f"<WorkerProcess name={self.name!r} pid={self.pid} {state}>"
