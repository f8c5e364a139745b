"""Progress displays: ``progress=`` on the maps, and :func:`as_completed` for futures.

``Executor.map``, ``Pool.map``, ``Pool.imap`` and ``Pool.imap_unordered``
take a keyword-only ``progress`` (a futurepool extension); :func:`as_completed`
is the stdlib's with the same keyword. Its values:

* ``None`` or ``False`` (the default): nothing is shown, and nothing is added
  to the call.
* ``True``: a tqdm bar on stderr if tqdm is installed (the ``progress``
  extra); else, when stderr is a terminal, a plain line on stderr at most
  every ``config.PROGRESS_INTERVAL`` seconds while results arrive, and a last
  one at the end; else nothing.
* a string: as ``True``, with this description (by default the function's
  name).
* a tqdm-like class, such as ``tqdm.notebook.tqdm``: called as
  ``progress(total=..., desc=...)``; what it returns gets ``update(n)`` and
  ``close()``.

What is counted is results reaching the caller: items as the iterator hands
them out (a failed one counts too), or, in the blocking ``Pool.map``, items
as their chunk completes. So the counting runs in the caller's thread, never
on the owner's I/O thread, where a bar writing to a slow terminal would hold
up every result. The lock around each display is for iterators shared by
threads.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import sys
import threading
import time
import types
import weakref

from . import config

__all__ = ["as_completed"]


def as_completed(fs, timeout=None, *, progress=None):
    """``concurrent.futures.as_completed``, showing how many of ``fs`` are done.

    Works with futures of any executor. Each future counts once it is
    yielded, so the display follows the loop that consumes them.

    Args:
        fs: the futures (duplicates count once, as in the stdlib).
        timeout: seconds, as in the stdlib: ``__next__`` raises
            ``TimeoutError`` if a future is not done by then.
        progress: see :mod:`futurepool.progress`; the default (None) shows
            nothing, which makes this exactly the stdlib function.

    Returns:
        An iterator of the futures in the order they complete.

    Raises:
        TypeError: ``progress`` is not a bool, a str or a tqdm-like class.

    .. versionadded:: 0.1
    """
    if progress is None:
        return concurrent.futures.as_completed(fs, timeout)
    fs = set(fs)
    shown = display(progress, len(fs), None)
    results = concurrent.futures.as_completed(fs, timeout)
    return results if shown is None else Counted(results, shown)


def wanted(progress) -> bool:
    """Whether ``progress`` asks for a display (which may still show nothing).

    Raises:
        TypeError: ``progress`` is not a bool, a str or a tqdm-like class.
    """
    if progress is None or progress is False:
        return False
    if progress is True or isinstance(progress, str) or callable(progress):
        return True
    raise TypeError(f"progress must be a bool, a str or a tqdm-like class, got {progress!r}")


def display(progress, total: int | None, desc: str | None):
    """The display ``progress`` asks for, of ``total`` items (None: unknown), or None.

    Raises:
        TypeError: ``progress`` is not a bool, a str or a tqdm-like class.
    """
    if not wanted(progress):
        return None
    if isinstance(progress, str):
        desc, progress = progress, True
    if progress is True:
        try:
            from tqdm import tqdm  # the optional extra: looked for at each call, not at import
        except ImportError:
            stream = sys.stderr
            return _Shown(_Lines(stream, total, desc)) if _is_terminal(stream) else None
        return _Shown(tqdm(total=total, desc=desc))
    return _Shown(progress(total=total, desc=desc))


def total_of(iterables) -> int | None:
    """Items ``zip(*iterables)`` yields, if every iterable knows its length."""
    try:
        return min(len(iterable) for iterable in iterables)
    except (TypeError, ValueError):  # a generator; or no iterable at all
        return None


def describe(fn) -> str:
    """A short description for a map of ``fn``: its name, or its type's."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def wait_counting(futures, shown) -> None:
    """Count each chunk's items as it completes, in the calling thread (``Pool.map``).

    Returns at the first failed or cancelled chunk: the caller's ``get()``
    raises for it at once, as without a display.
    """
    for future in concurrent.futures.as_completed(futures):
        if future.cancelled() or future.exception() is not None:
            return
        shown.update(len(future.result()))


class Counted:
    """The results of a map, each one counted on a display as it is handed out.

    ``weigh`` gives an item's count (``len``, for a chunk); by default 1. The
    display is closed when the results end, when this is closed, or when
    it is collected. No result is kept once returned (bpo-14406), and
    ``next(timeout)`` is passed on for ``imap``'s iterators.
    """

    def __init__(self, results, shown, weigh=None):
        self._results = results
        self._shown = shown
        self._weigh = weigh
        # Closes the display even when the caller abandons the iteration.
        self._end = weakref.finalize(self, shown.close)

    def __iter__(self):
        return self

    def next(self, timeout=None):
        results = self._results
        if timeout is not None and not hasattr(results, "next"):
            raise TypeError("this iterator takes no timeout")
        try:
            item = next(results) if timeout is None else results.next(timeout)
        except StopIteration:
            self._end()
            raise
        except BaseException as exc:
            if isinstance(results, types.GeneratorType) and results.gi_frame is None:
                self._end()  # Executor.map and as_completed end at their first error
            elif self._weigh is None and isinstance(exc, Exception) \
                    and not isinstance(exc, multiprocessing.TimeoutError):
                self._shown.update(1)  # imap goes on after a failed task: it is done too
            raise
        self._shown.update(1 if self._weigh is None else self._weigh(item))
        return item

    __next__ = next

    def close(self) -> None:
        """Close the display, and the results (which cancels what has not run)."""
        self._end()
        close = getattr(self._results, "close", None)
        if close is not None:
            close()


class _Shown:
    """A display behind a lock, closed once."""

    __slots__ = ("_target", "_lock", "_closed")

    def __init__(self, target):
        self._target = target
        # Reentrant: a collection that finalizes another display may run inside update().
        self._lock = threading.RLock()
        self._closed = False

    def update(self, n: int) -> None:
        with self._lock:
            if not self._closed:
                self._target.update(n)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._target.close()


class _Lines:
    """Without tqdm: a plain line on a terminal's stderr now and then, and a last one.

    One line each time, not a redrawn bar: it reads the same in a terminal,
    under ``script`` or in a pager.
    """

    def __init__(self, stream, total: int | None, desc: str | None):
        self._stream = stream
        self._total = total
        self._desc = desc or "futurepool"
        self._count = 0
        self._started = time.monotonic()
        self._due = self._started + config.PROGRESS_INTERVAL

    def update(self, n: int) -> None:
        self._count += n
        now = time.monotonic()
        if now >= self._due:
            self._due = now + config.PROGRESS_INTERVAL
            self._write(now)

    def close(self) -> None:
        self._write(time.monotonic())

    def line(self, now: float) -> str:
        """``square: 40/100 (40%) in 2.0 s, 20.0/s``; without a total, ``square: 40 in ...``."""
        elapsed = now - self._started
        rate = self._count / elapsed if elapsed > 0 else 0.0
        done = f"{self._count}"
        if self._total:
            done += f"/{self._total} ({100 * self._count / self._total:.0f}%)"
        return f"{self._desc}: {done} in {elapsed:.1f} s, {rate:.1f}/s"

    def _write(self, now: float) -> None:
        try:
            self._stream.write(self.line(now) + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # stderr closed: not a reason to fail the map
            pass


def _is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):  # no isatty, or closed
        return False
