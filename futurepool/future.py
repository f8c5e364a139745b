"""``futurepool.Future``: a ``concurrent.futures.Future`` that is also a value.

It subclasses the stdlib class, so ``concurrent.futures.wait`` and
``as_completed`` accept it, alone or mixed with stdlib futures. What it adds:

* **It can be passed to another task.** Among a task's arguments (at any
  depth) it pickles as a reference; the task waits for it at the owner and
  the worker receives the value. The caller never fetches it.
* **Its result stays serialized until asked for.** The owner keeps the bytes
  the worker sent; ``result()`` unpickles them once, in the caller's thread.
  A value that only feeds other tasks is never unpickled in the driver, and
  a result that fails to unpickle fails this future only, with
  :class:`~futurepool.errors.UnpicklingFailedError` naming the result.
* A done-callback that raises, even ``SystemExit``, is logged and the others
  still run: it can never take down the owner's I/O thread.
* :meth:`Future.stop` stops a task that is already running (``cancel()``
  keeps the stdlib's contract: pending tasks only).
"""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import Future as _StdFuture
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED, RUNNING

from .errors import ObjectLostError, UnpicklingFailedError
from .store import serialize
from .store.objects import Rebuilt, view_of

__all__ = ["Future"]

LOGGER = logging.getLogger("concurrent.futures")

_object_ids = itertools.count(1)
#: Times ``result()`` decodes again after a lost piece was rebuilt (each rebuild also
#: counts against ``max_reconstructions``, which bounds it first).
_REDECODES = 16
_DONE_STATES = ("CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED")


class _Encoded:
    """A result still in its pickled form (``serialize.encode``)."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


class Future(_StdFuture):
    """The result of a task submitted to :class:`futurepool.Executor`.

    Everything ``concurrent.futures.Future`` offers works the same way;
    additionally a Future may be passed as an argument to ``submit`` or
    ``map``, anywhere inside the arguments.

    .. versionadded:: 0.1
    """

    def __init__(self):
        super().__init__()
        self.object_id = next(_object_ids)
        self._description = None
        self._encoded = None
        self._stop_via = None  # the owner's request_stop, once submitted
        self._task_id = 0
        self._borrows = None  # where futures inside the result register (core.nested)

    def __reduce__(self):
        if serialize.collect_references(self):
            return serialize.resolve_reference, (self.object_id,)
        raise TypeError(
            "futurepool.Future can only be pickled as an argument of a task submitted to a"
            " futurepool executor, where it stands for its result; pass future.result() to"
            " send the value itself")

    def stop(self) -> bool:
        """Stop the task, even if it is already running; True if it will not complete.

        A pending task is cancelled, as by :meth:`cancel`. A running one is
        interrupted in its worker the way a timeout interrupts it
        (``options(timeout=...)``): a ``CancelledError`` is raised inside the
        task, so its ``finally`` blocks and context managers run, and if it
        has not ended ``config.INTERRUPT_GRACE`` seconds later (0.5) its
        worker is killed and replaced. Either way the future is cancelled at
        once: ``cancelled()`` is True and ``result()`` raises
        ``CancelledError``; the task itself ends shortly after, on whichever
        host it runs. Other tasks are untouched. A task that already
        finished is not affected, and False is returned.

        Returns:
            True if the future is now cancelled, False if it had finished.

        .. versionadded:: 0.1
        """
        if self.cancel():
            return True
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state != RUNNING:  # cancelled by now (by cancel(), or another stop)
                return True
            # Notified at once: no executor will call set_running_or_notify_cancel()
            # for a task that already ran, and wait()/as_completed() wait for that.
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        if self._stop_via is not None:
            self._stop_via(self._task_id)
        self._invoke_callbacks()
        return True

    # -- set by the owner -----------------------------------------------------

    def _set_encoded_result(self, data) -> None:
        self._encoded = data
        self.set_result(_Encoded(data))

    def _replace_encoded(self, data) -> None:
        """A lost result rebuilt (``core.lineage``): its new pieces replace the old ones.

        The future stays the same object, done, for the user and for dependents.
        Called by the owner's I/O thread without the lock: a ``result()`` decoding the
        old pieces meanwhile holds it, and retries with these when told (:class:`Rebuilt`).
        """
        self._encoded = data
        value = self._result
        if type(value) is _Encoded:
            value.data = data

    def _payload(self):
        """The encoded result, for a dependent task (the future is done, not failed)."""
        if self._encoded is not None:
            return self._encoded
        return serialize.dumps(self._result)  # set_result() called directly by a user

    # -- read by the user -----------------------------------------------------

    def _wait(self, timeout=None) -> bool:
        """Wait until done (or cancelled); True if it is. Decodes nothing."""
        with self._condition:
            if self._state in _DONE_STATES:
                return True
            self._condition.wait(timeout)
            return self._state in _DONE_STATES

    def result(self, timeout=None):
        value = super().result(timeout)
        if type(value) is _Encoded:
            value = self._decode()
        return value

    def exception(self, timeout=None):
        exc = super().exception(timeout)
        if exc is None and type(self._result) is _Encoded:
            try:
                self._decode()
            except UnpicklingFailedError as error:
                return error
        return exc

    def _decode(self):
        with self._condition:
            value = self._result
            if type(value) is not _Encoded:
                return value
            try:
                for _ in range(_REDECODES):  # a piece lost, rebuilt meanwhile: the new ones
                    try:
                        if self._borrows is None:
                            self._result = serialize.decode(value.data, view_of)
                        else:
                            self._result = serialize.decode_for(value.data, view_of,
                                                                self._borrows)
                        break
                    except Rebuilt:
                        continue
                else:
                    raise ObjectLostError(
                        f"The result of {self._description or 'the task'} was lost and rebuilt"
                        f" {_REDECODES} times while it was being read.")
            except (KeyboardInterrupt, ObjectLostError):
                raise
            except BaseException as exc:  # noqa: BLE001 - __setstate__ may even sys.exit()
                error = UnpicklingFailedError(
                    f"The result of {self._description or 'the task'} could not be unpickled"
                    f" in the caller: {type(exc).__name__}: {exc}. The task itself succeeded;"
                    " check that the result's type can be imported here and that its"
                    " __reduce__/__setstate__ work.", what="result")
                error.__cause__ = exc
                raise error from exc
            return self._result

    def _invoke_callbacks(self):
        for callback in self._done_callbacks:
            try:
                callback(self)
            except BaseException:  # noqa: BLE001 - SystemExit must not kill the I/O thread
                LOGGER.exception("exception calling callback for %r", self)
