"""``futurepool.Pool``: a drop-in ``multiprocessing.pool.Pool`` on the executor core.

Every call becomes a task of an internal :class:`~futurepool.Executor`, so
the Pool inherits what the executor does: code shipped by value, crash
containment, futures as values. The facade keeps the stdlib's signatures,
messages and result objects.

Intended differences from the stdlib (exception types kept):

* A worker that dies fails the task it ran with ``WorkerCrashedError`` (a
  ``BrokenProcessPool``) instead of hanging forever (bpo-22393); the worker
  is replaced.
* An exception that cannot be unpickled arrives as ``RemoteError`` instead
  of hanging (cpython#103061); ``BaseException`` in a task is re-raised by
  ``get()`` instead of hanging (cpython PR#101081).
* A failing initializer fails the results with one ``InitializerError``
  instead of respawning workers forever (cpython#87472).
* ``AsyncResult`` objects (and futurepool Futures) may be passed as
  arguments: the task waits for them and receives their values.
* ``imap``/``imap_unordered`` consume their input lazily, at most
  ``buffersize`` tasks ahead of the consumer (default: a small multiple of
  the pool size), so infinite iterables work in bounded memory.
* After ``terminate()``, pending results fail with ``CancelledError`` (or
  ``WorkerCrashedError`` if running) instead of never completing.
* ``map``, ``imap`` and ``imap_unordered`` take a keyword-only ``progress``
  (:mod:`futurepool.progress`).
* ``options(timeout=..., max_retries=..., resources=..., memory_limit=...)``
  returns a view whose calls give their tasks those options, as
  ``Executor.options`` (:class:`PoolOptions`); keyword-only ``resources``
  declares what this host offers.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import multiprocessing.pool as _mp_pool
import queue
import threading
import types
import warnings
import weakref
from concurrent.futures import CancelledError
from concurrent.futures.process import _RemoteTraceback

from . import progress as _progress
from .errors import ResultPicklingError
from .executor import Executor, _default_workers, _listen_from_environment
from .future import Future

__all__ = ["Pool", "PoolOptions", "AsyncResult", "ApplyResult", "MapResult"]

INIT, RUN, CLOSE, TERMINATE = "INIT", "RUN", "CLOSE", "TERMINATE"

_LOGGER = logging.getLogger("futurepool")


def _map_chunk(fn, items):
    """Runs in the worker: one chunk of ``map``."""
    return list(map(fn, items))


def _starmap_chunk(fn, items):
    """Runs in the worker: one chunk of ``starmap``."""
    return list(itertools.starmap(fn, items))


def _concatenate(*chunks):
    """Runs in the worker: a MapResult's value, for a task that takes it as an argument."""
    return [item for chunk in chunks for item in chunk]


def _pool_exception(exc: BaseException) -> BaseException:
    """The exception as ``multiprocessing.Pool`` users expect it."""
    if isinstance(exc, ResultPicklingError):
        error = _mp_pool.MaybeEncodingError.__new__(_mp_pool.MaybeEncodingError)
        error.exc, error.value = exc.reason_repr, exc.value_repr
        error.args = (error.exc, error.value)
        return error
    if type(exc.__cause__) is _RemoteTraceback:
        exc.__cause__ = _mp_pool.RemoteTraceback(exc.__cause__.tb)
    return exc


class _CallbackThread:
    """Runs a pool's callbacks in order on one thread, as the stdlib's result handler does.

    Once stopped (the pool joined, terminated or dropped), a late job runs
    inline in the thread that completed its result instead: a result's
    ``get()`` must never wait for a thread that is gone.
    """

    def __init__(self):
        self.queue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="futurepool-pool-callbacks",
                                       daemon=True)
        self.thread.start()

    def _run(self):
        while (job := self.queue.get()) is not None:
            _run_job(job)

    def submit(self, job) -> None:
        with self.lock:
            if not self.stopped:
                self.queue.put(job)
                return
        _run_job(job)

    def stop(self, wait: bool = True) -> None:
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            self.queue.put(None)
        if wait and self.thread is not threading.current_thread():
            self.thread.join()


