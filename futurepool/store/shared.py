"""The stdlib's shared memory across hosts: exports, mirrors, and writing back changes.

A ``multiprocessing.shared_memory.SharedMemory`` pickles, in the stdlib, as
its name: a task attaches to the caller's segment. That works on the
caller's host only. Here, in a task's arguments pickled by the driver, it
pickles as its name, its size, the identity of this host's ``/dev/shm``, and
its bytes as one out-of-band buffer (a ``ShareableList`` as its segment)::

    driver (host A)                       worker on host A        worker on host C
    ─────────────────────────────         ────────────────────    ──────────────────────────
    SharedMemory in a task's args         same /dev/shm:          the piece was pulled here
      >= threshold: the store EXPORTS       SharedMemory(name)      like any stored piece
      the segment (no copy): a piece        as the stdlib's         (core.directory); a MIRROR:
      the head's endpoint serves from       pickle does             a new segment, a copy of
      the segment itself                                            it, attached for the task
      smaller: its bytes ride inline                                task ends (returned or
                                                                    raised): the bytes it
    RESULTS (+ patches) ◄───────────────────────────────────────── changed, vs the pulled copy
    the head pulls big patches, writes
    them into the segment, THEN the
    future completes

Patches are exact to the byte: per changed chunk its new bytes and the bytes
the task started from. Where the segment still holds those (nobody else wrote
there) the new bytes go in as they are; else only the bytes the task changed.
Tasks that fill disjoint slices of one segment (even interleaved ones,
``a[0::2]`` and ``a[1::2]``) compose as on one host; where two tasks changed
the same bytes, the last write-back wins. A mirror holds the segment as it
was when its task was placed; writes by others meanwhile are not seen there.

Trust: a write-back names a segment the task was given, and the head checks
it (``Task.shared``); nothing else of the driver's host is writable this way.
"""

from __future__ import annotations

import itertools
import mmap
import os
import pickle
import sys
import threading
from multiprocessing import shared_memory

#: Where POSIX shared memory lives (shm_open's names are files here).
SHM_ROOT = "/dev/shm"
#: The writer id of an exported segment (store.objects): it is the user's, never freed.
EXPORT_WRITER = -3
#: Bytes compared (and patched) at a time.
_CHUNK = 1 << 20
_MASK_TABLE = bytes([0]) + bytes([255]) * 255  # translate: changed byte -> 0xFF

_host_token = None


def host_token() -> str:
    """Which ``/dev/shm`` this process sees: equal tokens mean the same segments."""
    global _host_token
    if _host_token is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as file:
                boot = file.read().strip()
        except OSError:
            boot = ""
        st = os.stat(SHM_ROOT)
        _host_token = f"{boot}:{st.st_dev}:{st.st_ino}"
    return _host_token


# --- the driver: pickling a segment into a task's arguments --------------------------

_exporting = threading.local()  # id(buffer) -> segment name, while a task is pickled


def reduce_segment(shm: shared_memory.SharedMemory, names: list):
    """Reduce ``shm`` for a task of the driver (``names``: the segments the task gets)."""
    buf = shm.buf
    names.append(shm.name)
    pending = getattr(_exporting, "pending", None)
    if pending is None:
        pending = _exporting.pending = {}
    pending[id(buf)] = shm.name  # the store exports it rather than copying (claim)
    return attach, (shm.name, len(buf), host_token(), pickle.PickleBuffer(buf))


def reduce_list(shareable: shared_memory.ShareableList):
    return attach_list, (shareable.shm,)


def claim(exporter) -> str | None:
    """The segment name if ``exporter`` is a segment's buffer being pickled (else None)."""
    pending = getattr(_exporting, "pending", None)
    if not pending:
        return None
    return pending.pop(id(exporter), None)


def forget_pending() -> None:
    _exporting.pending = None


# --- the worker: attaching, mirrors, changes ---------------------------------------

_frames: list[list] = []  # per task being run (lent tasks nest): its mirrors
_mirror_seq = itertools.count(1)
_mirror_stem = None  # "<session>-m<pid>-": the node removes what a dead worker left


def set_mirror_stem(session: str) -> None:
    global _mirror_stem
    _mirror_stem = _stem(session, os.getpid())


def _stem(session: str, pid: int | None) -> str:
    return f"{session}-m{'' if pid is None else f'{pid}-'}"


def remove_mirrors(session: str, pid: int | None = None) -> None:
    """Remove the mirrors a dead worker (``pid``), or every worker of a session, left."""
    stem = _stem(session, pid)
    try:
        names = [n for n in os.listdir(SHM_ROOT) if n.startswith(stem)]
    except OSError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(SHM_ROOT, name))
        except OSError:
            pass


def attach(name: str, nbytes: int, token: str, data):
    """Unpickle a segment: the segment itself where it lives, else a mirror of it."""
    if token == host_token():
        return shared_memory.SharedMemory(name)  # as the stdlib's pickle does
    mirror = _Mirror(name, nbytes, data)
    if _frames:
        _frames[-1].append(mirror)
    return mirror.shm


def attach_list(shm: shared_memory.SharedMemory) -> shared_memory.ShareableList:
    local = _local_names.get(id(shm))
    if local is None:
        return shared_memory.ShareableList(name=shm.name)
    shareable = shared_memory.ShareableList(name=local)
    _as_original(shareable.shm, shm.name)
    return shareable


_local_names: dict[int, str] = {}  # id(a mirror's SharedMemory) -> its segment's name here


