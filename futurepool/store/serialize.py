"""Serialization: the one module that pickles and unpickles user data.

* Functions, arguments and results go through cloudpickle (protocol 5), so
  lambdas, closures and ``__main__`` functions work without fork inheritance.
* A function is pickled once per function object and identified by the hash
  of its pickle; workers cache functions by that id (like Ray and Dask, a
  function object is snapshotted the first time it is submitted).
* A ``futurepool.Future`` inside the arguments pickles as a reference to its
  result; the worker substitutes the value while unpickling (at any depth).
* Exceptions travel with their traceback (tblib), and become a faithful
  :class:`~futurepool.errors.RemoteError` surrogate when they cannot cross.

Trust: everything unpickled here comes from processes of the same session
over private ``ipc://`` sockets and pipes; unpickling runs arbitrary code, so
nothing here may ever read bytes from an unauthenticated peer.
"""

from __future__ import annotations

import collections
import hashlib
import io
import linecache
import multiprocessing.context
import os
import pickle
import re
import threading
import traceback
import types
import weakref
from concurrent.futures.process import _RemoteTraceback
from multiprocessing import shared_memory
from multiprocessing.reduction import ForkingPickler

import cloudpickle
import tblib

from ..errors import RemoteError
from . import shared

PROTOCOL = 5

loads = pickle.loads

_CLOUDPICKLE_REDUCE_CODE = cloudpickle.CloudPickler.dispatch_table[types.CodeType]


def _reduce_code(code: types.CodeType):
    # cloudpickle >= 3.1.2 names the file of every code object it pickles
    # "<dynamic-code>", to make pickles independent of where the code was
    # written (cloudpipe/cloudpickle#560): tracebacks through code sent by
    # value (lambdas, closures, __main__ functions, classmethods) then lose
    # the file and every source line. Reduce as cloudpickle does, and put
    # the name back when unpickling.
    make, args = _CLOUDPICKLE_REDUCE_CODE(code)
    return _make_code, (make, args, code.co_filename)


def _make_code(make, args, filename: str) -> types.CodeType:
    code = make(*args)
    return code if code.co_filename == filename else code.replace(co_filename=filename)


def _reduce_shared_memory(shm):
    # In the driver's task arguments: a segment other hosts can mirror (store.shared);
    # anywhere else as the stdlib pickles it, by name.
    names = getattr(_collector, "shared", None)
    if names is None:
        return shm.__reduce__()
    return shared.reduce_segment(shm, names)


def _reduce_shareable_list(shareable):
    if getattr(_collector, "shared", None) is None:
        return shareable.__reduce__()
    return shared.reduce_list(shareable)


class _Pickler(cloudpickle.CloudPickler):
    """cloudpickle, except that code keeps its file name (see :func:`_reduce_code`), and
    the stdlib's shared memory can reach other hosts in tasks' arguments."""

    dispatch_table = collections.ChainMap({
        types.CodeType: _reduce_code,
        shared_memory.SharedMemory: _reduce_shared_memory,
        shared_memory.ShareableList: _reduce_shareable_list,
    }, cloudpickle.CloudPickler.dispatch_table)