def _run_job(job) -> None:
    try:
        job()
    except Exception:  # a user callback failed: log it, keep delivering
        _LOGGER.exception("exception in a multiprocessing pool callback")


class ApplyResult:
    """The result of ``apply_async``: ``get``, ``wait``, ``ready``, ``successful``."""

    __class_getitem__ = classmethod(types.GenericAlias)

    def __init__(self, future: Future, callback=None, error_callback=None, runner=None):
        self._future = future
        self._callback = callback
        self._error_callback = error_callback
        # With callbacks, "ready" waits until they have run (stdlib order).
        self._event = threading.Event() if (callback or error_callback) else None
        if self._event is not None:
            future.add_done_callback(lambda f: runner.submit(self._run_callbacks))

    def _run_callbacks(self):
        try:
            if self._succeeded():
                if self._callback is not None:
                    self._callback(self._value())
            elif self._error_callback is not None:
                self._error_callback(self._error())
        finally:
            self._event.set()

    def _value(self):
        return self._future.result()

    def _error(self) -> BaseException:
        future = self._future
        if future.cancelled():
            return CancelledError("the pool was terminated before this task ran")
        return _pool_exception(future.exception())

    def ready(self):
        if self._event is not None:
            return self._event.is_set()
        return self._future.done()

    def _succeeded(self):
        return not self._future.cancelled() and self._future.exception() is None

    def successful(self):
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._succeeded()

    def wait(self, timeout=None):
        if self._event is not None:
            self._event.wait(timeout)
        else:
            self._future._wait(timeout)

    def get(self, timeout=None):
        if self._event is None:  # the hot path: one wait on the future itself
            future = self._future
            if not future._wait(timeout):
                raise multiprocessing.TimeoutError
            if future._exception is None and not future.cancelled():
                return future.result()
            raise self._error()
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._succeeded():
            return self._value()
        raise self._error()

    def __reduce__(self):
        # As a task argument it stands for its value, like a Future.
        return self._future.__reduce__()


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of ``map_async``/``starmap_async``: one list, chunks gathered."""

    def __init__(self, executor, futures, callback=None, error_callback=None, runner=None):
        self._executor = weakref.ref(executor)
        self._futures = futures
        self._callback = callback
        self._error_callback = error_callback
        self._runner = runner
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._left = len(futures)
        self._failed = None
        self._joined = None
        if not futures:
            self._finish()
        for future in futures:
            future.add_done_callback(self._chunk_done)

    def _chunk_done(self, future):
        with self._lock:
            if self._event.is_set() or self._left == 0:
                return
            failed = future.cancelled() or future._exception is not None
            self._left -= 1
            if failed:
                self._failed = future
                self._left = 0
            elif self._left:
                return
        self._finish()

    def _finish(self):
        if self._callback is None and self._error_callback is None:
            self._event.set()
        else:
            self._runner.submit(self._run_callbacks)

    def _succeeded(self):
        return self._failed is None

    def ready(self):
        return self._event.is_set()

    def wait(self, timeout=None):
        self._event.wait(timeout)

    def _value(self):
        value = []
        for future in self._futures:
            value.extend(future.result())
        return value

    def _error(self) -> BaseException:
        failed = self._failed
        if failed.cancelled():
            return CancelledError("the pool was terminated before this task ran")
        return _pool_exception(failed.exception())

    def __reduce__(self):
        if self._joined is None:
            executor = self._executor()
            if executor is None:
                raise ValueError("the pool of this MapResult is gone")
            self._joined = executor.submit(_concatenate, *self._futures)
        return self._joined.__reduce__()


class IMapIterator:
    """Results of ``imap``, in order; ``next(timeout)`` as in the stdlib."""

    def __init__(self, pool, func, iterable, window):
        self._submit = pool._executor.submit
        self._func = func
        self._items = iter(iterable)
        self._window = window
        self._pending = collections.deque()
        self._input_error = None
        self._fill()

    def _fill(self):
        """Submit input items until ``_window`` tasks are out (or the input ends)."""
        while self._items is not None and self._out() < self._window:
            try:
                item = next(self._items)
            except StopIteration:
                self._items = None
                return
            except Exception as exc:  # the input failed: it raises after the others
                self._items = None
                self._input_error = exc
                return
            self._track(self._submit(self._func, item))

    def _out(self) -> int:
        return len(self._pending)

    def _track(self, future) -> None:
        self._pending.append(future)

    def _exhausted(self):
        """Nothing is out: raise the input's error once, then StopIteration."""
        error, self._input_error = self._input_error, None
        if error is not None:
            raise error
        raise StopIteration

    def __iter__(self):
        return self

    def next(self, timeout=None):
        if not self._pending:
            self._exhausted()
        future = self._pending[0]
        if not future._wait(timeout):
            raise multiprocessing.TimeoutError
        self._pending.popleft()
        self._fill()
        return _result(future)

    __next__ = next


