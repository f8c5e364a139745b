"""CPython's own ``concurrent.futures`` process-pool tests, bound to any executor.

``futurepool.Executor`` is meant to be a drop-in ``ProcessPoolExecutor``, and
CPython's test suite for that class is the yardstick. This module does not
copy those tests: it imports them from the interpreter's installed ``test``
package (``test.test_concurrent_futures``: a package of modules from 3.12 on,
one module on 3.10 and 3.11) and subclasses the classes CPython generated for
the ``spawn`` start method, replacing ``executor_type``.

How CPython binds a test to an executor: each behaviour lives in a plain
mixin (``ExecutorTest``/``ProcessPoolExecutorTest``, ``ExecutorDeadlockTest``,
``ProcessPoolShutdownTest``, ``WaitTests``, ``AsCompletedTests``,
``InitializerMixin``, ``FailingInitializerMixin``), and
``create_executor_tests`` makes ``type(name, (mixin, executor_mixin,
BaseTestCase), ...)`` for each executor mixin: ``ProcessPoolForkMixin``,
``ProcessPoolForkserverMixin``, ``ProcessPoolSpawnMixin`` (and
``ThreadPoolMixin`` where the behaviour is not process-specific). Those set
``executor_type`` and ``ctx``; ``ExecutorMixin.setUp`` creates
``executor_type(max_workers=worker_count, mp_context=get_context(),
**executor_kwargs)`` and ``tearDown`` shuts it down; ``BaseTestCase`` checks
for threads left running and reaps child processes after every test.

Only the **spawn** classes are bound. futurepool never forks the caller:
workers get a task's code by value (cloudpickle) or by import whatever
``mp_context`` says, so the fork and forkserver variants would run the same
code paths a second and a third time.

What the adapter changes, and nothing else:

* ``executor_type`` is the executor under test.
* :data:`SKIPS` are skipped: they read or patch the stdlib's private
  internals. Those also in :data:`RUN_IF_EXPOSED` run anyway when the
  executor object has every attribute named there (``_max_workers``,
  ``_processes``, ``_broken`` ...).
* Three shutdown tests run a script in a fresh interpreter that does ``from
  concurrent.futures import <executor_type.__name__>``. For any other class
  that imports the wrong executor (or the abstract ``Executor``), so the
  script is rewritten to import the executor under test, with ``PYTHONPATH``
  pointing at it. The rewrite also adds ``import multiprocessing``:
  ``test_hang_gh83386`` calls ``multiprocessing.set_start_method`` without
  importing it, a CPython bug hidden because the test skips the stdlib class.
* Classmethods of CPython's classes (``_test_traceback``) are re-bound to
  CPython's class, so a task referring to one pickles by reference to a
  class that worker processes can import.
* ``ExecutorDeadlockTest.TIMEOUT`` (300 s on 3.13), how long a task may take
  before the test declares a deadlock, is capped (default 30 s, as on 3.10).
* ``FailingInitializerResourcesTest.test_spawn`` runs the bound
  failing-initializer class instead of CPython's, and fails at once, instead
  of hanging, if another process still holds the resource tracker's pipe.
  Its forkserver variant is dropped.

Each bound test arms ``faulthandler`` to dump every stack and end the
process if it runs past ``TEST_TIMEOUT + HARD_TIMEOUT_GRACE`` seconds. A
deadlock in this suite (the stdlib's own gh-125451 race, 3.13.0 under
pytest-xdist) outlived pytest-timeout's signal method, so that method is not
enough on its own; ``main()`` uses a watchdog thread instead, which also
prints the failures so far and kills the run's child processes.

``test.support`` sets ``environment_altered`` when a test leaves threads
running or child processes unreaped (CPython's CI then fails the test with
``--fail-env-changed``). Bound tests record that in :data:`ENV_CHANGED`, and
fail when strict (``--strict-env``, ``FUTUREPOOL_CPYTHON_SUITE_STRICT_ENV=1``).

From pytest (``tests/stdlib/test_cpython_concurrent_futures.py``)::

    globals().update(build_test_classes(module=__name__))

From the command line, under unittest, on Python 3.10 to 3.13::

    python -m futurepool.testing.cpython_suite [--executor module:Class] [-k pattern] [-v]

``--executor concurrent.futures:ProcessPoolExecutor`` runs the same selection
on the stdlib, which is how the adapter itself is checked.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import faulthandler
import functools
import importlib
import importlib.util
import inspect
import os
import pkgutil
import sys
import threading
import time
import types
import unittest
import unittest.mock
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "DEADLOCK_TIMEOUT",
    "DEFAULT_EXECUTOR",
    "HARD_TIMEOUT_GRACE",
    "ENV_CHANGED",
    "RUN_IF_EXPOSED",
    "SKIPS",
    "TEST_TIMEOUT",
    "CPythonSuiteUnavailable",
    "build_test_classes",
    "load_executor",
    "main",
]

#: The executor bound when none is given, as ``"module:qualname"``.
DEFAULT_EXECUTOR = "futurepool:Executor"
#: Environment variable that overrides :data:`DEFAULT_EXECUTOR`.
EXECUTOR_ENV = "FUTUREPOOL_CPYTHON_SUITE_EXECUTOR"
#: Environment variable that makes an altered environment a test failure.
STRICT_ENV_ENV = "FUTUREPOOL_CPYTHON_SUITE_STRICT_ENV"
#: Seconds a deadlock test waits for a result before it declares a deadlock.
DEADLOCK_TIMEOUT = 30.0
#: Environment variable that overrides :data:`TEST_TIMEOUT`.
TIMEOUT_ENV = "FUTUREPOOL_CPYTHON_SUITE_TIMEOUT"
#: Seconds one test may run before it is stopped (CPython's tests mostly wait
#: for results without a deadline).
TEST_TIMEOUT = float(os.environ.get(TIMEOUT_ENV) or 180.0)
#: Seconds after :data:`TEST_TIMEOUT` at which a test that was not stopped
#: by then (pytest-timeout's signal method can miss a deadlock) ends the
#: process.
HARD_TIMEOUT_GRACE = 60.0

_PACKAGE = "test.test_concurrent_futures"

# CPython's generated spawn classes, under the names it gives them.
_POOL = "ProcessPoolSpawnProcessPoolExecutorTest"
_DEADLOCK = "ProcessPoolSpawnExecutorDeadlockTest"
_SHUTDOWN = "ProcessPoolSpawnProcessPoolShutdownTest"
_FAILING_INIT = "ProcessPoolSpawnFailingInitializerTest"
# A plain TestCase (3.12+) that runs _FAILING_INIT, then checks that the
# multiprocessing resource tracker exits cleanly (gh-104090).
_RESOURCES = "FailingInitializerResourcesTest"

_COUNTS_WORKERS = "reads executor._max_workers and executor._processes to count started workers"
_STDLIB_CLASS = (
    "also constructs concurrent.futures.ProcessPoolExecutor itself, "
    "so it never runs the bound executor"
)

#: ``"Class.test": reason`` for the tests that cannot apply to another
#: implementation. Only tests that read or patch the stdlib's private
#: internals belong here.
SKIPS: dict[str, str] = {
    f"{_POOL}.test_killed_child": (
        "reads executor._processes (pid -> multiprocessing.Process) to terminate a worker"
        " (and then expects the whole pool to be broken)"
    ),
    f"{_POOL}.test_saturation": _COUNTS_WORKERS,
    f"{_POOL}.test_idle_process_reuse_one": _COUNTS_WORKERS,
    f"{_POOL}.test_idle_process_reuse_multiple": _COUNTS_WORKERS,
    f"{_POOL}.test_max_tasks_per_child": "reads executor._processes to count live workers",
    f"{_POOL}.test_max_tasks_per_child_defaults_to_spawn_context": (
        "reads executor._mp_context to check the default start method"
    ),
    f"{_POOL}.test_python_finalization_error": (
        "patches threading._start_joinable_thread to fail the stdlib's second thread"
        " start (the call queue's feeder thread)"
    ),
    f"{_DEADLOCK}.test_shutdown_deadlock_pickle": (
        "reads executor._executor_manager_thread to join it"
    ),
    f"{_DEADLOCK}.test_gh105829_should_not_deadlock_if_wakeup_pipe_full": (
        "patches concurrent.futures.process._ExecutorManagerThread.run and _ThreadWakeup"
    ),
    f"{_SHUTDOWN}.test_processes_terminate": "reads executor._processes to count and join workers",
    f"{_SHUTDOWN}.test_context_manager_shutdown": f"reads executor._processes; {_STDLIB_CLASS}",
    f"{_SHUTDOWN}.test_del_shutdown": (
        f"reads executor._executor_manager_thread, _processes and _call_queue; {_STDLIB_CLASS}"
    ),
    f"{_SHUTDOWN}.test_shutdown_no_wait": (
        f"reads executor._executor_manager_thread, _processes and _call_queue; {_STDLIB_CLASS}"
    ),
    f"{_FAILING_INIT}.test_initializer": "polls executor._broken until the pool is marked broken",
}

#: The :data:`SKIPS` lifted when the executor object that ``setUp`` made has
#: every attribute named: the test needs nothing else of the stdlib's.
#: (``test_killed_child`` is not here: after one worker dies it expects every
#: later ``submit`` to fail, which futurepool deliberately does not do.)
RUN_IF_EXPOSED: dict[str, tuple[str, ...]] = {
    f"{_POOL}.test_saturation": ("_max_workers", "_processes"),
    f"{_POOL}.test_idle_process_reuse_one": ("_max_workers", "_processes"),
    f"{_POOL}.test_idle_process_reuse_multiple": ("_max_workers", "_processes"),
    f"{_POOL}.test_max_tasks_per_child": ("_processes",),
    f"{_POOL}.test_max_tasks_per_child_defaults_to_spawn_context": ("_mp_context",),
    f"{_DEADLOCK}.test_shutdown_deadlock_pickle": ("_executor_manager_thread",),
    f"{_SHUTDOWN}.test_processes_terminate": ("_processes",),
    f"{_FAILING_INIT}.test_initializer": ("_broken",),
}

#: Ids of the tests that altered the environment, appended as tests run.
ENV_CHANGED: list[str] = []


class CPythonSuiteUnavailable(Exception):
    """This interpreter has no usable ``test.test_concurrent_futures``."""


@dataclass(frozen=True)
class _Layout:
    """Where this interpreter keeps the tests, whichever version it is."""

    modules: tuple[types.ModuleType, ...]
    spawn_mixin: type
    setup_module: Callable[[], None]


def _load_layout() -> _Layout:
    try:
        package = importlib.import_module(_PACKAGE)
    except unittest.SkipTest as exc:
        raise CPythonSuiteUnavailable(f"{_PACKAGE} skips itself here: {exc}") from exc
    except ImportError as exc:
        raise CPythonSuiteUnavailable(
            f"CPython's {_PACKAGE} is not installed with {sys.executable} "
            f"(Python {sys.version.split()[0]}): {exc}. Debian and Ubuntu ship it "
            "separately (libpython3.X-testsuite); pyenv and python.org builds include it."
        ) from exc
    if hasattr(package, "__path__"):
        # 3.12+: a module per subject, the shared pieces in util.py.
        util = importlib.import_module(f"{_PACKAGE}.util")
        modules = []
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if info.name.startswith("test_"):
                try:
                    modules.append(importlib.import_module(f"{_PACKAGE}.{info.name}"))
                except unittest.SkipTest:
                    continue
        setup_module = util.setup_module
    else:
        # 3.10 and 3.11: everything in one module.
        util = package
        modules = [package]
        setup_module = package.setUpModule
    return _Layout(tuple(modules), util.ProcessPoolSpawnMixin, setup_module)


def load_executor(spec: str) -> type:
    """Import ``"module:qualname"`` (such as ``"futurepool:Executor"``) and return it."""
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"executor must look like 'module:Class', got {spec!r}")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _strict_env_default() -> bool:
    return os.environ.get(STRICT_ENV_ENV, "") not in ("", "0")


class _TestGuard:
    """What every bound test of both suites does around CPython's setUp/tearDown.

    Subclasses call :meth:`_guard_test` first in ``setUp`` and name the list
    that collects the tests which altered the environment.
    """

    _strict_env = False
    _hard_timeout: float | None = None
    _env_changed: list[str] = ENV_CHANGED

    def _guard_test(self):
        from test import support

        if self._hard_timeout:
            # The last resort against a hang no signal can interrupt: dump
            # every stack and exit (pytest-xdist then reports the crashed test).
            faulthandler.dump_traceback_later(self._hard_timeout, exit=True, file=sys.__stderr__)
            self.addCleanup(faulthandler.cancel_dump_traceback_later)
        self._env_before = support.environment_altered
        support.environment_altered = False

    def tearDown(self):
        from test import support

        try:
            super().tearDown()
        finally:
            altered = support.environment_altered
            support.environment_altered = self._env_before or altered
        if altered:
            self._env_changed.append(self.id())
            if self._strict_env:
                self.fail(
                    "the test altered the environment: threads still running or child "
                    "processes reaped by test.support (its warnings are on stderr)"
                )


class _Adapter(_TestGuard):
    """Mixed in first into each concurrent.futures test class."""

    def setUp(self):
        self._guard_test()
        self._patch_subprocess_scripts()
        super().setUp()

    def _patch_subprocess_scripts(self):
        # The shutdown tests call ``assert_python_ok`` from their module's
        # globals: swap in one that imports the executor under test.
        test = inspect.unwrap(getattr(type(self), self._testMethodName))
        namespace = getattr(test, "__globals__", {})
        original = namespace.get("assert_python_ok")
        if original is None or getattr(original, "_cpython_suite_wrapper", False):
            return
        wrapper = _script_runner(original, self.executor_type)
        if wrapper is not original:
            namespace["assert_python_ok"] = wrapper
            self.addCleanup(namespace.__setitem__, "assert_python_ok", original)

    def _fail_on_deadlock(self, executor):
        # CPython's version first terminates ``executor._processes``: keep it
        # when the executor has that; otherwise dump the stacks and leave the
        # executor without waiting for it.
        if hasattr(executor, "_processes"):
            return super()._fail_on_deadlock(executor)
        faulthandler.dump_traceback(file=sys.__stderr__)
        try:
            executor.shutdown(wait=False, cancel_futures=True)
        finally:
            self.fail(f"executor deadlock: no result within {self.TIMEOUT} s (stacks on stderr)")


def _import_roots(executor: type) -> list[str]:
    """Directories to put on ``sys.path`` so a fresh interpreter finds ``executor``."""
    spec = importlib.util.find_spec(executor.__module__.partition(".")[0])
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [os.path.dirname(p) for p in spec.submodule_search_locations]
    return [os.path.dirname(spec.origin)] if spec.origin else []


def _script_runner(original: Callable, executor: type) -> Callable:
    """Wrap ``assert_python_ok`` so that its ``-c`` script imports ``executor``."""
    name = executor.__name__
    if getattr(concurrent.futures, name, None) is executor:
        return original  # a stdlib class: CPython's script is right as it is
    needle = f"from concurrent.futures import {name}"
    replacement = (
        f"import importlib; {name} = importlib.import_module({executor.__module__!r})"
        f".{executor.__qualname__}; import multiprocessing"
    )

    @functools.wraps(original)
    def run(*args, **env_vars):
        if executor.__module__ == "__main__":
            raise unittest.SkipTest("the executor is defined in __main__: scripts cannot import it")
        args = list(args)
        index = args.index("-c") + 1
        if needle not in args[index]:
            raise AssertionError(
                f"cpython_suite: CPython's script no longer contains {needle!r}; "
                "update _script_runner before trusting this test"
            )
        args[index] = args[index].replace(needle, replacement)
        # Any environment variable turns off test.support's -I/-E, so the
        # interpreter reads PYTHONPATH and keeps its site-packages.
        path = [*_import_roots(executor), os.environ.get("PYTHONPATH", "")]
        env_vars.setdefault("PYTHONPATH", os.pathsep.join(p for p in path if p))
        return original(*args, **env_vars)

    run._cpython_suite_wrapper = True
    return run


def _skip(test: Callable, reason: str, needs: tuple[str, ...]) -> Callable:
    if not needs:
        return unittest.skip(reason)(test)

    @functools.wraps(test)
    def run_if_exposed(self, *args, **kwargs):
        missing = [attr for attr in needs if not hasattr(self.executor, attr)]
        if missing:
            raise unittest.SkipTest(f"{reason} (the executor has no {', '.join(missing)})")
        return test(self, *args, **kwargs)

    run_if_exposed._cpython_suite_needs = needs
    return run_if_exposed


def _rebound_classmethods(cls: type, test_modules: set[str]) -> dict[str, staticmethod]:
    # ``self._test_traceback`` would be bound to the generated class, which
    # worker processes cannot import: bind it to CPython's class instead.
    found = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__ in test_modules:
            for attr, raw in vars(klass).items():
                if isinstance(raw, classmethod):
                    found[attr] = staticmethod(getattr(cls, attr))
    return found


def build_test_classes(
    executor: type | str | None = None,
    *,
    module: str | None = None,
    skips: Mapping[str, str] | None = None,
    run_if_exposed: Mapping[str, tuple[str, ...]] | None = None,
    deadlock_timeout: float | None = DEADLOCK_TIMEOUT,
    strict_env: bool | None = None,
    hard_timeout: float | None = TEST_TIMEOUT + HARD_TIMEOUT_GRACE,
) -> dict[str, type]:
    """Build ``unittest`` classes that run CPython's process-pool tests on ``executor``.

    Args:
        executor: the executor class, or ``"module:Class"``. Default: the
            ``FUTUREPOOL_CPYTHON_SUITE_EXECUTOR`` environment variable, else
            :data:`DEFAULT_EXECUTOR`.
        module: ``__module__`` of the classes; a pytest module passes its
            ``__name__`` and puts the result in its globals.
        skips: ``"Class.test": reason`` to skip. Default :data:`SKIPS`;
            ``{}`` runs everything, which only the stdlib class passes.
        run_if_exposed: the skips lifted when the executor object has the
            attributes named (default :data:`RUN_IF_EXPOSED`).
        deadlock_timeout: cap in seconds on ``ExecutorDeadlockTest.TIMEOUT``;
            ``None`` keeps CPython's value.
        strict_env: fail the tests that alter the environment. Default: the
            ``FUTUREPOOL_CPYTHON_SUITE_STRICT_ENV`` environment variable.
        hard_timeout: seconds after which a test's stacks are dumped to
            ``sys.__stderr__`` and the process exits (``faulthandler``);
            ``None`` for no limit.

    Returns:
        ``{name: class}``, with CPython's names for its spawn classes
        (``ProcessPoolSpawnProcessPoolExecutorTest`` ...).

    Raises:
        CPythonSuiteUnavailable: this interpreter has no usable CPython tests.
    """
    layout = _load_layout()
    if executor is None:
        executor = os.environ.get(EXECUTOR_ENV) or DEFAULT_EXECUTOR
    if isinstance(executor, str):
        executor = load_executor(executor)
    skips = SKIPS if skips is None else skips
    run_if_exposed = RUN_IF_EXPOSED if run_if_exposed is None else run_if_exposed
    strict_env = _strict_env_default() if strict_env is None else strict_env
    module = module or __name__
    test_modules = {m.__name__ for m in layout.modules}
    test_modules |= {_PACKAGE, f"{_PACKAGE}.util", f"{_PACKAGE}.executor"}
    bound_to = f"{executor.__module__}.{executor.__qualname__}"

    classes: dict[str, type] = {}
    for cpython_module in layout.modules:
        for name, cls in sorted(vars(cpython_module).items()):
            if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
                continue
            if not issubclass(cls, layout.spawn_mixin) or name in classes:
                continue
            attrs = {
                "__module__": module,
                "__qualname__": name,
                "__doc__": f"CPython's {cpython_module.__name__}.{name}, bound to {bound_to}.",
                "executor_type": executor if isinstance(executor, type) else staticmethod(executor),
                "_strict_env": strict_env,
                "_hard_timeout": hard_timeout,
                **_rebound_classmethods(cls, test_modules),
            }
            timeout = getattr(cls, "TIMEOUT", None)
            if deadlock_timeout is not None and isinstance(timeout, (int, float)):
                attrs["TIMEOUT"] = min(timeout, deadlock_timeout)
            for key, reason in skips.items():
                cls_name, _, test_name = key.partition(".")
                if cls_name == name and callable(getattr(cls, test_name, None)):
                    needs = tuple(run_if_exposed.get(key, ()))
                    attrs[test_name] = _skip(getattr(cls, test_name), reason, needs)
            classes[name] = type(name, (_Adapter, cls), attrs)

    for cpython_module in layout.modules:
        resources = vars(cpython_module).get(_RESOURCES)
        if resources is not None and _FAILING_INIT in classes:
            classes[_RESOURCES] = _bind_resources_test(resources, classes[_FAILING_INIT], module)
    return classes


def _tracker_pipe_holders() -> list[str]:
    """Other processes holding the resource tracker's pipe, as ``"pid cmdline"``.

    The tracker exits only when every writer has closed the pipe, so
    ``_resource_tracker._stop()`` waits for all of them. Linux only (reads
    ``/proc``); elsewhere, or without psutil, it finds nothing.
    """
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    try:
        import psutil

        pipe = os.readlink(f"/proc/self/fd/{tracker._fd}")
    except (ImportError, OSError, TypeError):
        return []
    holders = []
    for proc in psutil.process_iter():
        if proc.pid in (os.getpid(), tracker._pid):
            continue
        try:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
            if any(_readlink(f"/proc/{proc.pid}/fd/{fd}") == pipe for fd in fds):
                holders.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except (OSError, psutil.Error):
            continue
    return holders


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _bind_resources_test(cls: type, failing_init: type, module: str) -> type:
    def test_spawn(self):
        from multiprocessing import resource_tracker

        tracker = resource_tracker._resource_tracker
        stop = tracker._stop

        def stop_unless_held(*args, **kwargs):
            holders = _tracker_pipe_holders()
            if holders:
                raise AssertionError(
                    "the resource tracker cannot exit, other processes still hold its "
                    "pipe (CPython's check would wait for them forever): " + "; ".join(holders)
                )
            return stop(*args, **kwargs)

        with unittest.mock.patch.object(tracker, "_stop", stop_unless_held):
            self._test(failing_init)

    attrs = {
        "__module__": module,
        "__qualname__": cls.__name__,
        "executor_type": inspect.getattr_static(failing_init, "executor_type"),
        "_strict_env": failing_init._strict_env,
        "_hard_timeout": failing_init._hard_timeout,
        "test_spawn": test_spawn,
    }
    for attr in dir(cls):
        if attr.startswith("test") and attr != "test_spawn":
            attrs[attr] = None  # the forkserver variant: not bound (see the module doc)
    return type(cls.__name__, (_Adapter, cls), attrs)


class _Watchdog(threading.Thread):
    """Stops a run whose current test overruns: stacks, results so far, exit.

    A Python thread rather than ``faulthandler.dump_traceback_later`` alone,
    so that the failures collected so far are printed and the run's child
    processes are killed before the exit; faulthandler stays armed a little
    later as the backstop.
    """

    def __init__(self, timeout: float):
        super().__init__(name="cpython_suite-watchdog", daemon=True)
        self.timeout = timeout
        self.result: unittest.TestResult | None = None
        self._cond = threading.Condition()
        self._test = None
        self._deadline: float | None = None
        self._stopped = False

    def arm(self, test) -> None:
        with self._cond:
            self._test, self._deadline = test, time.monotonic() + self.timeout
            self._cond.notify()
        faulthandler.dump_traceback_later(self.timeout + 30, exit=True)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        with self._cond:
            self._test = self._deadline = None
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self.join()

    def run(self) -> None:
        with self._cond:
            while True:
                if self._stopped:
                    return
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            test = self._test
        out = sys.__stderr__
        print(f"\ncpython_suite: {test} ran over {self.timeout:.0f} s; every thread's stack:",
              file=out, flush=True)
        faulthandler.dump_traceback(file=out)
        if self.result is not None:
            for kind, items in (("FAIL", self.result.failures), ("ERROR", self.result.errors)):
                for failed, text in items:
                    print(f"\n{kind}: {failed}\n{text}", file=out)
        _kill_children()
        print(f"cpython_suite: stopped in {test}", file=out, flush=True)
        os._exit(1)


def _kill_children() -> None:
    try:
        import psutil
    except ImportError:
        return
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=5)


class _TimedResult(unittest.TextTestResult):
    """Arms the watchdog around each test and records how long it took."""

    watchdog: _Watchdog | None = None
    timings: list[tuple[float, str]] = []

    def startTest(self, test):
        self._started = time.monotonic()
        if self.watchdog is not None:
            self.watchdog.result = self
            self.watchdog.arm(test)
        super().startTest(test)

    def stopTest(self, test):
        if self.watchdog is not None:
            self.watchdog.disarm()
        self.timings.append((time.monotonic() - self._started, test.id()))
        super().stopTest(test)


def _iter_tests(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _iter_tests(item)
        else:
            yield item


_Argument = tuple[tuple[str, ...], dict]


def _parse_suite_args(
    argv: Iterable[str] | None,
    *,
    prog: str,
    description: str,
    target: str,
    default: str,
    noun: str,
    after_skips: Iterable[_Argument] = (),
    after_timeout: Iterable[_Argument] = (),
) -> argparse.Namespace:
    """The command line both suites share: ``target`` names the class under test
    (a ``noun``); ``after_skips`` and ``after_timeout`` are the suite's own options."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        target, default=default, metavar="MODULE:CLASS",
        help=f"the {noun} class to test (default: %(default)s)",
    )
    parser.add_argument(
        "-k", dest="patterns", action="append", default=[], metavar="PATTERN",
        help="only tests matching the pattern or substring (repeatable, as unittest -k)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-x", "--failfast", action="store_true", help="stop at the first failure")
    parser.add_argument("--list", action="store_true", help="list the tests and skips, run none")
    parser.add_argument(
        "--no-skips", action="store_true",
        help=f"run the SKIPS tests too (only the stdlib {noun} can pass them)",
    )
    for flags, options in after_skips:
        parser.add_argument(*flags, **options)
    parser.add_argument(
        "--strict-env", action="store_true", default=_strict_env_default(),
        help="fail the tests that leave threads running or child processes unreaped",
    )
    parser.add_argument(
        "--timeout", type=float, default=TEST_TIMEOUT,
        help="seconds per test before the stacks are dumped and the run stops (0: no limit)",
    )
    for flags, options in after_timeout:
        parser.add_argument(*flags, **options)
    parser.add_argument(
        "--durations", type=int, default=10, metavar="N", help="show the N slowest tests",
    )
    return parser.parse_args(None if argv is None else list(argv))


