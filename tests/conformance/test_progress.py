"""``progress=`` on the maps, ``futurepool.as_completed``, and the rate in ``futurepool status``.

A futurepool extension (issue 12, point 6), so these run against futurepool
only. Most tests hand ``progress=`` a recording tqdm-like class, which shows
exactly what a bar is told (total, each update, close). The tqdm path is
checked with tqdm's own class, patched to record; the fallback without tqdm
by making ``import tqdm`` fail (``sys.modules["tqdm"] = None``) and giving
``sys.stderr`` a terminal: a pty, or a stream whose ``isatty()`` says so.
Every wait has a deadline: maps take ``timeout=``, iterators ``next(timeout)``,
and calls without a timeout of their own run under :func:`bounded`.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
import re
import select
import sys
import threading
import time
import types

import pytest

import futurepool
from futurepool import config
from futurepool import progress as fp_progress
from futurepool.core import status
from futurepool.protocol import security

from . import _tasks as T
from ._support import TIMEOUT, bounded, end_pools

N = 20

#: The plain line without tqdm (futurepool/progress.py, _Lines.line).
LINE = re.compile(r"^(?P<desc>.+): (?P<done>\d+)(?:/(?P<total>\d+) \((?P<percent>\d+)%\))?"
                  r" in \d+\.\d s, \d+\.\d/s$")


class Recorder:
    """A tqdm-like class that records what it is told; ``made`` lists its instances."""

    made: list[Recorder]

    def __init__(self, total=None, desc=None):
        self.total = total
        self.desc = desc
        self.n = 0
        self.updates: list[int] = []
        self.closed = 0
        type(self).made.append(self)

    def update(self, n=1):
        self.n += n
        self.updates.append(n)

    def close(self):
        self.closed += 1


@pytest.fixture
def recorder():
    """A fresh Recorder class; its one bar, once made, is ``recorder.made[0]``."""
    return type("Recorder", (Recorder,), {"made": []})


@pytest.fixture
def executor():
    """An executor whose workers have started.

    Started before a test swaps ``sys.stderr``: a worker forked while it is a
    ``StringIO`` (capsys too) dies at start, as ``faulthandler.enable()``
    needs a file descriptor (core/worker.py).
    """
    executor = futurepool.Executor(max_workers=2)
    try:
        assert executor.submit(T.square, 2).result(timeout=TIMEOUT) == 4
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def pool():
    pools = [futurepool.Pool(processes=2)]
    yield pools[0]
    end_pools(pools)


@pytest.fixture
def without_tqdm(monkeypatch):
    """``import tqdm`` fails, as where the extra is not installed."""
    monkeypatch.setitem(sys.modules, "tqdm", None)


class TerminalStream(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


def only_bar(recorder) -> Recorder:
    assert len(recorder.made) == 1, recorder.made
    return recorder.made[0]


def assert_finished(bar, total, counted=None):
    """The bar was told the total, counted every item (``counted``: at least), closed once."""
    assert bar.total == total
    assert bar.n == (total if counted is None else counted)
    assert bar.closed == 1


# --- what each call tells the bar --------------------------------------------------------


def test_executor_map_counts_every_result(executor, recorder):
    results = executor.map(T.square, range(N), timeout=TIMEOUT, progress=recorder)
    bar = only_bar(recorder)
    assert (bar.total, bar.desc, bar.n) == (N, "square", 0)
    assert list(results) == [x * x for x in range(N)]
    assert_finished(bar, N)
    assert bar.updates == [1] * N


def test_executor_map_with_chunks_counts_items_by_chunk(executor, recorder):
    results = executor.map(T.square, range(N), timeout=TIMEOUT, chunksize=3, progress=recorder)
    assert list(results) == [x * x for x in range(N)]
    bar = only_bar(recorder)
    assert_finished(bar, N)
    assert bar.updates == [3] * 6 + [2]


def test_executor_map_of_several_iterables_counts_the_shortest(executor, recorder):
    results = executor.map(T.add, range(N), range(5), timeout=TIMEOUT, progress=recorder)
    assert list(results) == [2 * x for x in range(5)]
    assert_finished(only_bar(recorder), 5)


def test_executor_map_of_a_generator_has_no_total(executor, recorder):
    results = executor.map(T.square, iter(range(N)), timeout=TIMEOUT, buffersize=4,
                           progress=recorder)
    assert list(results) == [x * x for x in range(N)]
    assert_finished(only_bar(recorder), None, counted=N)


def test_executor_map_closes_the_bar_at_the_first_failure(executor, recorder):
    results = executor.map(T.raise_if_negative, [1, 2, -1, 4], timeout=TIMEOUT,
                           progress=recorder)
    assert next(results) == 1 and next(results) == 2
    with pytest.raises(T.CustomError):
        next(results)
    bar = only_bar(recorder)
    assert (bar.n, bar.closed) == (2, 1)


def test_closing_an_executor_map_closes_its_bar(executor, recorder):
    results = executor.map(T.square, range(N), timeout=TIMEOUT, progress=recorder)
    assert next(results) == 0
    results.close()
    bar = only_bar(recorder)
    assert (bar.n, bar.closed) == (1, 1)


def test_an_abandoned_executor_map_closes_its_bar(executor, recorder):
    results = executor.map(T.square, range(N), timeout=TIMEOUT, chunksize=4, progress=recorder)
    assert next(results) == 0
    del results  # no cycle: collected at once, and the finalizer closes the bar
    assert only_bar(recorder).closed == 1


@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_pool_map_counts_items_as_chunks_complete(pool, recorder, chunksize):
    values = bounded(pool.map, T.square, range(N), chunksize, progress=recorder)
    assert values == [x * x for x in range(N)]
    bar = only_bar(recorder)
    assert_finished(bar, N)
    if chunksize == 4:
        assert bar.updates == [4] * 5


def test_pool_map_of_a_generator_knows_its_total(pool, recorder):
    values = bounded(pool.map, T.square, iter(range(N)), progress=recorder)
    assert values == [x * x for x in range(N)]
    assert_finished(only_bar(recorder), N)


def test_pool_map_raises_a_failure_and_closes_the_bar(pool, recorder):
    with pytest.raises(T.CustomError):
        bounded(pool.map, T.raise_if_negative, [1, -1, 3], 1, progress=recorder)
    bar = only_bar(recorder)
    assert bar.total == 3 and bar.closed == 1 and bar.n <= 2


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap_counts_every_result(pool, recorder, method, chunksize):
    results = getattr(pool, method)(T.square, range(N), chunksize, progress=recorder)
    bar = only_bar(recorder)
    assert (bar.total, bar.desc) == (N, "square")
    values = bounded(list, results)
    assert sorted(values) == [x * x for x in range(N)]
    if method == "imap":
        assert values == [x * x for x in range(N)]
    assert_finished(bar, N)
    assert sorted(bar.updates) == sorted([1] * N if chunksize == 1 else [3] * 6 + [2])


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_keeps_next_with_a_timeout(pool, recorder, method):
    results = getattr(pool, method)(T.square, iter(range(N)), progress=recorder)
    values = [results.next(timeout=TIMEOUT) for _ in range(N)]
    assert sorted(values) == [x * x for x in range(N)]
    with pytest.raises(StopIteration):
        results.next(timeout=TIMEOUT)
    assert_finished(only_bar(recorder), None, counted=N)


def test_imap_counts_a_failed_task_and_goes_on(pool, recorder):
    results = pool.imap(T.raise_if_negative, [1, -1, 3], progress=recorder)
    assert results.next(timeout=TIMEOUT) == 1
    with pytest.raises(T.CustomError):
        results.next(timeout=TIMEOUT)
    assert results.next(timeout=TIMEOUT) == 3
    with pytest.raises(StopIteration):
        results.next(timeout=TIMEOUT)
    assert_finished(only_bar(recorder), 3)


def test_as_completed_counts_each_future(executor, recorder):
    futures = [executor.submit(T.square, x) for x in range(N)]
    done = list(futurepool.as_completed(futures + futures[:3], TIMEOUT, progress=recorder))
    assert sorted(f.result() for f in done) == [x * x for x in range(N)]
    assert_finished(only_bar(recorder), N)


def test_as_completed_works_for_any_executor(recorder):
    with cf.ThreadPoolExecutor(2) as threads:
        futures = [threads.submit(pow, x, 2) for x in range(N)]
        done = list(futurepool.as_completed(futures, TIMEOUT, progress=recorder))
    assert sorted(f.result() for f in done) == [x * x for x in range(N)]
    assert_finished(only_bar(recorder), N)


def test_as_completed_timeout_closes_the_bar(recorder):
    done, never = cf.Future(), cf.Future()
    done.set_result(1)
    results = futurepool.as_completed([done, never], timeout=0.1, progress=recorder)
    assert next(results) is done
    with pytest.raises(cf.TimeoutError):
        next(results)
    bar = only_bar(recorder)
    assert (bar.total, bar.n, bar.closed) == (2, 1, 1)


def test_as_completed_without_progress_is_the_stdlib_function():
    future = cf.Future()
    future.set_result(1)
    assert isinstance(futurepool.as_completed([future]), types.GeneratorType)
    assert list(futurepool.as_completed([future], timeout=TIMEOUT)) == [future]


# --- off means nothing -------------------------------------------------------------------


def test_without_progress_the_results_are_the_plain_iterators(executor, pool):
    assert isinstance(executor.map(T.square, [], timeout=TIMEOUT), types.GeneratorType)
    for falsy in (None, False):
        assert isinstance(pool.imap(T.square, [], progress=falsy), type(pool.imap(T.square, [])))
        assert isinstance(pool.imap_unordered(T.square, [], progress=falsy),
                          type(pool.imap_unordered(T.square, [])))
    assert list(executor.map(T.square, range(3), timeout=TIMEOUT, progress=False)) == [0, 1, 4]


@pytest.mark.parametrize("value", [1, 0.5, b"bar", object()])
def test_a_bad_progress_value_is_refused_before_anything_runs(pool, value):
    message = "progress must be a bool, a str or a tqdm-like class"
    with futurepool.Executor(max_workers=1) as executor:
        with pytest.raises(TypeError, match=message):
            executor.map(T.square, range(3), progress=value)
        assert executor._owner.thread is None  # nothing was submitted
    for call in (pool.map, pool.imap, pool.imap_unordered):
        with pytest.raises(TypeError, match=message):
            call(T.square, range(3), progress=value)
    with pytest.raises(TypeError, match=message):
        futurepool.as_completed([], progress=value)


# --- tqdm, and the plain line without it --------------------------------------------------


@pytest.fixture
def tqdm_bars(monkeypatch):
    """tqdm's own bar class, recording its instances (the extra is installed in tests).

    Without its monitor thread: tqdm starts one with the first bar of a
    process and keeps it for good (a daemon), which the leak check would
    blame on whichever test came first.
    """
    tqdm = pytest.importorskip("tqdm")
    made = []

    class Recorded(tqdm.tqdm):
        monitor_interval = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    return made


def test_true_uses_tqdm_when_it_is_installed(executor, tqdm_bars, capsys):
    results = executor.map(T.square, range(N), timeout=TIMEOUT, progress=True)
    assert list(results) == [x * x for x in range(N)]
    [bar] = tqdm_bars
    assert (bar.total, bar.n, bar.desc) == (N, N, "square")
    err = capsys.readouterr().err
    assert "square: 100%" in err and f"{N}/{N}" in err


def test_a_string_is_tqdms_description(pool, tqdm_bars, capsys):
    assert bounded(list, pool.imap_unordered(T.square, range(N), 4, progress="squares"))
    [bar] = tqdm_bars
    assert (bar.total, bar.n, bar.desc) == (N, N, "squares")
    assert "squares: 100%" in capsys.readouterr().err


def test_without_tqdm_a_terminal_gets_plain_lines(executor, without_tqdm, monkeypatch):
    stream = TerminalStream()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(config, "PROGRESS_INTERVAL", 0.0)  # a line at every update
    assert list(executor.map(T.square, range(N), timeout=TIMEOUT, chunksize=5,
                             progress=True)) == [x * x for x in range(N)]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5, lines  # one per chunk, one at the end
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [int(m["done"]) for m in parsed] == [5, 10, 15, 20, 20]
    assert {(m["desc"], m["total"]) for m in parsed} == {("square", str(N))}
    assert parsed[-1]["percent"] == "100"


def test_without_tqdm_lines_come_at_most_every_interval(pool, without_tqdm, monkeypatch):
    stream = TerminalStream()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(config, "PROGRESS_INTERVAL", 3600.0)
    assert bounded(pool.map, T.square, range(N), progress="sq") == [x * x for x in range(N)]
    [line] = stream.getvalue().splitlines()  # only the last one
    assert LINE.match(line) and line.startswith(f"sq: {N}/{N} (100%) in "), line


def test_without_tqdm_a_pty_gets_the_lines(without_tqdm, monkeypatch, recorder):
    """A real terminal: stderr is the pty's slave end, read back from its master."""
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as terminal:
            monkeypatch.setattr(sys, "stderr", terminal)
            future = cf.Future()
            future.set_result(None)
            assert list(futurepool.as_completed([future], TIMEOUT, progress=True)) == [future]
        output = b""
        deadline = time.monotonic() + TIMEOUT
        while not output.endswith(b"\n") and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                output += os.read(master, 4096)
        line = output.decode().replace("\r\n", "\n").strip()
        match = LINE.match(line)
        assert match and (match["desc"], match["done"], match["total"]) == ("futurepool", "1", "1")
    finally:
        os.close(slave)
        os.close(master)