class IMapUnorderedIterator(IMapIterator):
    """Results of ``imap_unordered``, as they complete."""

    def __init__(self, pool, func, iterable, window):
        self._done = queue.SimpleQueue()
        self._outstanding = 0
        super().__init__(pool, func, iterable, window)

    # Completion order comes from the queue; the window counts what is out.
    def _out(self) -> int:
        return self._outstanding

    def _track(self, future) -> None:
        self._outstanding += 1
        future.add_done_callback(self._done.put)

    def next(self, timeout=None):
        if not self._outstanding:
            self._exhausted()
        try:
            future = self._done.get(timeout=timeout)
        except queue.Empty:
            raise multiprocessing.TimeoutError from None
        self._outstanding -= 1
        self._fill()
        return _result(future)

    __next__ = next


def _result(future):
    if future.cancelled():
        raise CancelledError("the pool was terminated before this task ran")
    error = future.exception()
    if error is not None:
        raise _pool_exception(error)
    return future.result()


def _chain(chunks):
    for chunk in chunks:
        yield from chunk


class Pool:
    """A process pool with the ``multiprocessing.pool.Pool`` API.

    Args:
        processes: number of worker processes; default ``os.process_cpu_count()``.
        initializer: called with ``initargs`` in each worker at start.
        initargs: arguments for ``initializer``.
        maxtasksperchild: a worker exits after this many tasks and is replaced.
        context: its start method decides what workers inherit, as in the
            stdlib (fork: the caller's state; spawn/forkserver: the main
            script, imported); kept as ``_ctx``.
        listen, key_file: as for :class:`~futurepool.Executor`: other hosts
            join with ``futurepool worker --connect``; ``address`` is where
            it listens. 0 processes with ``listen``: a head that runs no task.
        resources: what this host offers to tasks that ask for resources, as
            for :class:`~futurepool.Executor`.

    .. versionadded:: 0.1
    """

    def __init__(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                 context=None, *, listen=None, key_file=None, resources=None):
        self._state = INIT  # __del__ must find it even if __init__ raises
        self._ctx = context or multiprocessing.get_context()
        listening = listen or _listen_from_environment()  # the Executor resolves it again
        if processes is None:
            processes = _default_workers(listening)
        if processes < 1 and not (processes == 0 and listening):
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError('initializer must be a callable')
        self._processes = processes
        self._maxtasksperchild = maxtasksperchild
        self._initializer = initializer
        self._initargs = initargs
        self._executor = Executor(processes, mp_context=self._ctx, initializer=initializer,
                                  initargs=initargs, max_tasks_per_child=maxtasksperchild,
                                  listen=listen, key_file=key_file, resources=resources)
        self.address = self._executor.address
        # Every worker starts now, whatever the start method, as the stdlib's do.
        if self._executor._owner.thread is None:
            self._executor._owner.start(all_workers=True)
        # Like the stdlib's result handler, the callback thread exists from the start.
        self._runner = _CallbackThread()
        self._state = RUN

    def __del__(self, _warn=warnings.warn):
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning,
                  source=self)
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.stop(wait=False)  # the executor shuts itself down when collected

    def __repr__(self):
        cls = type(self)
        return (f"<{cls.__module__}.{cls.__qualname__} state={self._state}"
                f" pool_size={self._processes}>")

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def _pool_size(self) -> int:
        """Workers on every host (remote nodes join and leave)."""
        return max(1, self._executor._max_workers)

    @property
    def _pool(self):
        """The worker processes, as the stdlib's list of ``Process`` objects.

        Each has ``pid``, ``name``, ``is_alive()``, ``join(timeout)``,
        ``terminate()``, ``kill()`` and ``exitcode``; a snapshot.
        """
        return list(self._executor._owner.process_table().values())

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()

    def _check_running(self):
        if self._state != RUN:
            raise ValueError("Pool not running")

    # -- submitting -----------------------------------------------------------

    def options(self, **options):
        """A view of this pool whose tasks carry ``options``; the pool is unchanged.

        The view has ``apply``, ``apply_async``, ``map``, ``map_async``,
        ``starmap``, ``starmap_async``, ``imap`` and ``imap_unordered``, with
        the stdlib's signatures. The options are those of
        :meth:`futurepool.Executor.options`: ``timeout`` (seconds each task,
        a whole chunk with ``chunksize`` > 1, may run once started; past it
        the task is stopped and its result raises
        :class:`~futurepool.errors.TaskTimeoutError`), ``max_retries``,
        ``resources`` (where each task may run, held while it does) and
        ``memory_limit`` (past it the task's worker is killed and its
        result raises :class:`~futurepool.errors.TaskMemoryError`).

        Raises:
            TypeError, ValueError: as :meth:`futurepool.Executor.options`.

        .. versionadded:: 0.1
        """
        return PoolOptions(self, self._executor.options(**options))

    def apply(self, func, args=(), kwds={}):  # noqa: B006 - the stdlib's signature
        """Call ``func(*args, **kwds)`` in a worker and return its result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func, args=(), kwds={}, callback=None,  # noqa: B006
                    error_callback=None):
        """Schedule ``func(*args, **kwds)``; return an :class:`AsyncResult`."""
        self._check_running()
        future = self._executor.submit(func, *args, **kwds)
        runner = self._runner
        return ApplyResult(future, callback, error_callback, runner)

    def map(self, func, iterable, chunksize=None, *, progress=None):
        """``list(map(func, iterable))`` in the pool, in chunks.

        Args:
            progress: keyword-only, a futurepool extension: True for a
                progress bar of the items as their chunks complete (tqdm if
                installed, else a line on a terminal's stderr), a string for
                one with that description, or a tqdm-like class; see
                :mod:`futurepool.progress`. Default None: nothing.
        """
        if progress is None:
            return self._map_async(func, iterable, _map_chunk, chunksize).get()
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        shown = _progress.display(progress, len(iterable), _progress.describe(func))
        if shown is None:
            return self._map_async(func, iterable, _map_chunk, chunksize).get()
        try:
            result = self._map_async(func, iterable, _map_chunk, chunksize)
            _progress.wait_counting(result._futures, shown)
        finally:
            shown.close()
        return result.get()

    def starmap(self, func, iterable, chunksize=None):
        """Like :meth:`map` with ``func(*args)`` for each ``args`` in ``iterable``."""
        return self._map_async(func, iterable, _starmap_chunk, chunksize).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        """Asynchronous :meth:`map`; ``callback`` receives the whole list once."""
        return self._map_async(func, iterable, _map_chunk, chunksize, callback, error_callback)

    def starmap_async(self, func, iterable, chunksize=None, callback=None,
                      error_callback=None):
        """Asynchronous :meth:`starmap`."""
        return self._map_async(func, iterable, _starmap_chunk, chunksize, callback,
                               error_callback)

    def _map_async(self, func, iterable, chunk_fn, chunksize=None, callback=None,
                   error_callback=None):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:  # the stdlib's rule: about four chunks per worker
            chunksize, extra = divmod(len(iterable), self._pool_size() * 4)
            if extra:
                chunksize += 1
        if len(iterable) == 0:
            chunksize = 0
        submit = self._executor.submit
        futures = [submit(chunk_fn, func, chunk) for chunk in _chunks(iterable, chunksize)]
        runner = self._runner
        return MapResult(self._executor, futures, callback, error_callback, runner)

    def imap(self, func, iterable, chunksize=1, buffersize=None, *, progress=None):
        """Like :meth:`map`, lazily: results in order as an iterator.

        Args:
            buffersize: tasks (chunks) submitted ahead of the consumer; the
                input is read no further than that.
            progress: keyword-only, a futurepool extension: a progress bar of
                the results as the iterator hands them out; values as for
                :meth:`map`. The total is known when ``iterable`` has a length.
        """
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        return self._imap(IMapIterator, func, iterable, chunksize, buffersize, progress)

    def imap_unordered(self, func, iterable, chunksize=1, buffersize=None, *, progress=None):
        """Like :meth:`imap`, results in completion order."""
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize, buffersize,
                          progress)

    def _imap(self, kind, func, iterable, chunksize, buffersize, progress):
        if buffersize is not None:
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        window = buffersize or max(64, 8 * self._pool_size())
        if progress is not None:
            shown = _progress.display(progress, _progress.total_of((iterable,)),
                                      _progress.describe(func))
            if shown is not None:
                return self._imap_shown(kind, func, iterable, chunksize, window, shown)
        if chunksize == 1:
            return kind(self, func, iterable, window)
        return _chain(kind(self, _ChunkCall(func), _chunks(iterable, chunksize), window))

    def _imap_shown(self, kind, func, iterable, chunksize, window, shown):
        """:meth:`_imap` with each result counted on ``shown`` (a chunk by its length)."""
        try:
            if chunksize == 1:
                return _progress.Counted(kind(self, func, iterable, window), shown)
            results = kind(self, _ChunkCall(func), _chunks(iterable, chunksize), window)
        except BaseException:
            shown.close()
            raise
        return _chain(_progress.Counted(results, shown, len))

    # -- lifecycle ------------------------------------------------------------

    def close(self):
        """No more tasks; the workers exit once the outstanding ones are done."""
        if self._state == RUN:
            self._state = CLOSE

    def terminate(self):
        """Stop the workers now; results not yet computed fail (never hang)."""
        self._state = TERMINATE
        self._executor.terminate_workers()
        self._stop_callbacks()

    def join(self):
        """Wait for the workers to exit; call :meth:`close` or :meth:`terminate` first."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        self._executor.shutdown(wait=True)
        self._stop_callbacks()

    def _stop_callbacks(self):
        self._runner.stop()


class _ChunkCall:
    """``func`` over one chunk, for imap with chunksize > 1 (picklable)."""

    def __init__(self, func):
        self.func = func

    def __call__(self, chunk):
        return list(map(self.func, chunk))


def _chunks(iterable, size):
    """Lists of ``size`` items; sequences are sliced, anything else read in order."""
    if size <= 0:
        return
    if isinstance(iterable, (list, tuple, range)):
        for start in range(0, len(iterable), size):
            yield list(iterable[start:start + size])
        return
    it = iter(iterable)
    while batch := list(itertools.islice(it, size)):
        yield batch


class PoolOptions:
    """What :meth:`Pool.options` returns: the pool's calls, their tasks with options.

    A view: the pool's own methods run with this view's executor view in
    place of the pool's executor; everything else is the pool's.

    .. versionadded:: 0.1
    """

    def __init__(self, pool, executor_view):
        self._pool = pool
        self._executor = executor_view

    def options(self, **options):
        """A view with these options added to (or replacing) this view's."""
        return PoolOptions(self._pool, self._executor.options(**options))

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def __repr__(self) -> str:
        return f"<{self._executor._options!r} of {self._pool!r}>"

    apply = Pool.apply
    apply_async = Pool.apply_async
    map = Pool.map
    map_async = Pool.map_async
    starmap = Pool.starmap
    starmap_async = Pool.starmap_async
    imap = Pool.imap
    imap_unordered = Pool.imap_unordered
    _map_async = Pool._map_async
    _imap = Pool._imap
    _imap_shown = Pool._imap_shown
