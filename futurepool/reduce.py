"""Reduce futures as they complete (Hoplite's reduce, under the stdlib's API).

``reduce_as_completed(executor, fn, futures)`` combines futures pairwise with
``fn`` as they finish, each combination a task of ``executor`` that takes
the two futures themselves as arguments, so the values go worker to worker
(and the task runs on the host that holds the most of its input bytes), never
through the caller. The first inputs to finish are combined first: a slow
input delays only the combinations that need it, and with ``first=k`` the
reduction takes the first ``k`` inputs and ignores the rest.

Works with any futurepool futures: an executor's, a ``put``'s, the futures a
task submits (pass ``current_executor()``), or futures returned by tasks.
"""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

from .future import Future

__all__ = ["reduce_as_completed"]


def reduce_as_completed(executor, fn, futures, *, first=None) -> Future:
    """Combine ``futures`` pairwise with ``fn(a, b)`` as they complete; one future.

    Args:
        executor: runs the combinations (an ``Executor``, an ``options()`` view of
            one, or inside a task ``futurepool.current_executor()``).
        fn: a function of two values returning one, associative and commutative
            (the order of combination follows completion, not the input order).
        futures: futurepool futures (or ``AsyncResult``-like futurepool futures).
        first: reduce only the first ``first`` inputs to complete; the others are
            ignored (not cancelled). Default: all.

    Returns:
        A :class:`futurepool.Future` of the reduced value, which can itself be passed
        to further tasks. It fails with the first exception an input or a
        combination raised, and is cancelled if an input it needed was.

    Raises:
        ValueError: no futures, or ``first`` not between 1 and their number.
        TypeError: ``fn`` is not callable.

    .. versionadded:: 0.1
    """
    futures = list(futures)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    if not futures:
        raise ValueError("reduce_as_completed() needs at least one future")
    wanted = len(futures) if first is None else first
    if isinstance(wanted, bool) or not isinstance(wanted, int) or \
            not 1 <= wanted <= len(futures):
        raise ValueError(f"first must be an integer from 1 to {len(futures)}, got {first!r}")
    reduction = _Reduction(executor, fn, wanted)
    for future in futures:
        future.add_done_callback(reduction.input_done)
    return reduction.result


class _Reduction:
    """The state of one reduction: done values wait here in pairs for ``fn``."""

    def __init__(self, executor, fn, wanted: int):
        self.executor = executor
        self.fn = fn
        self.lock = threading.Lock()
        self.inputs_left = wanted  # inputs still to take
        self.combines_left = wanted - 1  # combinations still to finish
        self.waiting = None  # a finished value with no partner yet
        self.result = Future()
        self.result._description = f"reduce_as_completed({getattr(fn, '__name__', fn)!r})"

    def input_done(self, future) -> None:
        with self.lock:
            if self.inputs_left == 0 or self.result.done():
                return  # a straggler past ``first``, or failed already
            self.inputs_left -= 1
        self._ready(future)

    def _combined(self, future) -> None:
        with self.lock:
            self.combines_left -= 1
        self._ready(future)

    def _ready(self, future) -> None:
        """``future`` finished: fail, pair it with a waiting one, or wait for a partner."""
        if future.cancelled():
            self._fail(CancelledError(f"an input of {self.result._description} was cancelled"))
            return
        error = future._exception  # (exception() would decode the value here)
        if error is not None:
            self._fail(error)
            return
        with self.lock:
            if self.combines_left == 0 and self.inputs_left == 0 and self.waiting is None:
                last = True
            else:
                last = False
                partner, self.waiting = self.waiting, (future if self.waiting is None else None)
        if last:
            self._finish(future)
            return
        if partner is None:
            return
        try:
            combined = self.executor.submit(self.fn, partner, future)
        except BaseException as exc:  # noqa: BLE001 - shut down, or broken: say so here
            self._fail(exc)
            return
        combined.add_done_callback(self._combined)

    def _finish(self, future) -> None:
        out = self.result
        out._borrows = getattr(future, "_borrows", None)
        try:
            out._set_encoded_result(future._payload())
        except BaseException:  # noqa: BLE001 - set already (failed meanwhile)
            pass

    def _fail(self, error: BaseException) -> None:
        try:
            self.result.set_exception(error)
        except BaseException:  # noqa: BLE001 - the first failure wins
            pass
