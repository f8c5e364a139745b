"""The link to this host's node: two pipes and a process the driver started.

The owner reaches every node through a link; this is the local one. It
starts the node the way the executor's start method asks (``core.startup``):

* fork semantics: ``os.fork()`` of the driver, in the calling thread, before
  futurepool has started a thread of its own for this executor; the child
  runs :func:`core.node.serve_forked` and never returns to the caller's code;
* spawn semantics: a fresh interpreter (:func:`processes.start_node`).

Either way the node then waits for ``NODE_CONFIG`` (sent once the owner's
socket is bound, so workers never dial an address that is not there yet),
and talks over the same two pipes: commands in, events out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback

from ..errors import ProtocolError
from ..protocol.framing import PipeReader, pack_header, write_pipe_message
from ..protocol.messages import MessageType
from ..store import serialize
from . import node as _node
from .processes import start_node
from .startup import FORK


class _ForkedProcess:
    """The ``subprocess.Popen`` surface the owner uses, for a node forked from us."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        if timeout is None:
            if self.returncode is None:
                _pid, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"node {self.pid}", timeout)
            time.sleep(0.005)
        return self.returncode

    def kill(self):
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class LocalNode:
    """This host's node process and the pipes to it."""

    def __init__(self, semantics: str, inherited_fds: tuple[int, ...] = (),
                 inherited: dict | None = None):
        self.semantics = semantics
        self.inherited_fds = inherited_fds  # spawn: fds that pickled initargs refer to
        self.inherited = inherited          # fork: initializer and initargs, in memory
        self.process = None
        self.cmd_fd = -1
        self.events: PipeReader | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def event_fd(self) -> int:
        return self.events.fd if self.events is not None else -1

    def start(self, tracker_fd: int = -1) -> None:
        cmd_r, cmd_w = os.pipe()
        ev_r, ev_w = os.pipe()
        try:
            if self.semantics == FORK:
                self.process = _ForkedProcess(self._fork(cmd_r, cmd_w, ev_r, ev_w))
            else:
                fds = self.inherited_fds + ((tracker_fd,) if tracker_fd >= 0 else ())
                self.process = start_node(cmd_r, ev_w, tracker_fd, fds)
        except BaseException:
            for fd in (cmd_w, ev_r):
                os.close(fd)
            raise
        finally:
            os.close(cmd_r)
            os.close(ev_w)
        self.cmd_fd = cmd_w
        os.set_blocking(ev_r, False)
        self.events = PipeReader(ev_r)

    def _fork(self, cmd_r, cmd_w, ev_r, ev_w) -> int:
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:  # the node: never back into the caller's code
            os.close(cmd_w)
            os.close(ev_r)
            code = _node.serve_forked(cmd_r, ev_w, dict(self.inherited or {}))
        except BaseException:  # noqa: BLE001 - report, then leave without cleanup
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    # -- commands ---------------------------------------------------------------

    def configure(self, settings: dict) -> None:
        self._send(MessageType.NODE_CONFIG, serialize.dumps_plain(settings))

    def scale(self, workers: int) -> None:
        self._send(MessageType.NODE_SCALE, ident=workers)

    def stop(self, sig: int = 0) -> None:
        """Stop the workers with ``sig`` now, or (0) once the owner's STOP reached them."""
        self._send(MessageType.NODE_STOP, ident=sig)

    def _send(self, kind: MessageType, body: bytes = b"", ident: int = 0) -> None:
        if self.cmd_fd >= 0:
            try:
                write_pipe_message(self.cmd_fd, kind, body, ident=ident)
            except OSError:  # the node is gone; its event pipe says so
                pass

    # -- events and the end -------------------------------------------------------

    def read_events(self) -> list[tuple[MessageType, tuple]]:
        """What the node reported; check :attr:`gone` afterwards (also set on a corrupt pipe)."""
        try:
            return [(kind, serialize.loads(body)) for kind, _ident, body in self.events.read()]
        except ProtocolError:  # the reader marked itself closed: the node counts as gone
            return []

    @property
    def gone(self) -> bool:
        return self.events is None or self.events.closed

    def close_commands(self) -> None:
        """End of file on the command pipe: the node stops (and knows we are gone)."""
        if self.cmd_fd >= 0:
            os.close(self.cmd_fd)
            self.cmd_fd = -1

    def close_events(self) -> None:
        if self.events is not None:
            os.close(self.events.fd)
            self.events = None

    def wait(self, timeout: float) -> None:
        """Reap the node; kill it if it is not gone within ``timeout`` seconds."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class LocalWorkers:
    """The link to this host's workers: their DEALERs on the owner's ipc ROUTER."""

    remote = False
    host = os.uname().nodename

    def __init__(self, sock):
        self.sock = sock

    def send(self, worker, kind: MessageType, count: int, body: bytes = b"") -> None:
        """Raises ``zmq.ZMQError`` if the worker is gone (ROUTER_MANDATORY)."""
        self.sock.send_multipart([worker.routing_id, pack_header(kind, count, worker.worker_id),
                                  body])

    def describe(self) -> str:
        return f"this host ({self.host})"
