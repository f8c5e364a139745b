"""The worker crash matrix: FAULTS.md §3 group A, items 1-16.

Every scenario runs real processes: a ``futurepool.Executor``, its node and
its forked workers. The ways a process can fail live in
:mod:`tests.faults._crashers` (workers import it by name); this module puts
them at each point of the loky / CPython matrix and checks what FAULTS.md
expects, then the invariants of §2 that apply to every scenario:

* the executor still works (:func:`assert_usable`) unless the scenario
  breaks it on purpose (a failing initializer, item 14);
* every future settled, none twice (:func:`assert_settled`, and the
  ``settled_once`` fixture that watches the owner's log for a second
  settlement);
* errors say what happened (:func:`assert_crash_error`: task, worker id,
  pid, host, signal or exit code, the OOM hint for SIGKILL).

Leaked processes, threads and run directories are the autouse fixtures' job
(tests/conftest.py). Crash kinds form one table (``FATAL``), reused for a
crash in the task (items 1-3), with a retry (item 1), at the unpickling
point (item 6) and from a done-callback (item 16), as STYLE.md §13 asks.

Where FAULTS.md is open to two readings, the tests take the one a
``ProcessPoolExecutor`` user would expect; each such choice is spelled out in
the test's docstring.

Every wait has a deadline. ``TIMEOUT`` bounds anything that should take
milliseconds; ``REPLACE_TIMEOUT`` bounds the node's replacement of a dead
worker (generous, so that a backed-off respawn still counts as a respawn).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback

import psutil
import pytest

import futurepool
from futurepool.testing import descendants, kill_processes, wait_until

from . import _crashers as C

#: Seconds any single result, or the settling of a batch, may take.
TIMEOUT = 30.0
#: Seconds the node gets to replace a dead worker.
REPLACE_TIMEOUT = 10.0
#: Seconds the executor gets to shut down at the end of a test.
SHUTDOWN_TIMEOUT = 30.0

HOST = os.uname().nodename

#: The fatal crash kinds: (kind, the WorkerCrashedError.cause it must produce).
#: "sigkill" is sent by the test to the pid the task reports (item 1); the
#: others are done by the task to itself.
FATAL = [
    pytest.param("sigkill", "SIGKILL", id="sigkill"),
    pytest.param("segfault", "SIGSEGV", id="segfault"),
    pytest.param("os_exit", f"EXIT({C.OS_EXIT_CODE})", id="os_exit"),
    pytest.param("libc_exit", f"EXIT({C.LIBC_EXIT_CODE})", id="libc_exit"),
    pytest.param("abort", "SIGABRT", id="abort"),
]


# --- fixtures and helpers ---------------------------------------------------------------


def _shutdown_within(executor: futurepool.Executor, timeout: float) -> None:
    """Shut ``executor`` down; fail (with every thread's stack) if it hangs.

    Queued futures are cancelled so that a test that already failed does not
    wait for its backlog; the tests check settlement themselves, before this.
    """
    executor.shutdown(wait=False, cancel_futures=True)
    owner = executor._owner
    owner.join(timeout)
    if owner.thread is None or not owner.thread.is_alive():
        return
    frames = sys._current_frames()
    stacks = "\n".join(
        f"--- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
        for t in threading.enumerate() if t.ident in frames)
    if owner.node is not None:  # let the leak check see a clean slate
        try:
            node = psutil.Process(owner.node.pid)
            kill_processes([node, *descendants(node)])
        except psutil.NoSuchProcess:
            pass
    pytest.fail(f"the executor did not shut down within {timeout} s:\n{stacks}")


@pytest.fixture
def make_executor():
    """``make_executor(max_workers, **kwargs)``: an Executor shut down after the test."""
    made = []

    def make(max_workers=2, **kwargs):
        executor = futurepool.Executor(max_workers, **kwargs)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        _shutdown_within(executor, SHUTDOWN_TIMEOUT)


@pytest.fixture
def settled_once(caplog):
    """Fails the test if the owner ever tried to settle a future a second time.

    A second ``set_result``/``set_exception`` raises ``InvalidStateError``,
    which the owner catches and logs (at DEBUG or ERROR) on "futurepool".
    """
    caplog.set_level(logging.DEBUG, logger="futurepool")
    yield
    twice = [r for r in caplog.get_records("call")
             if r.name.startswith("futurepool") and r.exc_info
             and isinstance(r.exc_info[1], cf.InvalidStateError)]
    assert not twice, [r.getMessage() for r in twice]


def assert_usable(executor) -> None:
    """§2: the executor still runs a trivial task."""
    assert executor.submit(C.add, 2, 3).result(timeout=TIMEOUT) == 5


def assert_settled(futures, timeout: float = TIMEOUT) -> None:
    """§2: every future settled before its deadline."""
    done, pending = cf.wait(futures, timeout=timeout)
    assert not pending, f"{len(pending)} of {len(futures)} futures still pending after {timeout} s"


def assert_crash_error(exc, *, cause: str, fn, pid: int | None = None) -> None:
    """§2 error quality for a dead worker: what died, where, how, running what."""
    assert isinstance(exc, futurepool.WorkerCrashedError), repr(exc)
    assert isinstance(exc, BrokenProcessPool)
    message = str(exc)
    assert exc.cause == cause, message
    assert cause in message
    assert exc.task and exc.task in message, message
    assert fn.__qualname__ in exc.task, exc.task
    assert exc.worker_id is not None and f"worker {exc.worker_id}" in message, message
    assert exc.pid and f"pid {exc.pid}" in message, message
    assert exc.host == HOST and HOST in message, message
    if pid is not None:
        assert exc.pid == pid, f"error names pid {exc.pid}, the task ran in {pid}"
    if cause.startswith("SIG"):
        assert (exc.signal_name, exc.exitcode) == (cause, None)
    else:
        assert (exc.signal_name, exc.exitcode) == (None, int(cause[5:-1]))
    if cause == "SIGKILL":
        assert "out-of-memory killer" in message, message


def read_pid(path, timeout: float = TIMEOUT) -> int:
    """The pid a task wrote to ``path`` (atomically), once it is there."""
    assert wait_until(lambda: os.path.exists(path), timeout), f"no task wrote {path}"
    with open(path) as f:
        return int(f.read())


def _ready_pids(executor) -> set[int]:
    """Pids of the workers the owner knows as alive (read from its I/O thread's table)."""
    for _ in range(100):
        try:
            return {w.pid for w in list(executor._owner.scheduler.workers.values()) if w.alive}
        except RuntimeError:  # the table changed while we copied it
            continue
    raise AssertionError("could not read the owner's worker table")


def _node(executor) -> psutil.Process:
    assert wait_until(lambda: executor._owner.node is not None, TIMEOUT), "no node started"
    return psutil.Process(executor._owner.node.pid)


def _node_worker_pids(executor) -> set[int]:
    """Live (not zombie) children of the executor's node: its worker processes."""
    pids = set()
    for child in _node(executor).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def wait_for_workers(executor, count: int, *, without=(), timeout: float = REPLACE_TIMEOUT):
    """Wait until ``count`` workers are up and ready, none of them in ``without``.

    "Up" is seen from both sides: the node has ``count`` live children and
    the owner has ``count`` ready workers, with the same pids.
    """
    without = set(without)

    def full() -> bool:
        ready = _ready_pids(executor)
        return (len(ready) == count and not ready & without
                and _node_worker_pids(executor) == ready)

    if not wait_until(full, timeout):
        pytest.fail(f"expected {count} live workers (not {sorted(without)}) within {timeout} s;"
                    f" the owner has {sorted(_ready_pids(executor))}, the node's children are"
                    f" {sorted(_node_worker_pids(executor))}")
    return _ready_pids(executor)


def warm_up(executor, count: int) -> set[int]:
    """Start the pool and wait until all ``count`` workers are ready; their pids."""
    assert_usable(executor)
    return wait_for_workers(executor, count, timeout=TIMEOUT)


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ProcessSampler:
    """Records every descendant process seen (pid -> parent pid), every few milliseconds.

    Counts respawns: a respawn storm shows up as many distinct children of
    the node. (Only the node's direct children are workers: a worker may
    run short-lived helpers of its own.)
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.seen: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in descendants():
                if proc.pid not in self.seen:
                    try:
                        self.seen[proc.pid] = proc.ppid()
                    except psutil.NoSuchProcess:
                        pass
            self._stop.wait(self.interval)

    def children_of(self, pid: int) -> set[int]:
        return {child for child, parent in self.seen.items() if parent == pid}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()


# --- items 1-3: a worker dies while running a task ----------------------------------------


@pytest.mark.parametrize("kind, cause", FATAL)
def test_fatal_crash_fails_only_its_future(make_executor, tmp_path, settled_once, kind, cause):
    """Items 1-3: SIGKILL (by the test), segfault, os._exit(3), libc exit(0), abort.

    The crashing task's future fails with WorkerCrashedError naming the dead
    worker, and so does a task depending on it; the tasks running on the
    other worker and the ones queued behind the crash complete; the node
    replaces the worker.
    """
    executor = make_executor(2)
    first_pids = warm_up(executor, 2)
    pid_file = str(tmp_path / "victim.pid")
    task_kind = "wait_for_kill" if kind == "sigkill" else kind
    victim = executor.submit(C.crash_after_reporting, pid_file, task_kind)
    dependent = executor.submit(C.identity, victim)
    others = [executor.submit(C.pid_after, 0.2) for _ in range(4)]
    victim_pid = read_pid(pid_file)
    assert victim_pid in first_pids
    if kind == "sigkill":
        os.kill(victim_pid, signal.SIGKILL)

    exc = victim.exception(timeout=TIMEOUT)
    assert_crash_error(exc, cause=cause, fn=C.crash_after_reporting, pid=victim_pid)
    assert exc.deaths == 1
    # A task that depends on the crashed one fails with the same error, without running.
    dependent_exc = dependent.exception(timeout=TIMEOUT)
    assert isinstance(dependent_exc, futurepool.WorkerCrashedError), repr(dependent_exc)
    assert dependent_exc.task == exc.task
    assert_settled(others)
    assert all(isinstance(f.result(), int) for f in others)
    later = [executor.submit(C.get_pid) for _ in range(4)]
    assert_settled(later)
    assert victim_pid not in {f.result() for f in later}
    # The node started a replacement: two workers again, the dead one not among them.
    wait_for_workers(executor, 2, without={victim_pid})
    assert not pid_alive(victim_pid)
    assert_usable(executor)


def test_segfault_leaves_a_faulthandler_traceback(make_executor, capfd):
    """Item 2: the segfaulting worker's Python traceback is in the error or the node's log.

    The node's stderr (and so its workers') is the driver's, captured here
    with ``capfd``; faulthandler prints "Fatal Python error: Segmentation
    fault" and the stack, which must name the function that crashed.
    """
    executor = make_executor(1)
    future = executor.submit(C.crash, "segfault")
    exc = future.exception(timeout=TIMEOUT)
    assert_crash_error(exc, cause="SIGSEGV", fn=C.crash)
    assert_usable(executor)
    stderr = capfd.readouterr().err
    found = [text for text in (str(exc), stderr)
             if "Segmentation fault" in text and "in crash" in text]
    assert found, ("no faulthandler traceback of the worker, neither in the error nor in"
                   f" the node's stderr:\nerror: {exc}\nstderr: {stderr[-2000:]!r}")


@pytest.mark.parametrize("kind, cause", [("segfault", "SIGSEGV"),
                                         ("os_exit", f"EXIT({C.OS_EXIT_CODE})")])
def test_result_sent_just_before_a_crash_is_delivered(make_executor, settled_once, kind, cause):
    """Items 1-3: a task that finished is not blamed for the next task's crash.

    One worker holds two tasks: one returning 16 MiB, then one that crashes
    as soon as it starts. The first finished and its result was handed to
    zmq before the second began, but zmq sends from a background thread: a
    big message is still being written when the process dies. Only the
    crashing task's future may fail. The first must succeed (its result
    delivered, or the task re-run); it must not get the crash, and the
    crashing task must not be re-queued as if it had never started.
    """
    executor = make_executor(1)
    warm_up(executor, 1)
    size = 16 << 20
    finished = executor.submit(C.big_result, size)
    crashing = executor.submit(C.crash, kind)
    assert_settled([finished, crashing])
    exc = finished.exception()
    assert exc is None, f"the task that finished before the crash failed: {exc!r}"
    assert len(finished.result()) == size
    assert_crash_error(crashing.exception(), cause=cause, fn=C.crash)
    assert_usable(executor)


@pytest.mark.parametrize("kind, cause", FATAL)
def test_crashed_task_is_retried_once(make_executor, tmp_path, settled_once, kind, cause):
    """Item 1 with ``max_retries=1`` (and every other fatal kind): re-run once, then succeed."""
    executor = make_executor(2, max_retries=1)
    warm_up(executor, 2)
    marker = str(tmp_path / "first-attempt.pid")
    task_kind = "wait_for_kill" if kind == "sigkill" else kind
    future = executor.submit(C.crash_once, marker, task_kind)
    bystanders = [executor.submit(C.pid_after, 0.1) for _ in range(3)]
    first_pid = read_pid(marker)
    if kind == "sigkill":
        os.kill(first_pid, signal.SIGKILL)
    status, second_pid = future.result(timeout=TIMEOUT)
    assert status == "recovered"
    assert second_pid != first_pid  # really re-run, in another worker
    assert_settled(bystanders)
    assert all(isinstance(f.result(), int) for f in bystanders)
    wait_for_workers(executor, 2, without={first_pid})
    assert_usable(executor)


# --- items 4-5: the task ends by raising ------------------------------------------------


def test_sys_exit_in_task_is_reraised_and_worker_survives(make_executor):
    """Item 4: SystemExit comes back from result(), as with the stdlib; same worker after."""
    executor = make_executor(1)
    pid = executor.submit(C.get_pid).result(timeout=TIMEOUT)
    future = executor.submit(C.crash, "sys_exit")
    with pytest.raises(SystemExit) as info:
        future.result(timeout=TIMEOUT)
    assert info.value.code == C.SYS_EXIT_CODE
    assert isinstance(info.value.__cause__, _RemoteTraceback)
    assert executor.submit(C.get_pid).result(timeout=TIMEOUT) == pid
    assert pid_alive(pid)


def test_exception_keeps_type_and_remote_traceback(make_executor, settled_once):
    """Item 5: same type and message, remote traceback as __cause__ and as real frames.

    Dependent futures (a chain of two) fail with the same exception without
    running; the worker is unaffected.
    """
    executor = make_executor(1)
    pid = executor.submit(C.get_pid).result(timeout=TIMEOUT)
    failing = executor.submit(C.raise_error, "the message")
    dependent = executor.submit(C.identity, failing)
    dependent_of_dependent = executor.submit(C.add, dependent, 1)
    assert_settled([failing, dependent, dependent_of_dependent])

    with pytest.raises(C.CrashTestError, match="the message") as info:
        failing.result(timeout=TIMEOUT)
    exc = info.value
    cause = exc.__cause__
    assert isinstance(cause, _RemoteTraceback)
    assert "raise_error" in str(cause) and "the message" in str(cause)
    frames = traceback.extract_tb(exc.__traceback__)
    assert any(f.name == "raise_error" and f.filename.endswith("_crashers.py") for f in frames), \
        [(f.filename, f.name) for f in frames]
    for future in (dependent, dependent_of_dependent):
        with pytest.raises(C.CrashTestError, match="the message"):
            future.result(timeout=TIMEOUT)
    assert executor.submit(C.get_pid).result(timeout=TIMEOUT) == pid


# --- item 6: a crash at each (un)pickling point --------------------------------------------

#: (point, crash kind, outcome). Outcomes: "pickling" (PicklingError),
#: "arguments"/"result" (UnpicklingFailedError.what), "exit" (SystemExit) or
#: a WorkerCrashedError cause. The driver-side points only raise or exit:
#: a segfault there would take the test process with it.
PICKLING_POINTS = [
    ("call_pickle", "raise", "pickling"),
    ("call_pickle", "sys_exit", "pickling"),
    ("call_unpickle", "raise", "arguments"),
    ("call_unpickle", "sys_exit", "arguments"),
    ("call_unpickle", "segfault", "SIGSEGV"),
    ("call_unpickle", "os_exit", f"EXIT({C.OS_EXIT_CODE})"),
    ("call_unpickle", "libc_exit", f"EXIT({C.LIBC_EXIT_CODE})"),
    ("result_pickle", "raise", "pickling"),
    ("result_pickle", "sys_exit", "exit"),
    ("result_pickle", "segfault", "SIGSEGV"),
    ("result_pickle", "os_exit", f"EXIT({C.OS_EXIT_CODE})"),
    ("result_unpickle", "raise", "result"),
    ("result_unpickle", "sys_exit", "result"),
]

_ORIGINAL_TYPE = {"raise": C.CrashTestError, "sys_exit": SystemExit}


def _submit_at(executor, point: str, kind: str):
    if point == "call_pickle":
        return executor.submit(C.identity, C.CrashOnPickle(kind)), C.identity
    if point == "call_unpickle":
        return executor.submit(C.identity, C.CrashOnUnpickle(kind)), C.identity
    if point == "result_pickle":
        return executor.submit(C.return_instance, C.CrashOnPickle, kind), C.return_instance
    if point == "result_unpickle":
        return executor.submit(C.return_instance, C.CrashOnUnpickle, kind), C.return_instance
    raise ValueError(point)


@pytest.mark.parametrize("point, kind, outcome",
                         [pytest.param(*row, id="-".join(row[:2])) for row in PICKLING_POINTS])
def test_crash_at_pickling_point_fails_only_that_future(make_executor, settled_once,
                                                        point, kind, outcome):
    """Item 6: only the future whose call or result failed to (un)pickle fails.

    A pickling failure in the driver fails the returned future (submit does
    not raise, even for ``sys.exit`` in ``__reduce__``: a ProcessPoolExecutor
    user never sees submit raise for a pickling problem, and FAULTS.md asks
    for PicklingError on that future). Non-fatal failures in the worker
    leave the worker in place (same pid after); the pool is never broken.
    """
    executor = make_executor(1)
    pid = executor.submit(C.get_pid).result(timeout=TIMEOUT)
    # Settled first: a result still in flight when a crash follows is another
    # scenario (test_result_sent_just_before_a_crash_is_delivered).
    assert executor.submit(C.pid_after, 0.01).result(timeout=TIMEOUT) == pid
    try:
        future, fn = _submit_at(executor, point, kind)
    except BaseException as exc:  # noqa: BLE001 - SystemExit too: that is the failure
        pytest.fail(f"submit() raised {type(exc).__name__}: {exc!r}; the future should fail")
    after = executor.submit(C.pid_after, 0.05)
    assert_settled([future, after])

    exc = future.exception(timeout=TIMEOUT)
    if outcome == "pickling":
        if point == "call_pickle":
            # In the driver, as with the stdlib, the pickler's own exception,
            # with a note naming the argument; a SystemExit from __reduce__
            # becomes a PicklingError (it must not end the caller).
            if kind == "sys_exit":
                assert type(exc) is pickle.PicklingError, repr(exc)
                assert isinstance(exc.__cause__, SystemExit), repr(exc.__cause__)
                message = str(exc)
            else:
                assert type(exc) is _ORIGINAL_TYPE[kind], repr(exc)
                message = "\n".join(getattr(exc, "__notes__", ()))
            assert "argument 0 (CrashOnPickle)" in message, message
            assert fn.__qualname__ in message, message
        else:  # in the worker: ResultPicklingError names it, remote traceback chained
            assert type(exc) is futurepool.ResultPicklingError, repr(exc)
            assert fn.__qualname__ in str(exc)
            assert "CrashTestError" in str(exc), str(exc)
            assert isinstance(exc.__cause__, _RemoteTraceback), repr(exc.__cause__)
    elif outcome in ("arguments", "result"):
        assert isinstance(exc, futurepool.UnpicklingFailedError), repr(exc)
        assert isinstance(exc, BrokenProcessPool)
        assert exc.what == outcome
        assert outcome in str(exc)
        assert _ORIGINAL_TYPE[kind].__name__ in str(exc), str(exc)
        assert isinstance(exc.__cause__, _ORIGINAL_TYPE[kind]), repr(exc.__cause__)
        with pytest.raises(futurepool.UnpicklingFailedError):
            future.result(timeout=TIMEOUT)
    elif outcome == "exit":
        assert isinstance(exc, SystemExit) and exc.code == C.SYS_EXIT_CODE, repr(exc)
    else:
        assert_crash_error(exc, cause=outcome, fn=fn, pid=pid)

    fatal = outcome.startswith(("SIG", "EXIT"))
    if fatal:
        assert after.result() != pid
    else:  # the worker survived and took the next task
        assert after.result() == pid
    assert not executor._broken
    assert_usable(executor)


# --- items 7-9: what cannot be (un)pickled -----------------------------------------------


@pytest.mark.parametrize("case", ["lambda_holding_lock", "open_socket_keyword", "function"])
def test_unpicklable_call_fails_at_submit(make_executor, case):
    """Item 7: the future fails at once with PicklingError naming the culprit; nothing is sent.

    "Nothing was sent" is checked as: the future is already failed when
    submit returns, and the owner's task table is empty afterwards (no
    entry, hence no stored object, was made for it).
    """
    executor = make_executor(1)
    lock = threading.Lock()
    with socket.socket() as sock:
        if case == "lambda_holding_lock":
            future = executor.submit(C.identity, lambda: lock)
            expected = "argument 0 (function) of tests.faults._crashers.identity()"
        elif case == "open_socket_keyword":
            future = executor.submit(C.return_instance, dict, conn=sock)
            expected = ("keyword argument 'conn' (socket) of"
                        " tests.faults._crashers.return_instance()")
        else:
            future = executor.submit(lambda: lock)
            expected = "Could not pickle the function"
        assert future.done(), "the pickling error must be known when submit() returns"
    exc = future.exception(timeout=0)
    # The pickler's own exception, as with the stdlib; the culprit is in a note.
    assert type(exc) is TypeError, repr(exc)
    notes = "\n".join(getattr(exc, "__notes__", ()))
    assert expected in notes, notes
    assert_usable(executor)
    assert not executor._owner.tasks


def test_unpicklable_result_names_the_function(make_executor):
    """Item 8: PicklingError naming the function; the same worker takes the next task."""
    executor = make_executor(1)
    pid = executor.submit(C.get_pid).result(timeout=TIMEOUT)
    future = executor.submit(C.make_lock)
    exc = future.exception(timeout=TIMEOUT)
    assert type(exc) is futurepool.ResultPicklingError, repr(exc)
    assert isinstance(exc, pickle.PicklingError)
    assert "tests.faults._crashers.make_lock" in str(exc), str(exc)
    assert "lock" in exc.value_repr and "TypeError" in exc.reason_repr, vars(exc)
    assert isinstance(exc.__cause__, _RemoteTraceback)
    assert executor.submit(C.get_pid).result(timeout=TIMEOUT) == pid


@pytest.mark.parametrize("fails_in", ["driver", "workers"])
def test_result_that_fails_to_load_fails_only_its_consumer(make_executor, settled_once, fails_in):
    """Item 9: a result that cannot be loaded by one consumer fails that consumer only.

    ``fails_in="driver"``: ``result()`` fails with UnpicklingFailedError
    (``what="result"``) while dependent tasks, which load the same stored
    bytes in a worker, succeed. ``fails_in="workers"``: each dependent task
    fails (``what="arguments"``) while the driver still loads the value.
    Either way the producer's stored result stays valid for other consumers.
    (One node only: the cross-node variant belongs with the multi-node tests.)
    """
    executor = make_executor(2)
    producer = executor.submit(C.return_instance, C.FailsToLoadIn, fails_in, os.getpid(), "v")
    consumers = [executor.submit(C.payload_value, producer) for _ in range(2)]
    assert_settled([producer, *consumers])
    if fails_in == "driver":
        for _ in range(2):  # and again: the stored bytes are untouched
            with pytest.raises(futurepool.UnpicklingFailedError) as info:
                producer.result(timeout=TIMEOUT)
            assert info.value.what == "result"
            assert isinstance(info.value.__cause__, C.CrashTestError)
        assert [f.result() for f in consumers] == ["v", "v"]
    else:
        for future in consumers:
            exc = future.exception(timeout=TIMEOUT)
            assert isinstance(exc, futurepool.UnpicklingFailedError), repr(exc)
            assert exc.what == "arguments"
            assert "CrashTestError" in str(exc)
        assert producer.result(timeout=TIMEOUT) == C.Payload("v")
    assert not executor._broken
    assert_usable(executor)


# --- items 10-11: deaths outside of any task ---------------------------------------------


@pytest.mark.parametrize("kind", ["os_exit", "segfault"])
def test_crash_in_argument_del_after_result_spares_the_next_task(make_executor, settled_once,
                                                                 kind):
    """Item 10: an argument's ``__del__`` kills the worker after its result was sent.

    Made deterministic rather than flaky: the test waits for the first
    result before submitting anything else, so "after the result was sent"
    holds by construction whenever the worker frees the argument. The first
    future succeeds; the death is noticed (the worker is replaced); the
    next task runs on the fresh worker and succeeds: it must not be blamed
    for a death that happened before it started.
    """
    executor = make_executor(1)
    first_pid = executor.submit(C.pid_with_argument, C.CrashInDel(kind)).result(timeout=TIMEOUT)
    following = [executor.submit(C.get_pid) for _ in range(3)]
    assert_settled(following)
    errors = [f.exception() for f in following if f.exception() is not None]
    assert not errors, f"a task after the crash was failed for it: {errors[0]!r}"
    assert first_pid not in {f.result() for f in following}
    assert wait_until(lambda: not pid_alive(first_pid), REPLACE_TIMEOUT)
    wait_for_workers(executor, 1, without={first_pid})
    assert_usable(executor)


def test_idle_worker_killed_is_replaced_silently(make_executor, settled_once):
    """Item 11: kill an idle worker; it is replaced and no future ever sees an error."""
    executor = make_executor(2)
    pids = warm_up(executor, 2)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    wait_for_workers(executor, 2, without={victim})
    futures = [executor.submit(C.pid_after, 0.01) for _ in range(10)]
    assert_settled(futures)
    assert [f.exception() for f in futures] == [None] * 10


def test_task_submitted_just_after_idle_worker_killed_succeeds(make_executor, settled_once):
    """Item 11, without waiting: tasks submitted right after the kill still succeed.

    "No error shown to anyone": the owner may send a task to the dead
    worker before the node reports its death, but that task never started,
    so it must run elsewhere instead of failing with WorkerCrashedError.
    """
    executor = make_executor(1)
    pid = executor.submit(C.get_pid).result(timeout=TIMEOUT)
    os.kill(pid, signal.SIGKILL)
    futures = [executor.submit(C.get_pid) for _ in range(3)]
    assert_settled(futures)
    errors = [f.exception() for f in futures if f.exception() is not None]
    assert not errors, f"a task submitted after an idle worker died failed: {errors[0]!r}"
    assert pid not in {f.result() for f in futures}


# --- items 12-13: many deaths ----------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 5, 13])
def test_crash_race_fails_only_killed_workers_futures(make_executor, tmp_path, settled_once,
                                                      workers):
    """Item 12: tasks SIGKILL their sibling workers concurrently.

    One task per worker meets the others (a rendezvous on files), then the
    even-numbered ones kill the worker of the next odd-numbered one, all at
    about the same moment (with one worker, the task kills its own). Only
    the victims' futures fail, each naming its own pid; follow-up work
    completes (no deadlock) and the pool is back to full size.
    """
    executor = make_executor(workers)
    warm_up(executor, workers)
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    futures = [executor.submit(C.rendezvous_and_kill, str(meeting), i, workers, 20.0)
               for i in range(workers)]
    assert_settled(futures)
    pids = {int(p.name): int(p.read_text()) for p in meeting.iterdir() if p.name.isdigit()}
    assert len(set(pids.values())) == workers, "the tasks did not each get their own worker"
    for index, future in enumerate(futures):
        victim = workers == 1 or index % 2 == 1
        if victim:
            assert_crash_error(future.exception(), cause="SIGKILL", fn=C.rendezvous_and_kill,
                               pid=pids[index])
        else:
            assert future.result() == ("killer", pids[index])
    follow_up = [executor.submit(C.pid_after, 0.01) for _ in range(2 * workers)]
    assert_settled(follow_up)
    assert all(f.exception() is None for f in follow_up)
    victims = {pids[i] for i in range(workers) if workers == 1 or i % 2 == 1}
    wait_for_workers(executor, workers, without=victims)
    assert_usable(executor)


def test_poison_task_fails_after_killing_max_retries_plus_one_workers(make_executor, tmp_path,
                                                                      settled_once):
    """Item 13: a task that always segfaults, ``max_retries=3``, kills 4 workers and then fails.

    Each attempt runs in a distinct worker (4 pids logged), the error says
    it killed 4 workers, it is not tried a fifth time, and the other tasks
    and the pool are fine.
    """
    executor = make_executor(2, max_retries=3)
    log = tmp_path / "attempts"
    poison = executor.submit(C.log_pid_and_crash, str(log), "segfault")
    others = [executor.submit(C.pid_after, 0.05) for _ in range(6)]
    exc = poison.exception(timeout=TIMEOUT)
    assert_crash_error(exc, cause="SIGSEGV", fn=C.log_pid_and_crash)
    assert exc.deaths == 4
    assert "killed 4 workers" in str(exc), str(exc)
    attempts = log.read_text().split()
    assert len(attempts) == 4 and len(set(attempts)) == 4, attempts
    assert_settled(others)
    assert all(f.exception() is None for f in others)
    assert_usable(executor)
    time.sleep(0.2)  # a fifth attempt, if any, would have started by now
    assert len(log.read_text().split()) == 4


# --- item 14: the initializer fails ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["raise", "sys_exit", "os_exit"])
def test_failing_initializer_breaks_pool_once_without_respawn_storm(make_executor, tmp_path,
                                                                    capfd, kind):
    """Item 14: the pool is broken with one clear error; workers are not respawned in a loop.

    As with the stdlib, every pending future fails with a BrokenProcessPool
    and later submits raise it. The error is an InitializerError naming the
    initializer; when the initializer raised (or called sys.exit) the
    original exception is its ``__cause__`` and was logged at CRITICAL in the
    worker ("Exception in initializer:", the stdlib's words, on its stderr).
    When it ended the process (os._exit) there is no exception to chain, but
    the error must still say that the initializer was running.
    Respawns are bounded: worker starts are counted both by the initializer
    itself (one line per start) and by sampling the process tree.
    """
    starts = tmp_path / "starts"
    # Spawn: forked workers would inherit pytest's logging handlers, which keep
    # the worker's log in the worker's memory instead of writing it to stderr.
    executor = make_executor(2, mp_context=multiprocessing.get_context("spawn"),
                             initializer=C.failing_initializer, initargs=(str(starts), kind))
    with ProcessSampler() as sampler:
        futures = [executor.submit(C.get_pid) for _ in range(3)]
        assert_settled(futures)
        node_pid = executor._owner.node.pid
        # The broken pool stops its node; a node respawning in a loop would not exit.
        assert wait_until(lambda: not pid_alive(node_pid), REPLACE_TIMEOUT), "node still running"
    errors = [f.exception() for f in futures]
    assert all(isinstance(e, BrokenProcessPool) for e in errors), errors
    first = errors[0]
    assert isinstance(first, futurepool.InitializerError), repr(first)
    assert "failing_initializer" in str(first), f"the error does not name the initializer: {first}"
    if kind != "os_exit":  # os._exit leaves no exception and no log behind
        assert isinstance(first.__cause__, _ORIGINAL_TYPE[kind]), repr(first.__cause__)
        assert "Exception in initializer:" in capfd.readouterr().err
    with pytest.raises(BrokenProcessPool):
        executor.submit(C.get_pid)

    worker_starts = len(starts.read_text().split())
    # raise / sys.exit: no respawn at all. os._exit: a few backed-off attempts.
    limit = 2 if kind != "os_exit" else 2 + 3
    assert 1 <= worker_starts <= limit, f"{worker_starts} worker starts"
    # Sampling can miss a worker that dies within milliseconds, so it only
    # bounds the count from above; the initializer's own log proves the start.
    workers_seen = sampler.children_of(node_pid)
    assert len(workers_seen) <= limit, f"the node started {sorted(workers_seen)}"


# --- item 15: recycling under a backlog ----------------------------------------------------------


@pytest.mark.parametrize("tasks_per_child", [1, 2])
def test_max_tasks_per_child_recycling_completes_backlog(make_executor, settled_once,
                                                         tasks_per_child):
    """Item 15 (gh-115634): 50 queued tasks, workers recycled every 1 or 2 tasks; all complete.

    Each worker runs at most ``max_tasks_per_child`` tasks. Recycling is
    not a crash: it must not slow the pool down (the deadline is generous
    for 50 worker starts of a few milliseconds each).
    """
    executor = make_executor(2, max_tasks_per_child=tasks_per_child)
    futures = [executor.submit(C.get_pid) for _ in range(50)]
    assert_settled(futures, timeout=10.0)
    per_worker = collections.Counter(f.result() for f in futures)
    assert max(per_worker.values()) <= tasks_per_child, per_worker
    assert len(per_worker) >= 50 // tasks_per_child
    assert_usable(executor)


# --- item 16: done-callbacks ---------------------------------------------------------------------


@pytest.mark.parametrize("misbehaviour", ["raise", "sys_exit"])
@pytest.mark.parametrize("outcome", ["success", "crash"])
def test_failing_done_callback_is_logged_and_owner_survives(make_executor, caplog,
                                                            misbehaviour, outcome):
    """Item 16: a done-callback that raises or calls sys.exit() is logged; nothing else changes.

    The callbacks after it still run, the owner's thread is still alive and
    the executor keeps working. Tried on a future that succeeds and on one
    whose worker crashed.
    """
    executor = make_executor(1)
    calls = []

    def bad(_future):
        calls.append(("bad", threading.current_thread() is executor._owner.thread))
        if misbehaviour == "raise":
            raise ValueError("callback failed")
        sys.exit(5)

    def good(future):
        calls.append(("good", future.exception() is None))

    caplog.set_level(logging.ERROR, logger="concurrent.futures")
    # The tasks take a moment, so that the callbacks are attached before they finish.
    if outcome == "success":
        future = executor.submit(C.pid_after, 0.1)
    else:
        future = executor.submit(C.crash_after, 0.1, "os_exit")
    future.add_done_callback(bad)
    future.add_done_callback(good)
    assert_settled([future])
    assert wait_until(lambda: len(calls) == 2, TIMEOUT), calls
    assert calls == [("bad", True), ("good", outcome == "success")]
    records = [r for r in caplog.records
               if r.name == "concurrent.futures" and "exception calling callback" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    expected = ValueError if misbehaviour == "raise" else SystemExit
    assert isinstance(records[0].exc_info[1], expected)
    assert executor._owner.thread.is_alive()
    assert_usable(executor)


@pytest.mark.parametrize("kind, cause", FATAL + [pytest.param("raise", None, id="raise"),
                                                pytest.param("sys_exit", None, id="sys_exit")])
def test_crash_task_submitted_from_done_callback(make_executor, settled_once, kind, cause):
    """Item 16: the crash matrix submitted from a done-callback (on the owner's thread).

    A crashing task whose callback submits the same crash again and a
    healthy task: the outer and inner crashes fail as they would from the
    caller's thread, the healthy task completes, the owner keeps working.
    """
    executor = make_executor(2)
    warm_up(executor, 2)
    inner = []
    submitted = threading.Event()

    def resubmit(_future):  # "sigkill" here: the task kills its own worker
        assert threading.current_thread() is executor._owner.thread
        inner.append(executor.submit(C.crash, kind))
        inner.append(executor.submit(C.pid_after, 0.01))
        submitted.set()

    # crash_after: the callback is attached before the task can finish.
    outer = executor.submit(C.crash_after, 0.1, kind)
    outer.add_done_callback(resubmit)
    assert submitted.wait(TIMEOUT), "the done-callback did not run (or failed: see the log)"
    assert_settled([outer, *inner])
    for future, fn in ((outer, C.crash_after), (inner[0], C.crash)):
        exc = future.exception()
        if kind == "raise":
            assert isinstance(exc, C.CrashTestError), repr(exc)
        elif kind == "sys_exit":
            assert isinstance(exc, SystemExit) and exc.code == C.SYS_EXIT_CODE, repr(exc)
        else:
            assert_crash_error(exc, cause=cause, fn=fn)
    assert isinstance(inner[1].result(), int)
    assert executor._owner.thread.is_alive()
    assert_usable(executor)