def _parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    return _parse_suite_args(
        argv,
        prog="python -m futurepool.testing.cpython_suite",
        description="Run CPython's concurrent.futures process-pool tests on an executor.",
        target="--executor",
        default=os.environ.get(EXECUTOR_ENV) or DEFAULT_EXECUTOR,
        noun="executor",
        after_timeout=[(
            ("--deadlock-timeout",),
            dict(
                type=float, default=DEADLOCK_TIMEOUT,
                help="cap on ExecutorDeadlockTest.TIMEOUT in seconds (default: %(default)s)",
            ),
        )],
    )


def _run_suite(
    args: argparse.Namespace,
    classes: Mapping[str, type],
    *,
    name: str,
    source: str,
    skip_reason: Callable[[Callable], str | None],
    result_class: type[_TimedResult],
    set_up: Callable[[], object],
    tear_down: Callable[[], object],
    env_changed: list[str],
    altered_by: str = "tests",
) -> int:
    """Run (or with ``--list``, list) ``classes`` under unittest and report; both suites' main.

    ``name`` prefixes the report lines, ``source`` says where the tests come
    from and what they are bound to, ``skip_reason(method)`` is what ``--list``
    shows, and ``set_up``/``tear_down`` are CPython's module fixture.
    """
    loader = unittest.TestLoader()
    loader.testNamePatterns = [p if "*" in p else f"*{p}*" for p in args.patterns] or None
    suite = unittest.TestSuite(loader.loadTestsFromTestCase(c) for c in classes.values())
    if args.list:
        for test in _iter_tests(suite):
            reason = skip_reason(getattr(test, test._testMethodName))
            print(test.id() + (f"  [skip {reason}]" if reason else ""))
        return 0

    from test import support

    support.verbose = args.verbose  # CPython's tearDown prints each test's duration if set
    if args.timeout:
        result_class.watchdog = _Watchdog(args.timeout)
        result_class.watchdog.start()
    set_up()
    runner = unittest.TextTestRunner(
        verbosity=1 + args.verbose, failfast=args.failfast, resultclass=result_class
    )
    print(
        f"{name}: {suite.countTestCases()} tests from {source}, Python {sys.version.split()[0]}",
        file=sys.stderr,
    )
    started = time.monotonic()
    try:
        result = runner.run(suite)
    finally:
        try:
            tear_down()
        finally:
            if result_class.watchdog is not None:
                result_class.watchdog.stop()
    elapsed = time.monotonic() - started

    slowest = sorted(result_class.timings, reverse=True)[: args.durations]
    if slowest:
        print(f"\nslowest {len(slowest)} tests:", file=sys.stderr)
        for seconds, test_id in slowest:
            print(f"  {seconds:6.2f}s  {test_id}", file=sys.stderr)
    if env_changed:
        print(f"\nenvironment altered by {len(env_changed)} {altered_by}:", file=sys.stderr)
        for test_id in env_changed:
            print(f"  {test_id}", file=sys.stderr)
    print(
        f"\n{name}: {result.testsRun} run, {len(result.failures)} failures, "
        f"{len(result.errors)} errors, {len(result.skipped)} skipped, "
        f"{len(env_changed)} env changed in {elapsed:.1f}s",
        file=sys.stderr,
    )
    return 0 if result.wasSuccessful() else 1


