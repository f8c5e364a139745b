"""Futures as task arguments: what futurepool adds to the stdlib's executor.

A :class:`futurepool.Future` passed to ``submit`` or ``map`` -- at the top
level or anywhere inside the arguments -- is waited for by the owner, and the
worker receives its value. A failed dependency fails its dependents with the
same exception, without running them; a cancelled one cancels them. Long
chains must neither recurse nor stall. Also here: the quality of the errors
that cross from a worker (tracebacks, exceptions that cannot be unpickled,
arguments that cannot be pickled).

futurepool only: the stdlib has no equivalent to compare with.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import pickle
import threading
import time
import traceback
from concurrent.futures.process import _RemoteTraceback

import pytest

import futurepool
from futurepool.testing import wait_until
from tests.conformance._tasks import (
    TwoArgumentError,
    add,
    block,
    echo,
    identity,
    inc,
    raise_two_argument_error,
    touch,
    wait_for_path,
)

TIMEOUT = 30.0
CHAIN_LENGTH = 10_000
CHAIN_TIMEOUT = 60.0


# --- tasks (module level: workers import them by name) ----------------------------


class DependencyError(Exception):
    """Raised by a dependency; its dependents must fail with it."""


class Box:
    """A user object with a future inside (pickled through its __dict__)."""

    def __init__(self, content):
        self.content = content


def same_object(x, y):
    return x is y


def unbox(box):
    return box.content


def fail_after(gate, message):
    wait_for_path(gate)
    raise DependencyError(message)


def fail(message):
    raise DependencyError(message)


def write_marker(path, *values):
    """The dependent whose running would be visible: it creates ``path``."""
    touch(path)
    return values


def outer_frame(message):
    return inner_frame(message)


def inner_frame(message):
    raise ValueError(message)  # the line the traceback must show


# --- fixtures ------------------------------------------------------------------


@pytest.fixture
def executor():
    ex = futurepool.Executor(max_workers=2)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def gates(executor, tmp_path):
    """Gate files; all opened before ``executor`` is shut down."""
    directory = tmp_path / "gates"
    directory.mkdir()
    made = []

    def new(name):
        path = str(directory / name)
        made.append(path)
        return path

    yield new
    for path in made:
        touch(path)


# --- futures as arguments --------------------------------------------------------


def test_future_as_positional_and_keyword_argument(executor):
    one = executor.submit(inc, 0)
    two = executor.submit(inc, one)
    assert executor.submit(add, one, y=two).result(timeout=TIMEOUT) == 3
    assert executor.submit(add, x=two, y=two).result(timeout=TIMEOUT) == 4
    # The caller's futures are untouched and still give their own values.
    assert (one.result(timeout=TIMEOUT), two.result(timeout=TIMEOUT)) == (1, 2)


def test_futures_nested_in_containers_and_objects(executor):
    a = executor.submit(identity, "a")
    b = executor.submit(identity, [1, 2])
    c = executor.submit(identity, {"k": "v"})
    nested = {"list": [a, (b, {"deep": [[c]]})], "tuple": (a,), "plain": 5}
    assert executor.submit(identity, nested).result(timeout=TIMEOUT) == {
        "list": ["a", ([1, 2], {"deep": [[{"k": "v"}]]})], "tuple": ("a",), "plain": 5,
    }
    assert executor.submit(unbox, Box([a, b])).result(timeout=TIMEOUT) == ["a", [1, 2]]
    # Deep nesting, a future at the bottom.
    deep = c
    for _ in range(50):
        deep = [deep]
    out = executor.submit(identity, deep).result(timeout=TIMEOUT)
    for _ in range(50):
        (out,) = out
    assert out == {"k": "v"}


def test_futures_in_map_arguments(executor):
    inputs = [executor.submit(identity, i) for i in range(10)]
    assert list(executor.map(inc, inputs, timeout=TIMEOUT)) == list(range(1, 11))
    assert list(executor.map(add, inputs, inputs, timeout=TIMEOUT, chunksize=3)) == [
        2 * i for i in range(10)]


def test_the_same_future_twice_is_one_value(executor):
    shared = executor.submit(identity, [1, 2, 3])
    assert executor.submit(add, shared, shared).result(timeout=TIMEOUT) == [1, 2, 3, 1, 2, 3]
    # As with any object passed twice, the task sees one object.
    assert executor.submit(same_object, shared, shared).result(timeout=TIMEOUT) is True
    assert executor.submit(echo, shared, k=shared).result(timeout=TIMEOUT) == (
        ([1, 2, 3],), {"k": [1, 2, 3]})


def test_future_of_one_executor_passed_to_another(executor):
    with futurepool.Executor(max_workers=1) as other:
        theirs = other.submit(inc, 41)
        assert executor.submit(inc, theirs).result(timeout=TIMEOUT) == 43
        mine = executor.submit(identity, "mine")
        assert other.submit(add, mine, "!").result(timeout=TIMEOUT) == "mine!"
    # The value outlives the executor that computed it.
    assert executor.submit(inc, theirs).result(timeout=TIMEOUT) == 43


def test_dependent_waits_for_a_pending_dependency(executor, gates):
    gate = gates("gate")
    slow = executor.submit(block, gate, None, 10)
    dependent = executor.submit(inc, slow)
    time.sleep(0.2)
    assert not dependent.done() and not dependent.running()
    touch(gate)
    assert dependent.result(timeout=TIMEOUT) == 11


def test_a_future_completed_by_hand_feeds_a_task(executor):
    # A futurepool.Future made by the caller works as a promise.
    promise = futurepool.Future()
    dependent = executor.submit(add, promise, 1)
    time.sleep(0.1)
    assert not dependent.done()
    promise.set_result(41)
    assert dependent.result(timeout=TIMEOUT) == 42

    broken = futurepool.Future()
    failing = executor.submit(add, [broken], 1)
    broken.set_exception(DependencyError("set by hand"))
    with pytest.raises(DependencyError, match="^set by hand$"):
        failing.result(timeout=TIMEOUT)


# --- failure and cancellation propagate ------------------------------------------------


def test_failed_dependency_fails_dependents_without_running_them(executor, gates, tmp_path):
    gate = gates("gate")
    failing = executor.submit(fail_after, gate, "upstream broke")
    marker1, marker2, marker3 = (str(tmp_path / f"ran-{i}") for i in range(3))
    direct = executor.submit(write_marker, marker1, failing)
    nested = executor.submit(write_marker, marker2, {"inputs": [direct]})
    touch(gate)
    for future in (failing, direct, nested):
        with pytest.raises(DependencyError, match="^upstream broke$"):
            future.result(timeout=TIMEOUT)
    # A dependent submitted after the failure fails just the same.
    late = executor.submit(write_marker, marker3, failing)
    with pytest.raises(DependencyError, match="^upstream broke$"):
        late.result(timeout=TIMEOUT)
    # Control: the same dependent of a future that succeeds does leave its marker.
    control = str(tmp_path / "control")
    assert executor.submit(write_marker, control, executor.submit(inc, 1)).result(
        timeout=TIMEOUT) == (2,)
    executor.shutdown(wait=True)  # anything that was going to run has run
    assert os.path.exists(control)
    assert not any(os.path.exists(m) for m in (marker1, marker2, marker3)), "a dependent ran"


def test_cancelling_a_pending_dependency_cancels_dependents(tmp_path):
    gate = str(tmp_path / "gate")
    started = str(tmp_path / "started")
    markers = [str(tmp_path / f"ran-{i}") for i in range(3)]
    with futurepool.Executor(max_workers=1) as ex:
        try:
            busy = ex.submit(block, gate, started, "busy")
            fillers = [ex.submit(identity, i) for i in range(2)]  # the worker's queue
            dependency = ex.submit(identity, "never")
            direct = ex.submit(write_marker, markers[0], dependency)
            nested = ex.submit(write_marker, markers[1], [(direct,)])
            assert wait_until(lambda: os.path.exists(started), TIMEOUT)
            assert dependency.cancel() is True
            assert wait_until(lambda: direct.cancelled() and nested.cancelled(), TIMEOUT), (
                direct, nested)
            # A dependent of an already cancelled future is cancelled too.
            late = ex.submit(write_marker, markers[2], dependency)
            assert wait_until(late.cancelled, TIMEOUT), late
            for future in (direct, nested, late):
                with pytest.raises(cf.CancelledError):
                    future.result(timeout=0)
        finally:
            touch(gate)
        assert busy.result(timeout=TIMEOUT) == "busy"
        assert [f.result(timeout=TIMEOUT) for f in fillers] == [0, 1]
    assert not any(os.path.exists(m) for m in markers), "a dependent of a cancelled future ran"


# --- long chains -------------------------------------------------------------------


def test_a_chain_of_ten_thousand_dependent_tasks(executor):
    started = time.monotonic()
    future = executor.submit(inc, 0)
    for _ in range(CHAIN_LENGTH - 1):
        future = executor.submit(inc, future)
    assert future.result(timeout=CHAIN_TIMEOUT) == CHAIN_LENGTH
    # Releasing the chain must not recurse either.
    del future
    gc.collect()
    assert time.monotonic() - started < CHAIN_TIMEOUT
    assert executor.submit(inc, 1).result(timeout=TIMEOUT) == 2


def test_a_failing_chain_of_ten_thousand_fails_every_link(executor):
    head = executor.submit(fail, "head failed")
    chain = [head]
    for _ in range(CHAIN_LENGTH):
        chain.append(executor.submit(inc, chain[-1]))
    assert isinstance(chain[-1].exception(timeout=CHAIN_TIMEOUT), DependencyError)
    kinds = {type(f.exception(timeout=TIMEOUT)) for f in chain}
    assert kinds == {DependencyError}
    del chain, head
    gc.collect()
    assert executor.submit(inc, 1).result(timeout=TIMEOUT) == 2


# --- pickling a future outside a task ------------------------------------------------


def test_pickling_a_future_outside_a_task_is_a_clear_type_error(executor):
    future = executor.submit(inc, 1)
    for dumps in (pickle.dumps, lambda f: pickle.dumps([f], protocol=2)):
        with pytest.raises(TypeError, match="futurepool.Future can only be pickled as an argument"):
            dumps(future)
    assert future.result(timeout=TIMEOUT) == 2
    with pytest.raises(TypeError, match="future.result()"):
        pickle.dumps(future)  # the message says how to send the value instead


# --- errors that cross from a worker ------------------------------------------------


def test_task_traceback_shows_the_worker_frames(executor):
    error = executor.submit(outer_frame, "deep").exception(timeout=TIMEOUT)
    assert type(error) is ValueError and error.args == ("deep",)
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    # Real frames from the worker, with their source lines ...
    assert "in inner_frame" in text and "in outer_frame" in text
    assert "raise ValueError(message)  # the line the traceback must show" in text
    assert __file__ in text
    names = []
    tb = error.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert names[-2:] == ["outer_frame", "inner_frame"], names
    # ... and the stdlib's text form, as ProcessPoolExecutor chains it.
    assert isinstance(error.__cause__, _RemoteTraceback)
    assert "in inner_frame" in str(error.__cause__)
    assert "raise ValueError(message)" in str(error.__cause__)
    # Raising it again from result() keeps the worker frames.
    try:
        executor.submit(outer_frame, "again").result(timeout=TIMEOUT)
    except ValueError:
        shown = traceback.format_exc()
    assert "in inner_frame" in shown and "in outer_frame" in shown


def test_exception_that_cannot_be_unpickled_becomes_a_remote_error(executor):
    # Intended difference: the stdlib breaks the whole pool here
    # (BrokenProcessPool); futurepool fails this future with a surrogate.
    future = executor.submit(raise_two_argument_error)
    with pytest.raises(futurepool.RemoteError) as info:
        future.result(timeout=TIMEOUT)
    error = info.value
    assert isinstance(error, futurepool.FuturePoolError)
    assert error.type_name == f"{TwoArgumentError.__module__}.{TwoArgumentError.__qualname__}"
    assert error.message == "only the first survives"
    assert "TwoArgumentError" in str(error) and "only the first survives" in str(error)
    assert "in raise_two_argument_error" in error.traceback_text
    assert 'raise TwoArgumentError("only the first survives", "second")' in error.traceback_text
    assert isinstance(error.__cause__, _RemoteTraceback)
    assert pickle.loads(pickle.dumps(error)).type_name == error.type_name
    # Only that future failed.
    assert executor.submit(inc, 1).result(timeout=TIMEOUT) == 2


def _notes(exc) -> str:
    return "\n".join(getattr(exc, "__notes__", ()))


def test_unpicklable_argument_fails_that_future_naming_the_argument(executor):
    lock = threading.Lock()
    # As with the stdlib, the pickler's own exception (TypeError for a lock);
    # futurepool adds a note naming the argument.
    positional = executor.submit(echo, 1, lock)
    assert positional.done(), "nothing may be sent: the future fails in submit()"
    with pytest.raises(TypeError) as info:
        positional.result(timeout=0)
    assert "argument 1" in _notes(info.value) and "echo" in _notes(info.value)

    keyword = executor.submit(echo, 1, guard=lock)
    with pytest.raises(TypeError) as info:
        keyword.result(timeout=0)
    assert "keyword argument 'guard'" in _notes(info.value)

    inside = executor.submit(echo, [1, {"x": lock}])
    with pytest.raises(TypeError) as info:
        inside.result(timeout=0)
    assert "argument 0" in _notes(info.value)

    # The pool keeps working, also with futures among the arguments.
    one = executor.submit(inc, 0)
    assert executor.submit(add, one, 1).result(timeout=TIMEOUT) == 2
    mixed = executor.submit(echo, one, lock)
    with pytest.raises(TypeError) as info:
        mixed.result(timeout=0)
    assert "argument 1" in _notes(info.value)
    assert one.result(timeout=TIMEOUT) == 1


def test_unpicklable_argument_with_a_pending_future_dependency(executor, gates):
    gate = gates("gate")
    pending = executor.submit(block, gate, None, 5)
    bad = executor.submit(echo, pending, threading.Lock())
    with pytest.raises(TypeError) as info:
        bad.result(timeout=0)
    assert "argument 1" in _notes(info.value)
    touch(gate)
    assert executor.submit(inc, pending).result(timeout=TIMEOUT) == 6
