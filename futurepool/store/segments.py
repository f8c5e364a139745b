"""Segments: the files in shared memory (or, spilled, on disk) that hold stored values.

One stored piece (a pickle-5 out-of-band buffer, or a large pickle) is one
segment, a file in ``SHM_DIR`` (``/dev/shm``) named after the session and the
process that wrote it::

    <SHM_PREFIX>s<driver pid>-<token>-<writer>-<seq>       live
    <SHM_PREFIX>s<driver pid>-<token>-<writer>-<seq>.free  freed, kept for reuse

Writers. Each process that stores values (the driver for arguments and
``put``, each worker for its results) has a :class:`SegmentWriter`. Writing
into fresh tmpfs pages costs several times more than into pages already
mapped, so a writer keeps the segments it wrote, and when the owner frees
one it is renamed ``.free`` and reused for the next value of a similar
size, written through a mapping of pages already there. A fresh segment is
written through its file instead (:func:`write_file`: no page faults).
Space is reserved with ``posix_fallocate`` before anything is written (a
transfer's pages: as its chunks land, see :meth:`SegmentWriter.reserve`),
so a full filesystem is an exception, never SIGBUS; past the store's
capacity values spill to ``SPILL_DIR``.

Readers. :func:`read` maps a segment read-only and returns a memoryview of
it; NumPy arrays unpickled from it are views of the shared pages. The reader
holds a shared ``flock`` on the segment for as long as any view is alive (the
lock lives on the mapping's file descriptor, and the kernel drops it when the
mapping goes, or the process dies). A writer reuses a freed segment only
when it can take the lock exclusively; until then the segment waits in the
pool, and whatever unlinks it meanwhile (a full pool, shutdown) leaves the
reader's pages alive: a view outlives the free.

Cleanup. The node removes its session's segments when it exits, the driver
does at shutdown, and :func:`sweep_dead_sessions` removes those of drivers
that are gone.
"""

from __future__ import annotations

import bisect
import collections
import errno
import fcntl
import functools
import itertools
import logging
import mmap
import os
import queue
import sys
import threading
import time
import weakref
from typing import NamedTuple

from ..errors import ObjectLostError, ObjectStoreFullError

LOGGER = logging.getLogger("futurepool")

PAGE = mmap.PAGESIZE
_FREE_SUFFIX = ".free"
#: Live segments a writer keeps mapped (each mapping holds a descriptor).
_MAX_MAPPED = 256
_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
#: Pooled segments a write looks at (the smallest that fit) before making one.
_CANDIDATES = 4
#: How long a write of at least _WAIT_FROM bytes waits for a pooled segment's
#: last reader to let go before it makes a new segment instead.
_BUSY_WAIT = 0.005
_WAIT_FROM = 1 << 20
_JUST_FREED = 0.05
_PARALLEL_COPY_FROM = 16 << 20
#: Bytes per pwrite (write_file): the GIL is released for each.
_WRITE_STEP = 64 << 20
#: Maps a reused segment's pages in one call, rather than a fault per page.
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Location(NamedTuple):
    """Where a stored piece is: what travels in messages instead of the bytes."""

    name: str
    nbytes: int
    spilled: bool
    writer: int  # -1: the driver; else the worker id


class StoreSettings(NamedTuple):
    shm_dir: str
    spill_dir: str
    session: str      # <prefix>s<pid>-<token>
    min_free: int     # spill once the shm filesystem would have less free than this
    pool_bytes: int   # freed bytes a writer keeps for reuse
    threshold: int    # values and buffers this large are stored

    @property
    def dirs(self) -> tuple[str, str]:
        return self.shm_dir, self.spill_dir


