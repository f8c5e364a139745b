"""What remote workers print reaches the driver's stdout and stderr, line by line.

A worker on this host writes to the driver's own stdout and stderr (it
inherited them). A worker on a remote host has nobody watching its
terminal, so :class:`OutputCapture` points its file descriptors 1 and 2 at
pipes (C extensions and subprocesses are captured too) and a thread sends
what arrives to the owner as OUTPUT messages; the owner's
:class:`OutputPrinter` writes it to the driver's streams, each line prefixed
with the host and the worker id, as ``[host:w3] text``.
"""

from __future__ import annotations

import os
import select
import sys
import threading

#: OUTPUT messages carry the stream in the header's count field.
STDOUT, STDERR = 1, 2

_CHUNK = 1 << 16


class OutputCapture:
    """In a worker: fds 1 and 2 into pipes, their content to ``send(stream, data)``.

    ``send`` is called from the capture's thread; the caller makes it safe
    (the worker sends under its socket lock).
    """

    def __init__(self, send):
        self.send = send
        self.saved = []
        self.readers = {}
        # Held while reading and sending: sync() and the thread never interleave chunks.
        self.lock = threading.Lock()
        for stream in (STDOUT, STDERR):
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            self.saved.append(os.dup(stream))
            os.dup2(write_end, stream)
            os.close(write_end)
            self.readers[read_end] = stream
        self.pending = select.poll()
        for fd in self.readers:
            self.pending.register(fd, select.POLLIN)
        # Python's own streams: line-buffered now that they are pipes, as on a terminal.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.reconfigure(line_buffering=True)
            except (AttributeError, ValueError):
                pass
        self.thread = threading.Thread(target=self._pump, name="futurepool-output",
                                       daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        open_fds = dict(self.readers)
        while open_fds:
            ready, _, _ = select.select(list(open_fds), [], [])
            with self.lock:
                for fd in ready:
                    if not self._forward(fd, open_fds[fd]):
                        del open_fds[fd]
                        os.close(fd)

    def _forward(self, fd: int, stream: int) -> bool:
        """Send what ``fd`` holds now; False at end of file."""
        while True:
            try:
                data = os.read(fd, _CHUNK)
            except BlockingIOError:
                return True
            if not data:
                return False
            try:
                self.send(stream, data)
            except Exception:  # noqa: BLE001 - the socket is closing: nobody to tell
                return True

    def sync(self) -> None:
        """Send everything written so far: a task's output goes before its result."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        with self.lock:  # taken even when nothing waits: a chunk being sent finishes first
            try:
                ready = self.pending.poll(0)  # one syscall, where reading would raise twice
            except OSError:
                return
            for fd, _ in ready:
                try:
                    self._forward(fd, self.readers[fd])
                except OSError:  # closed by the thread at end of file
                    pass

    def close(self) -> None:
        """Flush, put the original fds back (EOF for the pipes), send what is left."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for stream, saved in zip((STDOUT, STDERR), self.saved):
            os.dup2(saved, stream)
            os.close(saved)
        self.thread.join(5.0)


class OutputPrinter:
    """On the driver: writes workers' output, a line at a time, with its origin."""

    def __init__(self, prefix: bool = True):
        self.partial: dict[tuple[int, int], bytes] = {}
        self.prefix = prefix  # False: lines as the worker wrote them, as a local pool's

    def write(self, origin: str, worker_id: int, stream: int, data: bytes) -> None:
        key = (worker_id, stream)
        data = self.partial.pop(key, b"") + data
        lines = data.split(b"\n")
        if lines[-1]:
            self.partial[key] = lines[-1]
        complete = lines[:-1]
        if complete:
            self._print(origin if self.prefix else None, worker_id, stream, complete)

    def flush(self, origin: str, worker_id: int) -> None:
        """A worker is gone: what it printed without a final newline."""
        for stream in (STDOUT, STDERR):
            rest = self.partial.pop((worker_id, stream), None)
            if rest:
                self._print(origin if self.prefix else None, worker_id, stream, [rest])

    @staticmethod
    def _print(origin: str | None, worker_id: int, stream: int, lines) -> None:
        out = sys.stdout if stream == STDOUT else sys.stderr
        prefix = f"[{origin}:w{worker_id & 0xFFFFFFFF}] " if origin is not None else ""
        text = "".join(prefix + line.decode(errors="replace") + "\n" for line in lines)
        try:
            out.write(text)
            out.flush()
        except (OSError, ValueError):  # the driver's stream is closed: drop it
            pass
