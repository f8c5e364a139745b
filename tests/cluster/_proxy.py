"""A small TCP proxy for tests: a flaky link between a node and its head.

This kernel has no ``netem``, so loss, delay and resets are made here: the
proxy forwards bytes both ways, may hold each chunk back, and may cut
every connection now and then (a reset, as a broken link looks to the
peers). ZeroMQ dials again by itself; what was in flight is lost.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time


class FlakyProxy:
    def __init__(self, target: tuple[str, int], *, delay: float = 0.0,
                 cut_every: tuple[float, float] | None = None, seed: int = 0):
        self.target = target
        self.delay = delay
        self.cut_every = cut_every
        self.random = random.Random(seed)
        self.cuts = 0
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        if cut_every is not None:
            self.threads.append(threading.Thread(target=self._cutter, daemon=True))
        for thread in self.threads:
            thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):  # as zmq does: no Nagle stalls on small frames
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.pairs.append((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
                thread.start()
                self.threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                if self.delay:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _reset(sock)
                sock.close()

    def _cutter(self) -> None:
        low, high = self.cut_every
        while not self.closed.wait(self.random.uniform(low, high)):
            self.cut()

    def cut(self) -> None:
        """Reset every connection through the proxy now."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                _reset(sock)
        if pairs:
            self.cuts += 1

    def close(self) -> None:
        self.closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()
        self.cut()
        for thread in self.threads:
            thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _reset(sock: socket.socket) -> None:
    """Break the connection; the pump blocked reading it wakes and closes it (linger 0:
    the close sends RST, as a link that broke mid-stream)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
