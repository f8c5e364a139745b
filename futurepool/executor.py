"""``futurepool.Executor``: a drop-in ``concurrent.futures.ProcessPoolExecutor``.

The facade validates arguments exactly as the stdlib does, pickles each call
in the caller's thread (so an unpicklable argument fails that future at
once, naming the argument) and hands it to the owner (``core.owner``), which
does everything else on its I/O thread.

Intended differences from the stdlib (each keeps the stdlib's exception
types):

* A worker that dies fails only the task it was running, with
  :class:`~futurepool.errors.WorkerCrashedError` (a ``BrokenProcessPool``)
  naming the exit code or signal; the pool replaces the worker. The stdlib
  breaks the whole pool.
* A result that cannot be unpickled in the caller fails that future only
  (:class:`~futurepool.errors.UnpicklingFailedError`, also a
  ``BrokenProcessPool``), not the pool.
* Futures are values: pass them as arguments to ``submit``/``map``.
* The start method of ``mp_context`` is honoured as the stdlib does
  (``core.startup``): under fork, workers see the caller's memory as it was
  when the executor started; under spawn/forkserver they import the main
  script. Lambdas, closures and interactive code work under every method
  (they travel by value), and ``max_tasks_per_child`` is accepted with fork.
* Extra keyword-only argument ``max_retries`` (default 0, the stdlib's
  behaviour): how many times a task whose worker died is re-run; and
  ``max_reconstructions`` (cluster: how many times a result lost with its
  node may be rebuilt by re-running its task).
* ``map`` accepts ``buffersize``, and ``terminate_workers``/``kill_workers``
  exist (as in Python 3.14), on every version.
* ``map`` takes a keyword-only ``progress`` (:mod:`futurepool.progress`).
* ``options(timeout=..., max_retries=..., resources=..., memory_limit=...)``
  returns a view whose ``submit`` and ``map`` give their tasks those options
  (:class:`ExecutorOptions`); a task past its ``timeout`` is stopped and
  fails with :class:`~futurepool.errors.TaskTimeoutError`, one past its
  ``memory_limit`` with :class:`~futurepool.errors.TaskMemoryError`; one
  with ``resources`` runs only where they fit. ``Future.stop()`` stops a
  running task. Keyword-only ``resources`` declares what this host offers.
* Leaving a ``with`` block by ``KeyboardInterrupt`` (or exiting the
  interpreter on an unhandled one) cancels pending futures and stops the
  workers instead of waiting for them (cpython#125886).
"""

from __future__ import annotations

import collections
import functools
import itertools
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import weakref
from concurrent.futures import Executor as _StdExecutor

from . import config
from . import progress as _progress
from .core import lifetime, startup
from .core import nested as _nested
from .core import owner as _owner
from .core import resources as _resources
from .core.calls import task_options
from .errors import ObjectStoreFullError
from .future import Future
from .protocol import security
from .store import serialize

__all__ = ["Executor", "ExecutorOptions", "ProcessPoolExecutor", "current_executor"]

current_executor = _nested.current_executor


#: Executors listening for remote nodes (FUTUREPOOL_LISTEN gives its address to one).
_listening: weakref.WeakSet = weakref.WeakSet()


def _listen_from_environment():
    """``FUTUREPOOL_LISTEN``: the first executor alive in this process listens there."""
    if not config.LISTEN:
        return None
    if any(not executor._shutdown_thread for executor in _listening):
        return None
    return config.LISTEN


def _default_workers(listen=None) -> int:
    """This host's CPUs; for a listening head, ``FUTUREPOOL_LOCAL_WORKERS`` if set."""
    if listen and config.LOCAL_WORKERS >= 0:
        return config.LOCAL_WORKERS
    return _cpus()


def _cpus() -> int:
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _process_chunk(fn, columns):
    """Runs in the worker: one task of ``map(..., chunksize>1)``."""
    return list(map(fn, *columns))