def test_without_tqdm_and_without_a_terminal_nothing_is_printed(
        executor, pool, without_tqdm, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(config, "PROGRESS_INTERVAL", 0.0)
    assert list(executor.map(T.square, range(N), timeout=TIMEOUT, progress=True))
    assert bounded(pool.map, T.square, range(N), progress=True)
    assert bounded(list, pool.imap(T.square, range(N), progress="x"))
    futures = [executor.submit(T.square, x) for x in range(3)]
    assert len(list(futurepool.as_completed(futures, TIMEOUT, progress=True))) == 3
    assert stream.getvalue() == ""


def test_a_closed_stderr_does_not_fail_the_map(executor, without_tqdm, monkeypatch):
    stream = TerminalStream()
    stream.close()
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: True,
                                                             write=stream.write,
                                                             flush=stream.flush))
    assert list(executor.map(T.square, range(3), timeout=TIMEOUT, progress=True)) == [0, 1, 4]


def test_the_display_counts_updates_from_many_threads():
    class Racy:
        """Loses counts unless updates are serialized."""

        n = 0

        def update(self, k):
            n = self.n
            time.sleep(0)
            self.n = n + k

        def close(self):
            pass

    racy = Racy()
    shown = fp_progress.display(lambda total, desc: racy, 8000, None)
    threads = [threading.Thread(target=lambda: [shown.update(1) for _ in range(1000)])
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert racy.n == 8000


# --- futurepool status: tasks per second ----------------------------------------------------


def test_the_rate_is_measured_between_questions():
    class Owner:  # what rate() reads of core.owner.Owner
        completed = 0
        started_at = time.time() - 10.0

    owner = Owner()
    now = time.monotonic()
    owner.completed = 50
    first = status.rate(owner, now)  # the first: since the head started
    assert first["window"] == pytest.approx(10.0, abs=0.5)
    assert first["per_second"] == pytest.approx(5.0, rel=0.1)
    owner.completed = 60
    soon = status.rate(owner, now + 0.01)  # too soon for a window of its own
    assert soon["window"] == pytest.approx(10.0, abs=0.5)
    owner.completed = 90
    later = status.rate(owner, now + 3.0)  # since the first question
    assert later == {"per_second": pytest.approx(40 / 3.0, rel=1e-3), "window": 3.0}
    owner.completed = 100
    assert status.rate(owner, now + 5.0) == {"per_second": 5.0, "window": 2.0}


def test_status_renders_the_rate():
    answer = {"address": "tcp://h:1", "pid": 1, "started_at": time.time(),
              "nodes": [], "tasks": {"pending": 0, "sent": 1, "done": 42},
              "rate": {"per_second": 12.34, "window": 2.0}}
    assert "42 done, 12.3 tasks/s over the last 2.0 s" in status.render(answer)
    del answer["rate"]  # a head from before the rate
    assert status.render(answer).splitlines()[0].endswith("42 done")


def test_a_listening_head_answers_with_done_counts_and_rate(tmp_path):
    key_file = security.create_key_file(tmp_path / "cluster.key")
    with futurepool.Executor(2, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        assert list(executor.map(T.square, range(N), timeout=TIMEOUT)) == \
            [x * x for x in range(N)]
        answer = status.query(executor.address, security.load_keys(key_file), TIMEOUT)
    assert answer["tasks"]["done"] == N
    assert answer["rate"]["per_second"] > 0 and answer["rate"]["window"] > 0
    assert f"{N} done, " in status.render(answer)