def _skip_reason(method: Callable) -> str | None:
    needs = getattr(method, "_cpython_suite_needs", ())
    if needs:
        return f"unless the executor has {', '.join(needs)}"
    return getattr(method, "__unittest_skip_why__", None)


def main(argv: list[str] | None = None) -> int:
    """Run the bound tests under unittest; returns the exit status (2: not available)."""
    args = _parse_args(argv)
    try:
        layout = _load_layout()
        classes = build_test_classes(
            args.executor,
            module=__name__,
            skips={} if args.no_skips else None,
            deadlock_timeout=args.deadlock_timeout or None,
            strict_env=args.strict_env,
            hard_timeout=None,  # the watchdog does better
        )
    except CPythonSuiteUnavailable as exc:
        print(f"cpython_suite: not run: {exc}", file=sys.stderr)
        return 2
    # CPython's module fixture: a thread-leak check over the whole run, then
    # multiprocessing's clean-up (resource tracker, forkserver, finalizers).
    return _run_suite(
        args,
        classes,
        name="cpython_suite",
        source=f"{_PACKAGE} (spawn variants), executor {args.executor}",
        skip_reason=_skip_reason,
        result_class=_TimedResult,
        set_up=layout.setup_module,
        tear_down=unittest.case.doModuleCleanups,
        env_changed=ENV_CHANGED,
    )


if __name__ == "__main__":
    sys.exit(main())