def _chunks(iterables, n):
    """Chunks of ``zip(*iterables)`` as columns: one list per iterable.

    A list of values pickles several times faster than a list of tuples.
    One iterable is sliced directly; several go through ``zip`` so that they
    are consumed exactly as the stdlib consumes them.
    """
    if len(iterables) == 1:
        it = iter(iterables[0])
        while column := list(itertools.islice(it, n)):
            yield (column,)
        return
    it = zip(*iterables)
    while rows := list(itertools.islice(it, n)):
        yield tuple(map(list, zip(*rows)))


class Executor(_StdExecutor):
    """Runs calls in worker processes; a drop-in ``ProcessPoolExecutor``.

    Args:
        max_workers: number of worker processes on this host; default the
            number of CPUs this process may use (``os.process_cpu_count()``).
            With ``listen``, 0 makes a head that runs no task itself.
        mp_context: the start method's semantics, as in the stdlib: with
            fork (the default on Linux before 3.14) workers inherit the
            caller's state; with spawn or forkserver they import the main
            script and start on demand.
        initializer: called with ``initargs`` in each worker before it
            takes tasks. If it fails, the pool is broken, as in the stdlib.
        initargs: arguments for ``initializer``; may hold
            ``multiprocessing`` queues, pipes, locks and shared values, as
            with the stdlib (under fork they are handed over in memory).
        max_tasks_per_child: a worker exits after this many tasks and is
            replaced by a fresh one.
        max_retries: times a task is re-run when its worker dies (not when
            it raises). Default 0, as in the stdlib.
        listen: ``"tcp://HOST:PORT"`` (port 0: any free one) to let other
            hosts add their cores with ``futurepool worker --connect``;
            default ``$FUTUREPOOL_LISTEN`` for the first executor alive in
            the process. The executor starts at once; ``address`` is where
            it listens. Links are CurveZMQ, keyed by ``key_file``.
        key_file: the cluster's key file (default ``$FUTUREPOOL_KEY_FILE``,
            else ``~/.config/futurepool/cluster.key``; created if absent).
        resources: what this host offers to tasks that ask for resources
            (``options(resources=)``), e.g. ``{"gpu": 2}``; added to what is
            detected (``cpu``: the CPUs this process may use, ``mem``: the
            host's or its cgroup's memory in bytes), which a key given here
            replaces. Quantities are numbers, or sizes like ``"64GB"``.
        max_reconstructions: times a stored result whose only copy was on a
            node that was lost may be rebuilt by running the task that made
            it again (it assumes tasks idempotent, as Ray does); past it, or
            with 0 (off), reading it raises ``ObjectLostError``. Default
            ``$FUTUREPOOL_MAX_RECONSTRUCTIONS``, else 3.

    Raises:
        ValueError: ``max_workers`` or ``max_tasks_per_child`` below 1; a
            negative or unparsable quantity in ``resources``.
        TypeError: ``initializer`` not callable, ``max_tasks_per_child`` not
            an int, ``initargs`` that cannot be pickled, ``resources`` not a
            dict.

    .. versionadded:: 0.1
    """

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(),
                 *, max_tasks_per_child=None, max_retries=0, listen=None, key_file=None,
                 resources=None, max_reconstructions=None):
        # An unchanged program told to listen by FUTUREPOOL_LISTEN says where, on stderr;
        # a program that passed listen= knows (executor.address) and decides what to print.
        announce = listen is None
        if listen is None:
            listen = _listen_from_environment()
        elif not isinstance(listen, str) or not listen.startswith("tcp://"):
            raise ValueError(f"listen must be an address like 'tcp://0.0.0.0:7777', got {listen!r}")
        if max_workers is None:
            max_workers = _default_workers(listen)
        elif max_workers <= 0 and not (max_workers == 0 and listen):
            # 0 with listen=: a head that runs no task itself, only remote nodes do.
            raise ValueError("max_workers must be greater than 0")
        if mp_context is None:
            mp_context = mp.get_context("spawn" if max_tasks_per_child is not None else None)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if not isinstance(max_retries, int) or isinstance(max_retries, bool):
            raise TypeError(f"max_retries must be an integer, got {max_retries!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        if max_reconstructions is not None:
            if not isinstance(max_reconstructions, int) or isinstance(max_reconstructions, bool):
                raise TypeError(f"max_reconstructions must be an integer or None, got"
                                f" {max_reconstructions!r}")
            if max_reconstructions < 0:
                raise ValueError(f"max_reconstructions must be >= 0, got {max_reconstructions!r}")
        resources = _resources.normalize(resources)
        self._max_workers = max_workers
        self._mp_context = mp_context
        self._initializer = initializer
        self._initargs = initargs
        self._max_tasks_per_child = max_tasks_per_child
        semantics = startup.semantics(mp_context)
        method = mp_context.get_start_method() or mp.get_start_method()
        blob, fds, references = None, [], None
        if semantics == startup.SPAWN:
            references = startup.MainReferences.for_spawn()
            if initializer is not None:  # fork hands them over in memory
                try:
                    blob, fds = serialize.dumps_for_spawn((initializer, tuple(initargs)),
                                                          references)
                except Exception as exc:
                    raise TypeError(f"initializer and initargs must be picklable: "
                                    f"{type(exc).__name__}: {exc}") from exc
        self._owner = _owner.Owner(
            self, max_workers=max_workers, semantics=semantics, start_method=method,
            initializer=initializer, initargs=initargs, initializer_blob=blob,
            inherited_fds=fds, max_tasks_per_child=max_tasks_per_child,
            max_retries=max_retries, main_references=references,
            workers_on_demand=semantics == startup.SPAWN and not listen, listen=listen,
            key_file=key_file, resources=resources,
            initializer_name=serialize.describe_callable(initializer) if initializer else "")
        self._owner.objects.lineage.max_reconstructions = max_reconstructions
        self._shut_down = False  # shutdown() finished: _processes is None, as in the stdlib
        self.address = None
        self._shutdown_thread = False
        self._shutdown_lock = threading.Lock()
        if listen:
            self._listen(announce)

    def _listen(self, announce: bool):
        """Start now and bind, so that hosts can join before the first submit."""
        owner = self._owner
        owner.start()
        owner.listening.wait(config.START_TIMEOUT)
        if owner.open_error is not None:
            error = owner.open_error
            self.shutdown(wait=True)
            if isinstance(error, security.SecurityError):  # says what to do already
                raise error
            raise OSError(f"could not listen on {owner.listen} for remote nodes:"
                          f" {type(error).__name__}: {error}") from error
        bound = owner.head.address
        host, _, port = bound[len("tcp://"):].rpartition(":")
        # Bound to every interface: other hosts dial this host's name, not 0.0.0.0.
        self.address = f"tcp://{socket.gethostname()}:{port}" \
            if host in ("0.0.0.0", "[::]", "*") else bound
        _listening.add(self)
        message = (f"futurepool: listening on {bound} for remote nodes; add a host with:\n"
                   f"  futurepool worker --connect {self.address} --key-file"
                   f" {security.key_file_path(owner.key_file)}")
        if announce:
            print(message, file=sys.stderr, flush=True)
        else:
            _owner.LOGGER.info(message)

    @property
    def _broken(self):
        """Truthy (the reason) once the pool cannot run tasks, as in the stdlib."""
        error = self._owner.broken
        return str(error) if error is not None else False

    @property
    def _executor_manager_thread(self):
        """The thread that owns this executor's state, under the stdlib's name."""
        return self._owner.thread

    @property
    def _processes(self):
        """pid -> worker process, as the stdlib's ``_processes`` (None after shutdown).

        Each value has ``pid``, ``name``, ``is_alive()``, ``join(timeout)``,
        ``terminate()``, ``kill()`` and ``exitcode``. A snapshot: workers
        that are replaced later appear in the next one.
        """
        if self._shut_down:
            return None
        if self._owner.thread is None:
            return {}
        return self._owner.process_table()

    def __reduce__(self):
        """Passed to one of its own tasks, an executor arrives as a handle to itself.

        The task's ``submit``/``map`` through it are owned by the task's
        worker (nested ownership, :mod:`futurepool.core.nested`); inside a
        task, :func:`futurepool.current_executor` returns the same handle.
        """
        if serialize.pickling_arguments() is not self._owner:
            raise TypeError(
                "a futurepool Executor can only be pickled as an argument of a task"
                " submitted to it, where it arrives as a handle to itself; inside a task,"
                " futurepool.current_executor() returns that handle")
        return _nested._executor_handle, ()

    def _refuse_forked_copy(self):
        if self._owner.forked_copy:
            raise RuntimeError(
                f"this executor belongs to the process that created it (pid"
                f" {self._owner.pid}); a copy inherited by fork, as in a worker, cannot run"
                " tasks")

    def submit(self, fn, /, *args, **kwargs):
        """Schedule ``fn(*args, **kwargs)``; return a :class:`futurepool.Future`.

        Futures among the arguments (at any depth) are waited for and
        replaced by their values in the worker. An argument that cannot be
        pickled fails the returned future with ``pickle.PicklingError``
        naming it; nothing is sent.

        Raises:
            RuntimeError: after ``shutdown`` (or interpreter shutdown).
            BrokenProcessPool: the pool is broken (its initializer failed).
        """
        return self._submit(fn, args, kwargs, None)

    def options(self, **options):
        """A view of this executor whose tasks carry ``options``; the executor is unchanged.

        The view has ``submit`` and ``map`` with the stdlib's signatures
        (``map``'s own ``timeout`` keeps its stdlib meaning: a deadline for
        the caller's iteration), and an ``options`` of its own to add more.
        Making one is cheap; so is using it.

        Args:
            timeout: seconds each task may run, counted from the moment it
                starts in its worker (not from submit). Past it, the task is
                interrupted by :class:`~futurepool.errors.TaskTimeoutError`
                raised inside it (``finally`` blocks run); if it has not ended
                ``config.INTERRUPT_GRACE`` seconds (0.5) later, its worker is
                killed and replaced. Its future fails with
                ``TaskTimeoutError`` (a ``TimeoutError``) either way; other
                tasks are untouched. None (the default): no limit.
            max_retries: times a task is re-run when its worker dies,
                instead of the executor's ``max_retries``. Given here, it
                also re-runs a task that timed out or passed its memory
                limit (neither is retried otherwise).
            resources: what each task holds on the node that runs it, e.g.
                ``{"gpu": 1, "mem": "8GB"}``: it is sent only to a worker of
                a node that offers that much beside what the tasks already
                sent there hold (see ``Executor(resources=)`` and
                ``futurepool worker --resources``), and waits, without
                holding up other tasks, until one has room. A task given
                ``gpu`` runs with ``CUDA_VISIBLE_DEVICES`` naming its GPUs.
                Tasks without ``resources`` hold nothing.
            memory_limit: bytes (or a size like ``"512MB"``, ``"2GiB"``)
                the task's worker may hold while it runs. Past it, the worker
                is killed at once and replaced, and the future fails with
                :class:`~futurepool.errors.TaskMemoryError` (a
                ``MemoryError``) naming the limit and the peak.

        Returns:
            An :class:`ExecutorOptions` view.

        Raises:
            TypeError: an option this version does not know (the message
                lists those it accepts), or a value of the wrong type.
            ValueError: a timeout that is not > 0, a negative max_retries,
                a negative or unparsable resource quantity or memory limit.

        .. versionadded:: 0.1
        """
        return ExecutorOptions(self, task_options(None, options))

    def _submit(self, fn, args, kwargs, options):
        """``submit``, with ``options`` (a ``calls.TaskOptions`` or None)."""
        owner = self._owner
        self._refuse_forked_copy()
        if options is not None and options.request is not None:
            owner.placement.check(options.request)
        if owner.thread is None or owner.on_demand:
            with self._shutdown_lock:
                self._check_open()
                # Workers first (the fork of the node must see the caller's state as it
                # is now, and no thread of ours yet), then pickling, as in the stdlib.
                if owner.thread is None:
                    owner.start()
                if owner.on_demand:
                    owner.adjust_workers()
        future = Future()
        try:
            task = owner.make_task(future, fn, args, kwargs, options)
        except ObjectStoreFullError:
            raise
        except Exception as exc:
            task = None
            error = exc
        with self._shutdown_lock:
            self._check_open()
            if task is None:
                future.set_exception(error)
                return future
            owner.post(("task", task))
        return future

    def _start(self):
        """Start the owner (and fork its node) now rather than at the first submit."""
        self._refuse_forked_copy()
        with self._shutdown_lock:
            self._check_open()
            if self._owner.thread is None:
                self._owner.start()

    def put(self, value):
        """Store ``value`` once; return a done Future to pass to many tasks.

        Passing the Future instead of the value means the value is pickled
        and stored once, however many tasks take it: large buffers (NumPy
        arrays) are shared through shared memory and each task reads them in
        place, as read-only views. ``result()`` returns the value.

        Raises:
            ObjectStoreFullError: neither shared memory nor the spill
                directory has room; nothing was stored.
            RuntimeError: after ``shutdown``.
            pickle.PicklingError, TypeError: the value cannot be pickled.
        """
        owner = self._owner
        self._refuse_forked_copy()
        with self._shutdown_lock:
            self._check_open()
            if owner.thread is None:  # it frees what is stored when done
                owner.start()
        data = serialize.encode(value, owner.store, owner.dumps)
        future = Future()
        future._description = f"put({type(value).__qualname__})"
        future._set_encoded_result(data)
        return future

    def _check_open(self):
        """Raise if no new work may come (call with ``_shutdown_lock`` held)."""
        if self._owner.broken is not None:
            raise self._owner._broken_error()
        if self._shutdown_thread:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if lifetime.interpreter_exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None, progress=None):
        """Like ``map(fn, *iterables)``, run in the pool; results in input order.

        Args:
            timeout: seconds, counted from this call, for the whole iteration.
            chunksize: items per task (the function runs over a chunk in one
                worker call).
            buffersize: at most this many tasks are submitted ahead of the
                consumer (Python 3.14 semantics); None submits all at once.
            progress: keyword-only, a futurepool extension: True for a
                progress bar of the results as they are handed out (tqdm if
                installed, else a line on a terminal's stderr), a string for
                one with that description, or a tqdm-like class; see
                :mod:`futurepool.progress`. Default None: nothing.

        Raises:
            TimeoutError: when ``__next__`` is called and the result is not
                ready before the deadline.
            TypeError: ``progress`` is none of the values above.
        """
        return self._map(fn, iterables, timeout, chunksize, buffersize, progress, None)

    def _map(self, fn, iterables, timeout, chunksize, buffersize, progress, options):
        """``map``, its tasks with ``options`` (a ``calls.TaskOptions`` or None)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        end_time = None if timeout is None else timeout + time.monotonic()
        shown = None
        if progress is not None and _progress.wanted(progress):
            # The node forks before the display exists: tqdm starts a thread with
            # its first bar, and no thread of ours may be alive at that fork.
            self._start()
            shown = _progress.display(progress, _progress.total_of(iterables),
                                      _progress.describe(fn))
        if chunksize > 1:
            calls = ((columns,) for columns in _chunks(iterables, chunksize))
            call = functools.partial(_process_chunk, fn)
        else:
            calls = zip(*iterables)
            call = fn
        submit = self._submit
        try:
            if buffersize is None:
                fs = collections.deque(submit(call, args, {}, options) for args in calls)
                calls = None
            else:
                fs = collections.deque(submit(call, args, {}, options)
                                       for args in itertools.islice(calls, buffersize))
        except BaseException:
            if shown is not None:
                shown.close()
            raise
        results = _result_iterator(fs, end_time, calls, call, weakref.ref(self), options)
        if shown is not None:
            results = _progress.Counted(results, shown, len if chunksize > 1 else None)
        if chunksize > 1:
            return _flatten(results)
        return results

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop taking tasks; free the workers once pending work is done.

        Args:
            wait: block until every pending future has settled and every
                worker process has exited.
            cancel_futures: cancel the futures not yet sent to a worker.
        """
        self._stop(lambda owner: owner.request_shutdown(cancel_futures), wait)

    def terminate_workers(self):
        """Stop every worker now with SIGTERM (Python 3.14 API), and shut down.

        Pending futures are cancelled; running ones fail with
        :class:`~futurepool.errors.WorkerCrashedError`. Returns once the
        workers are gone.
        """
        self._stop_workers(signal.SIGTERM)

    def kill_workers(self):
        """As :meth:`terminate_workers`, with SIGKILL (Python 3.14 API)."""
        self._stop_workers(signal.SIGKILL)

    def _stop_workers(self, sig):
        self._stop(lambda owner: owner.request_terminate(sig), wait=True)

    def _stop(self, request, wait):
        """Refuse new tasks, ask the owner to stop (``request``), maybe wait."""
        owner = self._owner
        if owner.forked_copy:  # the parent's, not ours to stop (and its lock may be held)
            return
        with self._shutdown_lock:
            self._shutdown_thread = True
            if owner.thread is None:
                owner.close_unstarted()
                return
            request(owner)
        if wait:
            owner.join()
        self._shut_down = True

    def __exit__(self, exc_type, exc_val, exc_tb):
        # Ctrl-C in the with-block: do not wait for queued work (cpython#125886).
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate_workers()
        else:
            self.shutdown(wait=True)
        return False