def dumps(obj, buffer_callback=None, main_by_name=None) -> bytes:
    """Pickle user data (cloudpickle, protocol 5).

    ``main_by_name(obj)`` says whether a function or class of ``__main__``
    may travel by name because the receiving workers have the same one in
    their ``__main__`` (``core.startup.MainReferences``); cloudpickle alone
    sends every one of them by value.
    """
    if main_by_name is None:
        with io.BytesIO() as file:
            _Pickler(file, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
            return file.getvalue()
    file = io.BytesIO()
    pickler = _MainByNamePickler(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
    pickler.main_by_name = main_by_name
    pickler.dump(obj)
    return file.getvalue()


class _MainByNamePickler(_Pickler):
    main_by_name = None

    def reducer_override(self, obj):
        kind = type(obj)
        if (kind is types.FunctionType or issubclass(kind, type)) \
                and obj.__module__ == "__main__" and self.main_by_name(obj):
            return NotImplemented  # pickle's own save_global: by name
        return super().reducer_override(obj)


def _dumps_c(obj, buffer_callback=None) -> bytes:
    return pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffer_callback)


# --- values: inline, or with pieces in the object store -----------------------
#
# An encoded value is either the pickle itself (``bytes``: small, no large
# buffers), or ``(inband, pieces)``: ``inband`` is the pickle or, when it is
# large itself, a stored piece; ``pieces`` are the pickle-5 out-of-band
# buffers of at least ``store.threshold`` bytes, each stored, in order. A
# stored piece is a ``Block`` in the driver and a ``Location`` elsewhere.

def encode(obj, store, dumps_fn=dumps):
    """Pickle ``obj``, putting its large buffers (and a large pickle) into ``store``.

    On failure nothing stays stored. ``store`` None keeps everything inline.
    """
    if store is None:
        return dumps_fn(obj)
    threshold = store.threshold
    pieces = []

    def out_of_band(buffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: in-band
            return True
        if raw.nbytes < threshold:
            return True
        pieces.append(store.stored(raw))
        return False

    try:
        data = dumps_fn(obj, buffer_callback=out_of_band)
        if len(data) >= threshold:
            data = store.stored(memoryview(data))
    except BaseException:
        _discard(store, pieces)
        raise
    if not pieces and type(data) is bytes:
        return data
    return data, tuple(pieces)


def _discard(store, pieces) -> None:
    discard = getattr(store, "discard", None)  # driver Blocks free themselves
    if discard is not None:
        for piece in pieces:
            discard(piece)


def decode(data, view):
    """Unpickle what :func:`encode` made; ``view(piece)`` maps a stored piece.

    Large buffers come back as read-only views of the shared pages (a NumPy
    array is not copied).
    """
    if type(data) is bytes:
        return loads(data)
    inband, pieces = data
    if type(inband) is not bytes:
        inband = view(inband)
    return pickle.loads(inband, buffers=[piece if type(piece) is bytes else view(piece)
                                         for piece in pieces])


def dumps_result(obj, store=None):
    """Encode a task's result in the worker: C pickle first, cloudpickle if needed.

    Everything a worker holds is importable by reference except what arrived
    by value (lambdas, classes from the caller's ``__main__``); for those the
    C pickler refuses (the name does not resolve in the worker) and
    cloudpickle takes over. That keeps the common case at C speed.
    """
    try:
        return encode(obj, store, _dumps_c)
    except Exception:  # noqa: BLE001 - any refusal: let cloudpickle try, and raise
        return encode(obj, store, dumps)


def dumps_plain(obj) -> bytes:
    """Pickle our own messages' bodies: only builtins inside, C speed."""
    return pickle.dumps(obj, protocol=PROTOCOL)


# --- functions ---------------------------------------------------------------

_CACHEABLE = (types.FunctionType, types.BuiltinFunctionType)


class FunctionCache:
    """Maps functions to ``(fn_id, pickled bytes)``, pickling each once.

    Only plain functions and builtins are cached, weakly keyed so closures
    made per call do not pile up (builtins, which refuse weak references, are
    kept in a small bounded table). Other callables (bound methods, callable
    objects, partials) carry state that may change between calls, so they are
    pickled at every submit, as the stdlib does; workers still recognise an
    identical pickle by its hash. Called from user threads: the lock keeps
    the tables consistent.
    """

    _STRONG_LIMIT = 256

    def __init__(self, dumps_fn=dumps):
        self._dumps = dumps_fn
        self._weak = weakref.WeakKeyDictionary()
        self._strong: dict[int, tuple[object, bytes, bytes]] = {}
        self._lock = threading.Lock()

    def get(self, fn) -> tuple[bytes, bytes]:
        if type(fn) not in _CACHEABLE:
            data = self._dumps(fn)
            return hashlib.blake2b(data, digest_size=16).digest(), data
        with self._lock:
            try:
                hit = self._weak.get(fn)
            except TypeError:  # unhashable or no weakref support
                hit = None
                strong = self._strong.get(id(fn))
                if strong is not None and strong[0] is fn:
                    return strong[1], strong[2]
            if hit is not None:
                return hit
        data = self._dumps(fn)
        fn_id = hashlib.blake2b(data, digest_size=16).digest()
        entry = (fn_id, data)
        with self._lock:
            try:
                self._weak[fn] = entry
            except TypeError:
                if len(self._strong) >= self._STRONG_LIMIT:
                    self._strong.pop(next(iter(self._strong)))
                self._strong[id(fn)] = (fn, fn_id, data)
        return entry


def describe_callable(fn) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        return repr(fn)[:80]
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


# --- futures inside arguments ------------------------------------------------

_collector = threading.local()


def collect_references(dep) -> bool:
    """Record a future met while pickling task arguments.

    Returns False when no task is being pickled in this thread (the future
    then refuses to pickle: it only travels as a task argument).
    """
    found = getattr(_collector, "deps", None)
    if found is None:
        return False
    found[dep.object_id] = dep
    return True


def pickling_arguments():
    """Who the task whose arguments this thread is pickling goes to (None: no task).

    An executor passed to its own task pickles as a handle to it; anywhere
    else it refuses.
    """
    if getattr(_collector, "deps", None) is None:
        return None
    return _collector.context


def dumps_arguments(args, kwargs, store=None, dumps_fn=dumps, context=True,
                    shared_names=None) -> tuple:
    """Encode ``(args, kwargs)`` and return the futures found inside them.

    ``context``: what :func:`pickling_arguments` answers meanwhile (the owner
    the task is for). ``shared_names``: a list, in the driver: the stdlib's
    shared memory segments inside are named there, and pickle so that other
    hosts can mirror them (``store.shared``).
    """
    # Re-entrant: pickling a MapResult submits its joining task meanwhile.
    outer = (getattr(_collector, "deps", None), getattr(_collector, "context", None),
             getattr(_collector, "shared", None))
    _collector.deps = deps = {}
    _collector.context = context
    _collector.shared = shared_names
    try:
        return encode((args, kwargs), store, dumps_fn), deps
    finally:
        _collector.deps, _collector.context, _collector.shared = outer
        if shared_names:
            shared.forget_pending()


# Futures that left their owner inside a value (core.nested) register, when
# unpickled, with the table this thread is decoding for.
_decoding = threading.local()


def borrowing_table():
    """Where a future unpickled in this thread registers (None: the process default)."""
    return getattr(_decoding, "table", None)


def decode_for(data, view, table):
    """:func:`decode`, with futures inside the value registering with ``table``."""
    outer = getattr(_decoding, "table", None)
    _decoding.table = table
    try:
        return decode(data, view)
    finally:
        _decoding.table = outer


# Worker side: the encoded values of the current task's dependencies, by
# object id, decoded when the arguments' pickle refers to them.
_resolving = threading.local()


class _Decoded:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def resolve_reference(object_id: int):
    """Unpickling hook: the value of a dependency of the task being loaded."""
    values = getattr(_resolving, "values", None)
    if values is None or object_id not in values:
        raise RuntimeError(
            f"futurepool: reference to object {object_id} outside of a task that depends on it")
    value = values[object_id]
    if type(value) is not _Decoded:
        value = values[object_id] = _Decoded(decode(value, _resolving.view))
    return value.value


def loads_arguments(data, dep_values: dict, view):
    """Decode ``(args, kwargs)``, substituting dependency values."""
    if not dep_values:
        return decode(data, view)
    _resolving.values = dict(dep_values)
    _resolving.view = view
    try:
        return decode(data, view)
    finally:
        _resolving.values = _resolving.view = None


# --- exceptions --------------------------------------------------------------
#
# Frames name the file their code was written in, also for code that was
# pickled by value (:func:`_reduce_code`). The worker renders the traceback
# text with its own source lines (``linecache``) and lists the frames it
# found none for; the caller fills those in from its ``linecache``. Code
# typed in a Jupyter cell, at an interactive prompt or (3.13+) with ``python
# -c`` has its source only there, and so does, on another host, code from a
# file that host does not have. Frames the worker could read are not looked
# up again: an exception whose frames all had their lines costs the caller
# nothing more.

def dumps_exception(exc: BaseException) -> bytes:
    """Pickle an exception with its traceback; never raises for the exception's sake."""
    report = traceback.TracebackException(type(exc), exc, exc.__traceback__, compact=True)
    tb_text = "".join(report.format())
    try:
        tb_dict = tblib.Traceback(exc.__traceback__).as_dict() if exc.__traceback__ else None
    except Exception:
        tb_dict = None
    try:
        # By name first, as the stdlib: an exception class of the caller's __main__
        # must arrive as that class for ``except`` to catch it; cloudpickle if needed.
        exc_bytes = _dumps_c(exc)
    except BaseException:  # noqa: BLE001 - a __reduce__ may raise anything
        try:
            exc_bytes = dumps(exc)
        except BaseException:  # noqa: BLE001
            exc_bytes = None
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except BaseException:  # noqa: BLE001
        message = "<str() failed>"
    return dumps_plain((exc_bytes, type_name, message, tb_text, tb_dict,
                        _frames_without_source(report)))


def _frames_without_source(report: traceback.TracebackException) -> tuple[tuple[str, int], ...]:
    """``(file name, line number)`` of every frame ``report`` shows without source."""
    missing = {}
    reports, seen = [report], set()
    while reports:
        report = reports.pop()
        if report is None or id(report) in seen:
            continue
        seen.add(id(report))
        for frame in report.stack:
            # .line was looked up while formatting: no file is read again.
            if frame.lineno is not None and not frame.line:
                missing[frame.filename, frame.lineno] = None
        reports.append(report.__cause__)
        if not report.__suppress_context__:
            reports.append(report.__context__)
        reports.extend(getattr(report, "exceptions", None) or ())  # 3.11+ groups
    return tuple(missing)


# A frame's first line in rendered traceback text; the margin is what
# exception groups draw on its left.
_FRAME_LINE = re.compile(r'(?P<margin>[ |]*?)  File "(?P<filename>.+)", line (?P<lineno>\d+), in ')


def _fill_source_lines(tb_text: str, missing: tuple[tuple[str, int], ...]) -> str:
    """``tb_text`` with the source lines of ``missing`` frames that this process has."""
    lines = {}
    for filename, lineno in missing:
        linecache.checkcache(filename)  # as traceback does: no stale lines
        line = linecache.getline(filename, lineno).strip()
        if line:
            lines[filename, lineno] = line
    if not lines:
        return tb_text
    rows = tb_text.splitlines(keepends=True)
    filled = []
    for i, row in enumerate(rows):
        filled.append(row)
        match = _FRAME_LINE.match(row)
        line = match and lines.get((match["filename"], int(match["lineno"])))
        if line and not (i + 1 < len(rows) and rows[i + 1][match.end("margin"):].strip() == line):
            filled.append(f"{match['margin']}    {line}\n")
    return "".join(filled)


def loads_exception(data) -> BaseException:
    """Rebuild an exception from :func:`dumps_exception`, with a surrogate on failure.

    The remote traceback is attached twice, deliberately: as real frames
    (tblib) so debuggers and ``traceback.print_exc()`` show the worker's
    frames, and as the stdlib's ``_RemoteTraceback`` ``__cause__`` holding the
    text, as ``ProcessPoolExecutor`` does. Source lines the worker could not
    read are filled in from this process's ``linecache``.
    """
    exc_bytes, type_name, message, tb_text, tb_dict, missing = loads(data)
    if missing:
        tb_text = _fill_source_lines(tb_text, missing)
    exc = None
    if exc_bytes is not None:
        try:
            exc = loads(exc_bytes)
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - a __setstate__ may raise anything
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message, tb_text)
    if tb_dict is not None:
        try:
            exc = exc.with_traceback(tblib.Traceback.from_dict(tb_dict).as_traceback())
        except Exception:  # noqa: BLE001 - frames are a nicety, the text stays
            pass
    exc.__cause__ = _RemoteTraceback(f'\n"""\n{tb_text}"""')
    return exc


# --- pool start-up state: initializer and initargs ---------------------------

class _InheritedFd:
    """A file descriptor in initargs, passed to the node by inheritance.

    ``multiprocessing`` objects (``Queue``, ``Pipe`` connections) only pickle
    while a process is being spawned; this stands in for the spawning popen's
    fd handle. The driver passes the fds to the node with ``pass_fds``; the
    node's forked workers inherit them; each worker dups its own copy.
    """

    def __init__(self, fd: int):
        self.fd = fd

    def detach(self) -> int:
        return os.dup(self.fd)


class _SpawningPopen:
    """What ``multiprocessing`` asks of a process being spawned while pickling."""

    def __init__(self):
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        dup = os.dup(fd)  # ours to keep: the caller may close the original
        self.fds.append(dup)
        return dup

    def DupFd(self, fd: int) -> _InheritedFd:  # noqa: N802 - multiprocessing's name
        return _InheritedFd(fd)


class _SpawnPickler(_MainByNamePickler):
    # Connections, sockets and the like reduce to fd handles only through
    # ForkingPickler's table, which plain pickle does not consult.
    dispatch_table = collections.ChainMap(ForkingPickler._extra_reducers,
                                          _Pickler.dispatch_table)


def dumps_for_spawn(obj, main_by_name=None) -> tuple[bytes, list[int]]:
    """Pickle start-up state the way ``multiprocessing`` does when spawning.

    Returns the pickle and the file descriptors the receiving processes must
    inherit (owned by the caller, who closes them when the pool is gone).
    ``main_by_name`` as for :func:`dumps`.
    """
    popen = _SpawningPopen()
    multiprocessing.context.set_spawning_popen(popen)
    try:
        buf = io.BytesIO()
        pickler = _SpawnPickler(buf, protocol=PROTOCOL)
        pickler.main_by_name = main_by_name or (lambda obj: False)
        pickler.dump(obj)
    except BaseException:
        for fd in popen.fds:
            os.close(fd)
        raise
    finally:
        multiprocessing.context.set_spawning_popen(None)
    return buf.getvalue(), popen.fds