def _as_original(shm, name: str) -> None:
    # A mirror answers to the original's name, as the segment a task gets on one host
    # does: returned from the task (pickled by name), it is the original in the driver.
    shm._name = "/" + name  # noqa: SLF001 - what SharedMemory.name and __reduce__ read


class _Mirror:
    """A local segment holding a copy of another host's, and the copy it started from."""

    __slots__ = ("name", "local", "shm", "original")

    def __init__(self, name: str, nbytes: int, data):
        self.name = name
        stem = _mirror_stem or f"fp_m{os.getpid()}-"
        self.local = local = f"{stem}{next(_mirror_seq)}"
        if sys.version_info >= (3, 13):
            self.shm = shared_memory.SharedMemory(local, create=True, size=nbytes, track=False)
        else:
            self.shm = shared_memory.SharedMemory(local, create=True, size=nbytes)
            _untrack(self.shm)
        self.original = memoryview(data).cast("B")
        self.shm.buf[:nbytes] = self.original
        _as_original(self.shm, name)
        _local_names[id(self.shm)] = local

    def changes(self) -> list:
        """``[(offset, new bytes, old bytes), ...]`` for the runs of chunks the task
        changed, as buffers of the mirror and of the copy it started from (pickled out of
        band: stored without a copy in between; valid until :meth:`close`)."""
        now, before = self.shm.buf, self.original
        size = len(before)
        runs: list[list[int]] = []
        for start in range(0, size, _CHUNK):
            end = min(size, start + _CHUNK)
            if _equal(now[start:end], before[start:end]):
                continue
            if runs and runs[-1][1] == start:
                runs[-1][1] = end
            else:
                runs.append([start, end])
        return [(start, pickle.PickleBuffer(now[start:end]),
                 pickle.PickleBuffer(before[start:end])) for start, end in runs]

    def close(self) -> None:
        self.original = None
        shm = self.shm
        _local_names.pop(id(shm), None)
        try:  # (a task that still holds views keeps the pages until they go)
            os.unlink(os.path.join(SHM_ROOT, self.local))
        except FileNotFoundError:
            pass
        try:
            shm.close()
        except BufferError:
            pass  # views the task kept (a NumPy array): the mapping goes with them


def _untrack(shm) -> None:
    # Before 3.13 every SharedMemory registers with the resource tracker, which would
    # unlink it (and warn) at exit; a mirror is this worker's to remove.
    from multiprocessing import resource_tracker
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
    except Exception:  # noqa: BLE001 - no tracker: nothing to undo
        pass


def _equal(a: memoryview, b: memoryview) -> bool:
    # Compared 8 bytes per item: a memoryview of "B" compares byte by byte.
    whole = len(a) & ~7
    return a[:whole].cast("Q") == b[:whole].cast("Q") and a[whole:] == b[whole:]


def begin_task() -> None:
    _frames.append([])


def end_task(ran: bool, encode):
    """Close the task's mirrors; what it changed in them, as ``encode(patches)`` made
    it while the mirrors were still open (None: it had none, or did not run)."""
    mirrors = _frames.pop()
    if not mirrors:
        return None
    try:
        return encode([(m.name, m.changes()) for m in mirrors]) if ran else None
    finally:
        for mirror in mirrors:
            mirror.close()


# --- the head: writing the changes into the segment ------------------------------------

def _merge(current: bytes, new: bytes, old: bytes) -> bytes:
    """``current`` with the bytes where ``new`` differs from ``old`` taken from ``new``."""
    order = "little"
    changed = int.from_bytes((int.from_bytes(new, order) ^ int.from_bytes(old, order)).to_bytes(
        len(new), order).translate(_MASK_TABLE), order)
    merged = (int.from_bytes(current, order) & ~changed) | (int.from_bytes(new, order) & changed)
    return merged.to_bytes(len(new), order)


def _apply(target: memoryview, new: memoryview, old: memoryview) -> None:
    for start in range(0, len(new), _CHUNK):
        end = min(len(new), start + _CHUNK)
        current = target[start:end]
        # Nobody else wrote there since the mirror was taken (the usual case, disjoint
        # slices): the new bytes as they are. Else only the bytes this task changed.
        if _equal(current, old[start:end]):
            current[:] = new[start:end]
        else:
            current[:] = _merge(current, new[start:end], old[start:end])
        current.release()


def write_back(patches, allowed) -> None:
    """Apply ``[(segment name, changes), ...]`` to this host's segments (``allowed``:
    the names the task was given; a patch naming another is refused)."""
    for name, changes in patches:
        if name not in allowed or "/" in name:
            raise PermissionError(f"a task's write-back named {name!r}, which it was not given")
        fd = os.open(os.path.join(SHM_ROOT, name), os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            with mmap.mmap(fd, size) as mm:
                for offset, new, old in changes:
                    new, old = memoryview(new).cast("B"), memoryview(old).cast("B")
                    end = offset + len(new)
                    if end > size or len(old) != len(new):
                        raise ValueError(f"a write-back to {name} of {len(new):,} bytes at"
                                         f" {offset:,} does not fit its {size:,} bytes")
                    with memoryview(mm) as whole:
                        _apply(whole[offset:end], new, old)
        finally:
            os.close(fd)


__all__ = ["EXPORT_WRITER", "attach", "attach_list", "begin_task", "claim", "end_task",
           "host_token", "reduce_list", "reduce_segment", "remove_mirrors", "write_back"]