def _flatten(chunks):
    """Chunk results, item by item; closing it closes (and cancels) the chunks."""
    try:
        for chunk in chunks:
            yield from chunk
    finally:
        chunks.close()


def _result_or_cancel(future, timeout=None):
    try:
        return future.result(timeout)
    finally:
        future.cancel()


def _result_iterator(fs, end_time, calls, call, executor_ref, options=None):
    """Yield results in order; submit more when bounded; cancel the rest when closed."""
    try:
        while fs:
            if calls is not None:
                executor = executor_ref()
                args = next(calls, None) if executor is not None else None
                if args is not None:
                    fs.append(executor._submit(call, args, {}, options))
                del executor
            # Yield straight from the call: holding the future (or the value)
            # in this frame while suspended would keep the result alive (bpo-14406).
            if end_time is None:
                yield _result_or_cancel(fs.popleft())
            else:
                yield _result_or_cancel(fs.popleft(), end_time - time.monotonic())
    finally:
        for future in fs:
            future.cancel()


class ExecutorOptions:
    """What :meth:`Executor.options` returns: its ``submit`` and ``map``, with options.

    A view, not a copy: it holds the executor and a validated set of
    options, and every task it submits carries them. The executor itself,
    and other views, are unaffected. Anything else (``shutdown``, ``put``,
    attributes) is the executor's.

    .. versionadded:: 0.1
    """

    __slots__ = ("_executor", "_options", "__weakref__")

    def __init__(self, executor, options):
        self._executor = executor
        self._options = options

    def submit(self, fn, /, *args, **kwargs):
        """:meth:`Executor.submit`, the task with this view's options."""
        return self._executor._submit(fn, args, kwargs, self._options)

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None, progress=None):
        """:meth:`Executor.map`, each task with this view's options.

        ``timeout`` is ``map``'s own (a deadline for the iteration, from this
        call), not the tasks': that one is set with ``options(timeout=...)``.
        """
        return self._executor._map(fn, iterables, timeout, chunksize, buffersize, progress,
                                   self._options)

    def options(self, **options):
        """A view with these options added to (or replacing) this view's."""
        return ExecutorOptions(self._executor, task_options(self._options, options))

    def __getattr__(self, name):
        if name.startswith("__"):  # (pickle and copy look these up on a bare instance)
            raise AttributeError(name)
        return getattr(self._executor, name)

    def __reduce__(self):
        # Passed to one of the executor's tasks: a handle with the same options.
        return _nested.handle_with_options, (self._executor, self._options)

    def __repr__(self) -> str:
        return f"<{self._options!r} of {self._executor!r}>"


ProcessPoolExecutor = Executor
