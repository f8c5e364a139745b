"""Starting, watching and ending processes; naming how they ended."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import subprocess
import sys

#: Exit code of a worker whose initializer failed: the node does not respawn it.
EXIT_INITIALIZER_FAILED = 77

#: Each worker shares a 12-byte slot with its node (an anonymous shared mmap
#: made before the fork) holding ``(task_id, attempt)`` of what it is running,
#: 0 when idle. When a worker dies the node reads it, so the owner fails
#: exactly the task that was running and re-queues the ones the worker had
#: not started, at the cost of one memory write per task.
RUNNING_SLOT = struct.Struct("<QI")
#: ``task_id`` while the pool's initializer runs.
INITIALIZING = (1 << 64) - 1

_PR_SET_PDEATHSIG = 1
_libc = None


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies.

    Used by workers (forked by the single-threaded node, so the "parent
    thread" caveat of PR_SET_PDEATHSIG does not bite). Elsewhere a no-op.
    """
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        # The process's own symbols (libc is loaded): find_library would run ldconfig.
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


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


def start_node(cmd_fd: int, event_fd: int, inherited_fds: tuple[int, ...]) -> subprocess.Popen:
    """Start this host's node process, talking to us over two pipes.

    ``cmd_fd`` (its read end) and ``event_fd`` (its write end) are passed by
    number; ``inherited_fds`` are descriptors that pickled initargs refer to
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
        [sys.executable, "-S", "-c", boot, str(cmd_fd), str(event_fd)],
        stdin=subprocess.DEVNULL, pass_fds=(cmd_fd, event_fd, *inherited_fds),
        start_new_session=True,
    )
