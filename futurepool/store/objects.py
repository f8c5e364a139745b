"""Stored objects as each process sees them: handles in the driver, locations in workers.

The driver's owner counts references the Python way. Every stored piece the
driver knows of is one :class:`Block`; whatever needs the piece holds the
Block: a Future's result, a pending task's arguments, a ``put`` handle, the
identity cache while the argument is reused. When the last holder lets go,
the Block asks the owner to free the piece: the writer reuses or unlinks its
segment (``segments.SegmentWriter.free``). Readers' views need no count:
their shared locks keep a segment from being reused, and their mappings keep
its pages after an unlink.

Workers see plain :class:`~futurepool.store.segments.Location` tuples (a
Block pickles as its location) and keep nothing once a task is done.
"""

from __future__ import annotations

import itertools
import threading
import weakref

from ..errors import ObjectLostError
from . import segments, shared
from .segments import Location, SegmentWriter, StoreSettings

DRIVER = -1  # the writer id of the driver's own segments
#: Writer ids from ``1 << NODE_SHIFT`` up are workers of remote nodes (node ``n``'s
#: from ``(n + 1) << NODE_SHIFT``): their pieces live in that host's store.
NODE_SHIFT = 32


class Rebuilt(ObjectLostError):
    """Raised by a fetch whose piece was lost and whose value was rebuilt meanwhile
    (``core.lineage``): the Future being decoded holds the new pieces; decode again."""


def remote(location: Location) -> bool:
    """Whether a piece lives in another host's store (it must be pulled to be read here)."""
    return location.writer >= 1 << NODE_SHIFT


class Block:
    """The driver's handle of one stored piece; frees it when collected."""

    __slots__ = ("location", "local", "_store", "_pinned", "__weakref__")

    def __init__(self, location: Location, store: DriverStore):
        self.location = location
        # Where it is readable here: the location itself, or for a piece of another
        # host, the copy pulled into this host's store (None until pulled).
        self.local = None if remote(location) else location
        self._store = store
        self._pinned = None

    def __reduce__(self):  # in messages to workers, a block is its location
        return Location, tuple(self.location)

    def view(self) -> memoryview:
        pinned = self._pinned
        if pinned is not None:
            return pinned
        local = self.local
        if local is None:  # on another host: pulled into this host's store first
            local = self._store.fetch(self)
        return segments.read(local, self._store.settings.dirs)

    def pin(self) -> None:
        """Map it now, so that it stays readable after the session's files are removed.

        A piece of another host that was never pulled is not pulled now: it
        goes with that host's session (reading it later raises ObjectLostError).
        """
        if self._pinned is None and self.local is not None:
            try:
                self._pinned = self.view()
            except Exception:  # noqa: BLE001 - already lost: reading will say so
                pass

    def hand_over(self) -> Location:
        """Its location, for a process that frees it from now on (this block will not)."""
        self._store = None
        return self.location

    def __del__(self):
        if self._store is None:
            return
        try:
            self._store.release(self.location)
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __repr__(self):
        return f"<Block {self.location.name} {self.location.nbytes:,} bytes>"


class DriverStore:
    """The driver's side of the store: its writer, and the Blocks it has handed out.

    ``release`` is called from finalizers in any thread: it only posts to the
    owner's I/O thread (``on_free``), which does the work, or, once the owner
    is closed, unlinks the segment at once.
    """

    def __init__(self, settings: StoreSettings, on_free):
        self.settings = settings
        self.threshold = settings.threshold
        self.writer = SegmentWriter(settings, DRIVER)
        self._on_free = on_free
        # Pulls a piece of another host into this store (the owner's, with a head):
        # ``fetcher(block) -> Location``; raises ObjectLostError.
        self.fetcher = None
        self._blocks: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self.closed = False
        # Segments of the stdlib's shared memory passed to tasks (store.shared): piece
        # name -> segment name, while the piece is held; the head's endpoint serves them.
        self.exports: dict[str, str] = {}
        self._export_seq = itertools.count(1)

    def stored(self, buf: memoryview) -> Block:
        """Store a buffer for the driver (arguments, ``put``); reuses a live copy."""
        exporter = buf.obj
        segment = shared.claim(exporter)
        if segment is not None:  # a SharedMemory: stands for itself, nothing copied
            location = Location(f"{self.settings.session}-x{next(self._export_seq)}",
                                buf.nbytes, False, shared.EXPORT_WRITER)
            self.exports[location.name] = segment
            return self.wrap(location)
        block = self.writer.cached(exporter, buf.nbytes)
        if block is None:
            block = self.wrap(self.writer.write(buf))
            self.writer.remember(exporter, buf.nbytes, block)
        return block

    def wrap(self, location: Location) -> Block:
        block = Block(location, self)
        with self._lock:
            self._blocks[location.name] = block
        return block

    def fetch(self, block: Block) -> Location:
        """Pull a piece of another host into this store (blocking); its local Location."""
        fetcher = self.fetcher
        if fetcher is None or self.closed:
            raise ObjectLostError(
                f"The stored value {block.location.name} ({block.location.nbytes:,} bytes)"
                " lives on another host and this executor can no longer pull it (it was"
                " shut down).", block.location.name)
        block.local = fetcher(block)
        return block.local

    def live_names(self) -> set[str]:
        with self._lock:
            return set(self._blocks.keys())

    def release(self, location: Location) -> None:
        if self.closed:
            self.unlink(location)
        elif location.writer == DRIVER:
            # Freed by the next write in any thread, or by the owner's I/O
            # thread, which ``on_free`` wakes; never here (a finalizer may run
            # inside the writer's own lock).
            self.writer.defer_free(location)
            self._on_free(None)
        else:
            self._on_free(location)

    def unlink(self, location: Location) -> None:
        segments.unlink(location, self.settings.dirs)

    def pin_all(self) -> None:
        with self._lock:
            blocks = list(self._blocks.values())
        for block in blocks:
            block.pin()

    def close(self) -> None:
        """Remove every file of the session (the node does too; whoever is last)."""
        self.closed = True
        self.writer.close()
        segments.remove_files(self.settings.dirs, self.settings.session + "-")


class WorkerStore:
    """A worker's side: it writes its results and reads its tasks' inputs."""

    def __init__(self, settings: StoreSettings, worker_id: int):
        self.settings = settings
        self.threshold = settings.threshold
        self.writer = SegmentWriter(settings, worker_id)
        self.reader = segments.CachedReader(settings.dirs)

    def view(self, location: Location) -> memoryview:
        if location.writer == shared.EXPORT_WRITER:
            return memoryview(b"")  # a segment of this host: attached by name (store.shared)
        return self.reader.view(location)

    def stored(self, buf: memoryview) -> Location:
        # A result that is a task's stored input (``return array``) is not copied:
        # it becomes a second name of the input's pages.
        piece = self.reader.piece_of(buf)
        if piece is not None:
            location = self.writer.link(*piece, buf.nbytes)
            if location is not None:
                return location
        return self.writer.write(buf)

    def discard(self, location: Location) -> None:
        """A piece written for a result that will not be sent."""
        self.writer.free(location)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def view_of(block: Block) -> memoryview:
    return block.view()
