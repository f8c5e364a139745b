"""A task's traceback shows where its code was written: file, line and source text.

An exception raised by a task comes back with the worker's traceback twice
(README, "Errors explain themselves"): as real frames, which
``traceback.format_exception(exc)`` prints with the caller's source lines
(tblib), and as the worker's own rendering of it in ``__cause__``, the
stdlib's remote traceback text (``multiprocessing.pool.RemoteTraceback`` for
``Pool``). As with the stdlib, both name each frame's file and line and show
its source line, including for code that travelled by value (a script's
functions, closures, lambdas), whose file cloudpickle >= 3.1.2 would rename
``<dynamic-code>`` (cloudpipe/cloudpickle#560). Source that only the caller
has (a Jupyter cell, an interactive session, ``python -c`` on 3.13+) is
filled into the text by the caller.

Each case runs a driver in a fresh interpreter, from a script file or with
``python -c``, which prints what its caller saw as JSON; the test checks that
against the driver's own source.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from futurepool.testing import run_driver

#: Seconds a driver may run: it starts a pool, runs a task or three, stops it.
TIMEOUT = 120.0

#: The start of every driver: ``report`` is what a caller sees of a task's
#: exception; ``run_tasks`` runs the ``(fn, args)`` calls that ``make_calls()``
#: returns on one facade, one worker, and reports each one's exception. The
#: worker has run a task before ``make_calls`` is called: whatever the
#: driver defines there, the worker did not inherit.
PRELUDE = '''\
import json
import sys
import traceback

import futurepool


def report(exc):
    return {
        "frames": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__,
                                                     chain=False)),
        "cause_type": f"{type(exc.__cause__).__module__}.{type(exc.__cause__).__qualname__}",
        "cause": exc.__cause__.tb,
    }


def run_tasks(facade, make_calls):
    if facade == "executor":
        with futurepool.Executor(max_workers=1) as executor:
            executor.submit(abs, 1).result(timeout=30)
            return [report(executor.submit(fn, *args).exception(timeout=30))
                    for fn, args in make_calls()]
    reports = []
    with futurepool.Pool(1) as pool:
        pool.apply_async(abs, (1,)).get(timeout=30)
        for fn, args in make_calls():
            try:
                pool.apply_async(fn, args).get(timeout=30)
            except Exception as exc:
                reports.append(report(exc))
    return reports
'''

#: What each facade's exceptions carry as ``__cause__``, as in the stdlib.
CAUSE_TYPES = {
    "executor": "concurrent.futures.process._RemoteTraceback",
    "pool": "multiprocessing.pool.RemoteTraceback",
}


def _run(code: str) -> list[dict]:
    try:
        done = run_driver(code, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - reported with its output
        pytest.fail(f"the driver hung:\nstdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _run_script(path, *args: str) -> list[dict]:
    # A real ``python script.py``, launched from a run_driver snippet: that
    # bounds the run and kills everything it started if it hangs.
    argv = [str(path), *args]
    return _run(f"import subprocess, sys\n"
                f"sys.exit(subprocess.call([sys.executable, *{argv!r}]))\n")


def _line_of(source: str, marker: str) -> int:
    """The number of the one line of ``source`` that contains ``marker``."""
    found = [n for n, line in enumerate(source.splitlines(), 1) if marker in line]
    assert len(found) == 1, (marker, found)
    return found[0]


def _assert_frame(text: str, filename: str, source: str, marker: str, name: str,
                  shown: str | None = None) -> None:
    """``text`` has the frame of ``name`` at the line with ``marker``, followed by
    ``shown`` (by default that line of ``source``, stripped) every time."""
    lineno = _line_of(source, marker)
    header = f'File "{filename}", line {lineno}, in {name}\n'
    parts = text.split(header)
    assert len(parts) > 1, f"no {header!r} in:\n{text}"
    if shown is None:
        shown = source.splitlines()[lineno - 1].strip()
    for after in parts[1:]:
        assert after.splitlines()[0].strip(" |") == shown, f"{header!r} in:\n{text}"
    assert "<dynamic-code>" not in text, text


SCRIPT = PRELUDE + '''

def task(x):
    def helper():
        raise ValueError(x)  # helper: the line that raises
    helper()  # task: the line that calls


def make_task(x):
    def closure():
        raise KeyError(x)  # closure: the line that raises
    return closure


if __name__ == "__main__":
    calls = [(task, (1,)), (make_task(2), ()), (lambda: 1 / 0, ())]  # the lambda
    print(json.dumps(run_tasks(sys.argv[1], lambda: calls)))
'''


@pytest.mark.parametrize("facade", ["executor", "pool"])
def test_a_script_task_shows_its_file_line_and_source(facade, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(SCRIPT)
    path = str(script)
    function, closure, lam = _run_script(path, facade)
    for shown in (function["frames"], function["cause"]):
        _assert_frame(shown, path, SCRIPT, "# task: the line that calls", "task")
        _assert_frame(shown, path, SCRIPT, "# helper: the line that raises", "helper")
    for shown in (closure["frames"], closure["cause"]):
        _assert_frame(shown, path, SCRIPT, "# closure: the line that raises", "closure")
    for shown in (lam["frames"], lam["cause"]):
        _assert_frame(shown, path, SCRIPT, "# the lambda", "<lambda>")
    assert {r["cause_type"] for r in (function, closure, lam)} == {CAUSE_TYPES[facade]}


CELL = '''\
def lookup(table, key):
    return table[key]  # cell: the lookup


def cell_task(key):
    try:
        lookup({}, key)  # cell: the call
    except KeyError as missing:
        raise LookupError(f"no {key}") from missing  # cell: the line that raises
'''

CELL_SCRIPT = PRELUDE + f'''
CELL = {CELL!r}


def run_cell():
    # What IPython does with a cell: compile it under a file name that no
    # file has, and put its source into linecache.
    import linecache

    name = sys.argv[2]
    linecache.cache[name] = (len(CELL), None, CELL.splitlines(keepends=True), name)
    exec(compile(CELL, name, "exec"), globals())  # a cell runs in __main__
    return [(globals()["cell_task"], ("answer",))]


if __name__ == "__main__":
    print(json.dumps(run_tasks(sys.argv[1], run_cell)))
'''


@pytest.mark.parametrize("facade", ["executor", "pool"])
def test_source_only_the_caller_has_is_filled_in(facade, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(CELL_SCRIPT)
    cell = str(tmp_path / "ipykernel_1" / "3141592653.py")  # a Jupyter cell's name; no file
    (error,) = _run_script(script, facade, cell)
    _assert_frame(error["frames"], cell, CELL, "# cell: the line that raises", "cell_task")
    # The worker rendered the text without the cell: each line is the caller's.
    cause = error["cause"]
    _assert_frame(cause, cell, CELL, "# cell: the lookup", "lookup")
    _assert_frame(cause, cell, CELL, "# cell: the call", "cell_task")
    _assert_frame(cause, cell, CELL, "# cell: the line that raises", "cell_task")
    assert "The above exception was the direct cause" in cause
    assert error["cause_type"] == CAUSE_TYPES[facade]


C_DRIVER = PRELUDE + '''
import linecache


def boom():
    raise RuntimeError("typed after -c")  # -c: the function's line


def make_boom():
    def closure():
        raise RuntimeError("typed after -c")  # -c: the closure's line
    return closure


if __name__ == "__main__":
    errors = run_tasks("executor", lambda: [(boom, ()), (make_boom(), ())])
    # Python 3.13+ keeps the -c source for tracebacks; older ones have none.
    for error, line in zip(errors, (boom.__code__.co_firstlineno + 1,
                                    make_boom().__code__.co_firstlineno + 1)):
        error["own_line"] = linecache.getline("<string>", line)
    print(json.dumps(errors))
'''


def test_a_python_c_task_names_its_frames_and_shows_what_the_caller_has():
    function, closure = _run(C_DRIVER)
    for error, marker, name in ((function, "# -c: the function's line", "boom"),
                                (closure, "# -c: the closure's line", "closure")):
        # After the frame comes the caller's source line or, when the caller
        # has no source either, the exception.
        shown = error["own_line"].strip() or "RuntimeError: typed after -c"
        for text in (error["frames"], error["cause"]):
            _assert_frame(text, "<string>", C_DRIVER, marker, name, shown)


INITIALIZER_SCRIPT = PRELUDE + '''

def make_initializer(database):
    # A closure travels by value whichever way the workers start.
    def connect():
        raise ConnectionError(f"no {database}")  # initializer: the line that raises
    return connect


if __name__ == "__main__":
    import multiprocessing

    # Spawn semantics: the initializer is pickled (fork may hand it over as is).
    spawn = multiprocessing.get_context("spawn")
    with futurepool.Executor(max_workers=1, mp_context=spawn,
                             initializer=make_initializer("db")) as executor:
        error = executor.submit(abs, 1).exception(timeout=30)
    print(json.dumps([report(error.__cause__)]))
'''


def test_a_failing_initializer_shows_its_file_line_and_source(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(INITIALIZER_SCRIPT)
    (error,) = _run_script(script)
    for shown in (error["frames"], error["cause"]):
        _assert_frame(shown, str(script), INITIALIZER_SCRIPT,
                      "# initializer: the line that raises", "connect")