def new_settings(shm_dir, spill_dir, prefix, capacity, fraction, pool_bytes, threshold,
                 writers) -> StoreSettings:
    """Settings for a new session (in the driver); capacity 0 picks ``fraction`` of free."""
    free = _free_bytes(shm_dir)
    if capacity <= 0:
        capacity = int(free * fraction)
    session = f"{prefix}s{os.getpid()}-{os.urandom(3).hex()}"
    # Every writer's pool together may hold at most half the capacity.
    pool = min(pool_bytes, capacity // (2 * max(1, writers)))
    return StoreSettings(shm_dir, spill_dir, session, max(0, free - capacity), pool, threshold)


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _size_class(nbytes: int) -> int:
    """Round up to one of 8 sizes per power of two (and to pages), so segments get reused."""
    size = max(PAGE, -(-nbytes // PAGE) * PAGE)
    step = max(PAGE, 1 << max(0, size.bit_length() - 4))
    return -(-size // step) * step


class _Segment:
    """A segment this process writes. Fresh ones are filled through a descriptor
    (``fd``; see :func:`write_file`) and mapped only once they are reused."""

    __slots__ = ("name", "size", "mm", "freed_at", "fd")

    def __init__(self, name: str, size: int, mm=None, fd: int | None = None):
        self.name = name
        self.size = size
        self.mm = mm
        self.freed_at = 0.0
        self.fd = fd

    def write(self, offset: int, data) -> None:
        """``data`` at ``offset`` of a segment being filled through its file (``fd``
        set; a reused one is filled through ``mm``). OSError, :func:`no_room`
        says whether the filesystem filled up."""
        write_file(self.fd, data, offset)

    def mapping(self):
        """The segment mapped here (mapped now if it was only written to so far)."""
        if self.mm is None:
            self.mm = mmap.mmap(self.fd, self.size)
        return self.mm

    def finish(self) -> None:
        """Filled: the descriptor goes (the mapping, if any, stays for reuse)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def unmap(self) -> None:
        self.finish()
        if self.mm is not None:
            self.mm.close()
            self.mm = None


def no_room(exc: OSError) -> bool:
    """Whether ``exc`` says the filesystem is full."""
    return exc.errno in _NO_ROOM


def write_file(fd: int, data, offset: int = 0) -> None:
    """Write ``data`` at ``offset`` of the file ``fd``, all of it.

    Fresh tmpfs pages written through a mapping cost a page fault each, and
    faults from two threads (a parallel copy, a reserving thread) contend for
    the mapping's locks; written with ``pwrite`` they cost no fault at all.
    200 MB into a fresh segment: 73 ms, against 90-320 ms through a mapping
    (this machine; the spread is the host backing pages the guest had given
    back). Pages a mapping has already faulted in are the other way round
    (8 ms), so reused segments are written through their mapping.
    """
    with memoryview(data) as view, view.cast("B") as flat:
        end = flat.nbytes
        done = 0
        while done < end:
            done += os.pwrite(fd, flat[done:done + _WRITE_STEP], offset + done)


class SegmentWriter:
    """Stores pieces for one process; see the module docstring. Thread-safe."""

    def __init__(self, settings: StoreSettings, writer: int):
        self.settings = settings
        self.writer = writer
        self.stem = f"{settings.session}-{writer}-"
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._mapped: collections.OrderedDict[str, _Segment] = collections.OrderedDict()
        self._pool: list[tuple[int, int, _Segment]] = []  # (size, seq, segment), sorted
        self._pool_bytes = 0
        self._background: _Background | None = None
        # Frees posted from finalizers (any thread, maybe inside our own lock):
        # done by the next write, or whoever calls drain_frees().
        self._deferred: collections.deque = collections.deque()
        # Identity cache: an object's buffer stored once while its block lives.
        self._by_exporter: dict[tuple[int, int], tuple[weakref.ref, weakref.ref]] = {}

    # -- writing --------------------------------------------------------------

    def write(self, buf: memoryview) -> Location:
        """Store one contiguous buffer; raises ObjectStoreFullError if nowhere fits."""
        buf = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        nbytes = buf.nbytes
        if self._deferred:
            self.drain_frees()
        seg = self._take(nbytes)
        if seg is not None:
            _copy(seg.mm, buf, nbytes)
        else:
            seg = self._create(nbytes, reserve=True)
            if seg is None:  # spilled: written through the file, nothing kept
                return self._spill(buf)
            try:
                write_file(seg.fd, buf)
                # Mapped now, as the next value of its size will be written (pooled reuse).
                seg.mm = _map_populated(seg.fd, seg.size)
            except BaseException:
                seg.unmap()
                _unlink_quietly(os.path.join(self.settings.shm_dir, seg.name))
                raise
            seg.finish()
        self._keep(seg)
        return Location(seg.name, nbytes, False, self.writer)

    def _keep(self, seg: _Segment) -> None:
        """Remember a segment written here, for reuse once it is freed."""
        with self._lock:
            self._mapped[seg.name] = seg
            while len(self._mapped) > _MAX_MAPPED:
                self._mapped.popitem(last=False)[1].unmap()

    def reserve(self, nbytes: int) -> tuple[Location, _Segment]:
        """A segment for ``nbytes`` that the caller fills (a transfer writes chunks with
        ``segment.write``); then :meth:`commit` it, or :meth:`abort` it (removed at once).

        A pooled segment is written through its mapping. A fresh one is
        written through its file as the chunks land, its pages allocated by
        the writes: the store's capacity was checked, but another program may
        fill the filesystem meanwhile, and ``segment.write`` then raises
        OSError (ENOSPC): abort it and reserve again. Past the store's
        capacity the segment is a file in the spill directory (its space
        reserved with ``posix_fallocate``); ObjectStoreFullError when neither
        has room.
        """
        if self._deferred:
            self.drain_frees()
        seg = self._take(nbytes)
        if seg is None:
            seg = self._create(nbytes, reserve=False)
        if seg is not None:
            return Location(seg.name, nbytes, False, self.writer), seg
        name = self._next_name()
        path = os.path.join(self.settings.spill_dir, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, max(nbytes, 1))
            except OSError as exc:
                if exc.errno in _NO_ROOM:
                    raise ObjectStoreFullError(
                        f"Could not receive a value of {nbytes:,} bytes: shared memory"
                        f" ({self.settings.shm_dir}) is at the store's capacity and the spill"
                        f" directory {self.settings.spill_dir} is full"
                        f" ({os.strerror(exc.errno)}). Nothing was kept.") from None
                raise
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        return Location(name, nbytes, True, self.writer), _Segment(name, max(nbytes, 1), fd=fd)

    def link(self, path: str, key: tuple[int, int], nbytes: int) -> Location | None:
        """Store the first ``nbytes`` of the segment file at ``path`` (inode ``key``)
        without copying: a second name for the same pages (a hard link); None if it
        cannot be linked (gone, renamed, spilled).

        The pages are shared: a freed segment is not reused while it has another
        name (:meth:`_take` waits for the link count to drop, as for a reader).
        """
        if os.path.dirname(path) != self.settings.shm_dir:
            return None
        name = self._next_name()
        target = os.path.join(self.settings.shm_dir, name)
        try:
            os.link(path, target)
            st = os.stat(target)
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != key or st.st_size < nbytes:
            _unlink_quietly(target)  # the name went to other content meanwhile
            return None
        return Location(name, nbytes, False, self.writer)

    def commit(self, location: Location, seg: _Segment) -> None:
        """A reserved segment is complete: readers may map it; :meth:`free` frees it."""
        if location.spilled:
            seg.unmap()
            return
        seg.finish()
        self._keep(seg)

    def abort(self, location: Location, seg: _Segment) -> None:
        """A reserved segment will not be completed: remove it now (nobody maps it yet)."""
        try:
            seg.unmap()
        except BufferError:  # a view of it is still alive: the unlink frees it later
            pass
        _unlink_quietly(_path(location, self.settings.dirs))

    def cached(self, exporter, nbytes: int):
        """The block already holding ``exporter``'s buffer, if one is alive (and whole)."""
        entry = self._by_exporter.get((id(exporter), nbytes))
        if entry is None or entry[0]() is not exporter:
            return None
        block = entry[1]()
        if block is not None:
            try:
                os.stat(_path(block.location, self.settings.dirs))
            except OSError:  # removed under us: store it anew
                return None
        return block

    def remember(self, exporter, nbytes: int, block) -> None:
        key = (id(exporter), nbytes)
        try:
            ref = weakref.ref(exporter, lambda _r, key=key: self._by_exporter.pop(key, None))
        except TypeError:  # no weak references (bytes, bytearray): not cached
            return
        self._by_exporter[key] = (ref, weakref.ref(block))

    def _next_name(self) -> str:
        return f"{self.stem}{next(self._seq)}"

    def _take(self, nbytes: int) -> _Segment | None:
        """A freed segment of a fitting size that nobody reads, renamed for its new content.

        Freed segments a reader still maps stay in the pool, skipped here,
        until the reader lets go (its views die, or it exits).
        """
        shm = self.settings.shm_dir
        limit = 2 * _size_class(nbytes)
        with self._lock:
            pool = self._pool
            start = bisect.bisect_left(pool, (nbytes, -1))
            candidates = [entry for entry in pool[start:start + _CANDIDATES] if entry[0] <= limit]
        # A reader usually lets go within microseconds of its task's end; fresh
        # pages cost ~0.2 ms per MiB: for a large value just freed, waiting a
        # little pays. (One a reader kept for longer is skipped at once.)
        now = time.monotonic()
        patience = now + (_BUSY_WAIT if nbytes >= _WAIT_FROM else 0.0)
        for entry in candidates:
            seg = entry[2]
            path = os.path.join(shm, seg.name)
            while (state := _state(path, seg.size)) is _BUSY and \
                    now - seg.freed_at < _JUST_FREED and time.monotonic() < patience:
                time.sleep(0.0002)
            if state is _BUSY:
                continue
            with self._lock:
                try:
                    self._pool.remove(entry)
                except ValueError:  # another thread took it
                    continue
                self._pool_bytes -= seg.size
            if state is _FREE:
                name = self._next_name()
                try:
                    os.rename(path, os.path.join(shm, name))
                except OSError:  # removed under us (a sweep)
                    seg.unmap()
                    continue
                if seg.mm is None:  # a transfer's copy, not mapped ahead yet (_map_ahead)
                    try:
                        fd = os.open(os.path.join(shm, name), os.O_RDWR | os.O_CLOEXEC)
                        try:
                            seg.mm = _map_populated(fd, seg.size)
                        finally:
                            os.close(fd)
                    except OSError:  # removed meanwhile, or no memory to map it: not reused
                        _unlink_quietly(os.path.join(shm, name))
                        continue
                seg.name = name
                return seg
            seg.unmap()  # gone or truncated: writing into it would fault
            _unlink_quietly(path)
        return None

    def _create(self, nbytes: int, reserve: bool) -> _Segment | None:
        """A new segment in shared memory, open for :func:`write_file` (``seg.fd``),
        its pages reserved with ``posix_fallocate`` if ``reserve`` (else the
        writes allocate them, see :meth:`reserve`); None: spill."""
        size = _size_class(nbytes)
        shm = self.settings.shm_dir
        if _free_bytes(shm) - size < self.settings.min_free:
            self.trim(0)  # our own pool first
            if _free_bytes(shm) - size < self.settings.min_free:
                return None
        name = self._next_name()
        path = os.path.join(shm, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                if reserve:
                    os.posix_fallocate(fd, 0, size)
                else:
                    os.ftruncate(fd, size)
            except OSError as exc:  # full, other programs' files included: spill
                if exc.errno not in _NO_ROOM:
                    raise
                os.close(fd)
                os.unlink(path)
                return None
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        return _Segment(name, size, fd=fd)

    def _spill(self, buf: memoryview) -> Location:
        name = self._next_name()
        path = os.path.join(self.settings.spill_dir, name)
        nbytes = buf.nbytes
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            write_file(fd, buf)
        except OSError as exc:
            _unlink_quietly(path)
            if exc.errno in _NO_ROOM:
                raise ObjectStoreFullError(
                    f"Could not store a value of {nbytes:,} bytes: shared memory"
                    f" ({self.settings.shm_dir}) is at the store's capacity and the spill"
                    f" directory {self.settings.spill_dir} is full ({os.strerror(exc.errno)})."
                    " Nothing was stored. Free results you no longer need, raise"
                    " FUTUREPOOL_STORE_CAPACITY, or point FUTUREPOOL_SPILL_DIR at a larger"
                    " disk.") from None
            raise
        except BaseException:
            _unlink_quietly(path)
            raise
        finally:
            os.close(fd)
        return Location(name, nbytes, True, self.writer)

    # -- freeing --------------------------------------------------------------

    def defer_free(self, location: Location) -> None:
        """:meth:`free`, later: safe to call from a finalizer."""
        self._deferred.append(location)

    def drain_frees(self) -> None:
        deferred = self._deferred
        while deferred:
            try:
                location = deferred.popleft()
            except IndexError:  # another thread took the last one
                return
            self.free(location)

    def free(self, location: Location) -> None:
        """The owner freed ``location``: keep its segment for reuse, or unlink it."""
        shm, spill = self.settings.dirs
        if location.spilled:
            self._unlink_later(os.path.join(spill, location.name))
            return
        with self._lock:
            seg = self._mapped.pop(location.name, None)
        path = os.path.join(shm, location.name)
        if seg is None or self._pool_bytes + seg.size > self.settings.pool_bytes:
            if seg is not None:
                seg.unmap()
            self._unlink_later(path)  # a reader's mapping keeps its pages meanwhile
            return
        free_name = seg.name + _FREE_SUFFIX
        try:
            if os.stat(path).st_size < seg.size:  # truncated: writing would fault
                raise FileNotFoundError(path)
            os.rename(path, os.path.join(shm, free_name))
        except OSError:  # removed or truncated under us: forget it
            seg.unmap()
            _unlink_quietly(path)
            return
        seg.name = free_name
        seg.freed_at = time.monotonic()
        with self._lock:
            bisect.insort(self._pool, (seg.size, next(self._seq), seg))
            self._pool_bytes += seg.size
        if seg.mm is None:  # a transfer's copy, written through its file
            self._later(functools.partial(self._map_ahead, seg))

    def _map_ahead(self, seg: _Segment) -> None:
        """Map a pooled segment (its pages mapped in one call) while nobody waits for it:
        the transfer that reuses it then writes at memory speed, without faults, and
        without mapping it first (13 ms for 200 MB, on that transfer's time)."""
        with self._lock:
            if seg.mm is not None or not self._pooled(seg):
                return  # taken (or trimmed) meanwhile
            name = seg.name
        try:
            fd = os.open(os.path.join(self.settings.shm_dir, name), os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # taken and renamed, or removed, meanwhile
            return
        try:
            mm = _map_populated(fd, seg.size)
        except OSError:  # no memory to map it now: _take maps it if it is reused
            return
        finally:
            os.close(fd)
        with self._lock:
            if seg.mm is None and seg.name == name and self._pooled(seg):
                seg.mm = mm
                return
        mm.close()

    def _pooled(self, seg: _Segment) -> bool:
        """Whether ``seg`` is still in the pool (call with the lock held)."""
        return any(entry[2] is seg for entry in self._pool)

    def trim(self, keep_bytes: int) -> None:
        """Unlink pooled segments until at most ``keep_bytes`` remain (now, not later)."""
        with self._lock:
            dropped = []
            while self._pool and self._pool_bytes > keep_bytes:
                size, _, seg = self._pool.pop()
                self._pool_bytes -= size
                dropped.append(seg)
        for seg in dropped:
            seg.unmap()
            _unlink_quietly(os.path.join(self.settings.shm_dir, seg.name))

    def _unlink_later(self, path: str) -> None:
        # Giving back a large segment's pages takes milliseconds: not on the caller's time.
        self._later(functools.partial(_unlink_quietly, path))

    def _later(self, job) -> None:
        if self._background is None:
            with self._lock:
                if self._background is None:
                    self._background = _Background()
        self._background.put(job)

    def close(self) -> None:
        """Unlink the pool and drop mappings; live segments stay for their owner to free."""
        self.trim(0)
        with self._lock:
            mapped, self._mapped = self._mapped, collections.OrderedDict()
        for seg in mapped.values():
            try:
                seg.unmap()
            except BufferError:  # a view of it is still alive somewhere: let it be
                pass
        if self._background is not None:
            self._background.stop()


def _map_populated(fd: int, size: int) -> mmap.mmap:
    """The file mapped, its pages (there already) mapped in one call: 13 ms for
    200 MB, against 34 ms in faults when a copy first touches them."""
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE)


def _copy(mm, buf: memoryview, nbytes: int) -> None:
    """``mm[:nbytes] = buf``; a large copy on two threads (one core fills ~60% of
    the memory bandwidth: 200 MB take 11.5 ms on one thread, 7 ms on two)."""
    np = sys.modules.get("numpy")  # the buffers that are this large come from NumPy
    if nbytes < _PARALLEL_COPY_FROM or np is None or _CPUS < 2:
        mm[:nbytes] = buf
        return
    dst = np.frombuffer(mm, dtype=np.uint8, count=nbytes)
    src = np.frombuffer(buf, dtype=np.uint8)
    half = (nbytes // 2) // PAGE * PAGE
    helper = threading.Thread(target=np.copyto, args=(dst[half:], src[half:]),
                              name="futurepool-copy")
    helper.start()
    try:
        np.copyto(dst[:half], src[:half])  # NumPy releases the GIL while it copies
    finally:
        helper.join()
        del dst, src  # before anyone closes the mapping


class _Background:
    """A daemon thread for a writer's work nobody waits for: unlinking freed segments,
    mapping pooled ones ahead of their reuse."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="futurepool-store",
                                        daemon=True)
        self._thread.start()

    def put(self, job) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                job()
            except Exception:  # noqa: BLE001 - the next job must still run
                LOGGER.debug("store background job failed", exc_info=True)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()


_FREE, _BUSY, _BROKEN = "free", "busy", "broken"


def _state(path: str, size: int) -> str:
    """Whether a freed segment can be written again.

    _BUSY while a reader holds a view (its shared lock) or it has another name
    (a value stored by :meth:`SegmentWriter.link` shares its pages); _BROKEN if
    it is gone or was truncated (writing would fault with SIGBUS); else _FREE.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return _BROKEN
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _BUSY
        st = os.fstat(fd)
        if st.st_size < size:
            return _BROKEN
        return _FREE if st.st_nlink == 1 else _BUSY
    finally:
        os.close(fd)  # drops our lock too


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# --- reading -----------------------------------------------------------------

# One mapping per segment per process, shared by all views of it while any lives.
_mappings: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_mappings_lock = threading.Lock()


def read(location: Location, dirs: tuple[str, str]) -> memoryview:
    """A read-only view of a stored piece; raises ObjectLostError if it is gone."""
    name, nbytes = location.name, location.nbytes
    with _mappings_lock:
        mm = _mappings.get(name)
        if mm is None:
            # The lock stays held by the mapping's own descriptor (mmap dups
            # ours) until it is unmapped.
            fd = _open_shared(_path(location, dirs), location)
            try:
                mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fd)
            _mappings[name] = mm
    return memoryview(mm)[:nbytes]


class _Lease:
    __slots__ = ("fd", "mm", "size", "locked", "path", "address")

    def __init__(self, fd: int, mm, size: int, path: str):
        self.fd = fd
        self.mm = mm
        self.size = size
        self.locked = True
        self.path = path
        self.address = 0  # of the mapping, once piece_of() needed it


class CachedReader:
    """A worker's reader: keeps mappings between tasks, keyed by the file.

    A freed segment is reused in place for the next value (see
    ``SegmentWriter``), so a worker that maps it again finds its pages already
    in its page tables: no faults, the value is read at memory speed. A
    mapping keeps its shared lock while the worker holds views of it; the
    worker calls :meth:`release_idle` between tasks, which drops the lock of
    mappings without views (so that their writer may reuse them) and unmaps
    those whose file was unlinked (their pages would otherwise stay
    allocated). Only the worker's main thread uses it.
    """

    def __init__(self, dirs, max_leases: int = 32):
        self.dirs = dirs
        self.max_leases = max_leases
        self._leases: collections.OrderedDict[tuple[int, int], _Lease] = \
            collections.OrderedDict()

    def view(self, location: Location) -> memoryview:
        path = _path(location, self.dirs)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise _lost(location) from None
        key = (st.st_dev, st.st_ino)
        lease = self._leases.get(key)
        if lease is None or lease.size < location.nbytes:
            if lease is not None and not lease.locked:
                self._close(key)
            elif lease is not None:  # views of the smaller mapping are alive: leave it
                return read(location, self.dirs)
            lease = self._open(path, key, location)
        elif not lease.locked:
            fcntl.flock(lease.fd, fcntl.LOCK_SH)
            lease.locked = True
            # Between our stat and the lock, the value may have been freed and
            # the file reused (renamed): then this name is gone.
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is None or (st.st_dev, st.st_ino) != key:
                fcntl.flock(lease.fd, fcntl.LOCK_UN)
                lease.locked = False
                raise _lost(location)
        self._leases.move_to_end(key)
        lease.path = path  # (a reused segment has a new name)
        return memoryview(lease.mm)[:location.nbytes]

    def _open(self, path: str, key, location: Location) -> _Lease:
        fd = _open_shared(path, location)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != key or st.st_size < location.nbytes:
                raise _lost(location)
            # The whole file: the next value written into it fits as well.
            mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(fd)
            raise
        lease = self._leases[key] = _Lease(fd, mm, st.st_size, path)
        return lease

    def piece_of(self, buf: memoryview):
        """``(path, inode key)`` of the segment whose mapping ``buf`` starts at, if it
        is one this reader holds a view of (a task returning its input); else None."""
        np = sys.modules.get("numpy")  # the buffers that are this large come from NumPy
        if np is None or not self._leases:
            return None
        start = np.frombuffer(buf, dtype=np.uint8).ctypes.data
        for key, lease in self._leases.items():
            if not lease.locked:
                continue
            if not lease.address:
                lease.address = np.frombuffer(lease.mm, dtype=np.uint8).ctypes.data
            if lease.address == start and buf.nbytes <= lease.size:
                return lease.path, key
        return None

    def release_idle(self) -> None:
        """Between tasks: unlock mappings nobody views; unmap unlinked and surplus ones."""
        leases = self._leases
        for key, lease in list(leases.items()):
            if lease.locked:
                if _exported(lease.mm):
                    continue
                fcntl.flock(lease.fd, fcntl.LOCK_UN)
                lease.locked = False
            if os.fstat(lease.fd).st_nlink == 0:
                self._close(key)
        if len(leases) > self.max_leases:
            for key in [k for k, lease in leases.items() if not lease.locked]:
                self._close(key)
                if len(leases) <= self.max_leases:
                    break

    def has_idle(self) -> bool:
        return bool(self._leases)

    def _close(self, key) -> None:
        lease = self._leases.pop(key)
        lease.mm.close()
        os.close(lease.fd)

    def close(self) -> None:
        for key, lease in list(self._leases.items()):
            if not _exported(lease.mm):
                self._close(key)


def _exported(mm) -> bool:
    """Whether views of a read-only mapping are alive (mmap refuses to resize then)."""
    try:
        mm.resize(0)
    except BufferError:
        return True
    except TypeError:  # "can't resize a readonly map": no view holds it
        return False
    return False


def _path(location: Location, dirs) -> str:
    return os.path.join(dirs[1] if location.spilled else dirs[0], location.name)


def _open_shared(path: str, location: Location) -> int:
    """Open a segment and take its shared (reader's) lock; ObjectLostError if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _lost(location) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lost(location: Location) -> ObjectLostError:
    return ObjectLostError(
        f"The stored value {location.name} ({location.nbytes:,} bytes) is gone: its segment"
        " was removed before it was read.", location.name)


# --- cleanup -----------------------------------------------------------------

def unlink(location: Location, dirs) -> None:
    """Remove a piece's file now (its writer is gone, or the session is over)."""
    _unlink_quietly(_path(location, dirs))


def _files(dirs, start: str):
    """``(directory, name)`` of the files in ``dirs`` whose name starts with ``start``."""
    for directory in dirs:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.startswith(start):
                yield directory, name


def remove_files(dirs, stem: str, keep=()) -> None:
    """Unlink the files whose name starts with ``stem`` (except ``keep``)."""
    for directory, name in _files(dirs, stem):
        if name not in keep:
            _unlink_quietly(os.path.join(directory, name))


def bytes_used(settings: StoreSettings) -> int:
    """Bytes the session's files take in shared memory and the spill directory."""
    total = 0
    seen = set()  # a result stored by SegmentWriter.link shares its input's pages
    for directory, name in _files(settings.dirs, settings.session + "-"):
        try:
            st = os.stat(os.path.join(directory, name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def sweep_dead_sessions(dirs, prefix: str) -> None:
    """Remove the segments of sessions whose driver process is gone."""
    marker = prefix + "s"
    for directory, name in _files(dirs, marker):
        pid = name[len(marker):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            _unlink_quietly(os.path.join(directory, name))


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
