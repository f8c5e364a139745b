"""CPython's own ``concurrent.futures`` process-pool tests, bound to any executor.

``futurepool.Executor`` is meant to be a drop-in ``ProcessPoolExecutor``, and
CPython's test suite for that class is the yardstick. This module does not
copy those tests: it imports them from the interpreter's installed ``test``
package (``test.test_concurrent_futures``: a package of modules from 3.12 on,
one module on 3.10 and 3.11) and subclasses the classes CPython generated for
its process pools, replacing ``executor_type``.

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
for threads left running and reaps child processes after each test.

The classes of all three start methods are bound, under the names CPython
gives them (``ProcessPoolForkProcessPoolExecutorTest``,
``ProcessPoolForkserverExecutorDeadlockTest``,
``ProcessPoolSpawnWaitTest`` ...): futurepool honours ``mp_context`` as the
stdlib does (``futurepool.core.startup``), so each start method runs code
paths of its own: under ``fork`` workers start all at once and inherit the
caller's memory, under ``forkserver`` and ``spawn`` they start on demand and
import the main script. ``start_methods=`` (``--start-method``,
``FUTUREPOOL_CPYTHON_SUITE_START_METHODS=fork,spawn``) binds fewer.

What the adapter changes, and nothing else:

* ``executor_type`` is the executor under test.
* :data:`SKIPS` are skipped, each with its reason: tests that patch the
  stdlib executor's internals (which the executor under test does not use,
  so the patch would reach nothing), and the intended differences of
  futurepool (see the README's "Differences from the stdlib").
* Three shutdown tests construct ``futures.ProcessPoolExecutor`` themselves
  (:data:`CONSTRUCTS_STDLIB_EXECUTOR`): while they run, their module's
  ``futures`` is a view of ``concurrent.futures`` whose
  ``ProcessPoolExecutor`` is the executor under test, so that they test it
  rather than the stdlib. Two of them also join the feeder thread of the
  stdlib's call queue (``executor._call_queue.join_thread()``) after the
  manager thread and the processes: an executor without a ``_call_queue``
  (futurepool has no call queue: the thread that is
  ``_executor_manager_thread`` sends the calls itself) gets a stand-in whose
  ``join_thread()`` returns at once (:data:`STAND_INS`).
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
* ``FailingInitializerResourcesTest`` runs the bound failing-initializer
  classes instead of CPython's, and fails at once, instead of hanging, if
  another process still holds the resource tracker's pipe.
* On 3.10 only, ``threading_helper.threading_cleanup`` (which every test's
  ``tearDown`` calls) is CPython's own check without its leftover loop
  variable: when the check fails it prints the dangling threads, and the
  last one printed stayed referenced by the loop, so a stopped thread that
  a garbage collection would free kept the check retrying, with a full
  collection each time, for 100 rounds (seconds per test). The check, its
  warnings and ``environment_altered`` are unchanged; 3.11 replaced it with
  a count of running threads.

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

    python -m futurepool.testing.cpython_suite [--executor module:Class]
        [--start-method fork] [-k pattern] [-v]

``--executor concurrent.futures:ProcessPoolExecutor`` runs the same selection
on the stdlib, which is how the adapter itself is checked (add
``--no-skips`` to run the skipped tests too).
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
    "CONSTRUCTS_STDLIB_EXECUTOR",
    "DEADLOCK_TIMEOUT",
    "DEFAULT_EXECUTOR",
    "HARD_TIMEOUT_GRACE",
    "ENV_CHANGED",
    "SKIPS",
    "STAND_INS",
    "START_METHODS",
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
#: The start methods whose classes CPython generates, in its order.
START_METHODS = ("fork", "forkserver", "spawn")
#: Environment variable naming the start methods to bind (``fork,spawn``).
START_METHODS_ENV = "FUTUREPOOL_CPYTHON_SUITE_START_METHODS"

_PACKAGE = "test.test_concurrent_futures"

# A plain TestCase (3.12+) that runs the failing-initializer class of a start
# method, then checks that the resource tracker exits cleanly (gh-104090).
_RESOURCES = "FailingInitializerResourcesTest"


def _variant(method: str) -> str:
    """``"forkserver"`` -> ``"ProcessPoolForkserver"``: how CPython's class names start."""
    return f"ProcessPool{method.capitalize()}"


def _in_every_variant(cls: str, test: str, reason: str) -> dict[str, str]:
    return {f"{_variant(m)}{cls}.{test}": reason for m in START_METHODS}


#: ``"Class.test": reason`` for the tests that cannot apply to the executor
#: under test: the ones that patch the stdlib executor's internals, and the
#: intended differences. A name that this Python's suite does not have is
#: ignored (``test_python_finalization_error`` is new in 3.12, for instance).
SKIPS: dict[str, str] = {
    **_in_every_variant("ProcessPoolExecutorTest", "test_python_finalization_error", (
        "patches threading._start_joinable_thread so that the stdlib executor's second"
        " thread start (its call queue's feeder thread) fails, gh-109047; the executor under"
        " test starts no such thread, so the patch reaches nothing it checks"
    )),
    **_in_every_variant(
        "ExecutorDeadlockTest", "test_gh105829_should_not_deadlock_if_wakeup_pipe_full", (
            "patches concurrent.futures.process._ExecutorManagerThread.run and"
            " _ThreadWakeup to fill the stdlib's wakeup pipe, gh-105829; the executor under"
            " test uses neither"
        )),
    **_in_every_variant("ProcessPoolExecutorTest", "test_killed_child", (
        "intended difference: a worker that dies fails only the task it was running"
        " (WorkerCrashedError, a BrokenProcessPool) and is replaced; the test expects the"
        " whole pool to break, every later submit() included"
    )),
    f"{_variant('fork')}ProcessPoolExecutorTest.test_max_tasks_per_child": (
        "intended difference: max_tasks_per_child is accepted with the fork start method"
        " (workers are forked from futurepool's node, which runs no user code); the test"
        " expects ValueError"
    ),
}

#: The tests that construct ``concurrent.futures.ProcessPoolExecutor``
#: themselves instead of ``executor_type``: their module's ``futures`` is a
#: view in which ``ProcessPoolExecutor`` is the executor under test.
CONSTRUCTS_STDLIB_EXECUTOR: frozenset[str] = frozenset({
    f"{_variant(m)}ProcessPoolShutdownTest.{test}"
    for m in START_METHODS
    for test in ("test_context_manager_shutdown", "test_del_shutdown", "test_shutdown_no_wait")
})

#: Private attributes of the stdlib executor that a test calls and the
#: executor under test may lack, with the stand-in's behaviour and why it is
#: faithful. Only the executors of :data:`CONSTRUCTS_STDLIB_EXECUTOR` get it.
STAND_INS: dict[str, str] = {
    "_call_queue": (
        "an object whose join_thread() returns at once: test_del_shutdown and"
        " test_shutdown_no_wait join the stdlib's call-queue feeder thread after the manager"
        " thread and the worker processes; futurepool sends calls from the thread it exposes"
        " as _executor_manager_thread, which those tests join first"
    ),
}

#: Ids of the tests that altered the environment, appended as tests run.
ENV_CHANGED: list[str] = []


class CPythonSuiteUnavailable(Exception):
    """This interpreter has no usable ``test.test_concurrent_futures``."""


@dataclass(frozen=True)
class _Layout:
    """Where this interpreter keeps the tests, whichever version it is."""

    modules: tuple[types.ModuleType, ...]
    mixins: dict[str, type]  # start method -> CPython's ProcessPool<Method>Mixin
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
    mixins = {method: getattr(util, f"{_variant(method)}Mixin") for method in START_METHODS}
    return _Layout(tuple(modules), mixins, setup_module)


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
        from test.support import threading_helper

        if sys.version_info < (3, 11):
            self._patch_attr(threading_helper, "threading_cleanup", _threading_cleanup_310)
        if self._hard_timeout:
            # The last resort against a hang no signal can interrupt: dump
            # every stack and exit (pytest-xdist then reports the crashed test).
            faulthandler.dump_traceback_later(self._hard_timeout, exit=True, file=sys.__stderr__)
            self.addCleanup(faulthandler.cancel_dump_traceback_later)
        self._env_before = support.environment_altered
        support.environment_altered = False

    def _patch_attr(self, obj, name: str, value) -> None:
        original = getattr(obj, name)
        setattr(obj, name, value)
        self.addCleanup(setattr, obj, name, original)

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


def _threading_cleanup_310(*original_values):
    """CPython 3.10's ``threading_helper.threading_cleanup``, minus one reference.

    Word for word but for ``del thread``: 3.10 kept the last dangling thread
    it printed in the loop variable, so that thread could never be freed
    while the check waited for it (see the module docstring).
    """
    import _thread

    from test import support

    for count in range(100):
        values = _thread._count(), threading._dangling
        if values == original_values:
            break

        if not count:
            # Display a warning at the first iteration
            support.environment_altered = True
            dangling_threads = values[1]
            support.print_warning(f"threading_cleanup() failed to cleanup "
                                  f"{values[0] - original_values[0]} threads "
                                  f"(count: {values[0]}, "
                                  f"dangling: {len(dangling_threads)})")
            for thread in dangling_threads:
                support.print_warning(f"Dangling thread: {thread!r}")
                del thread  # the one change

            # Don't hold references to threads
            dangling_threads = None
        values = None

        time.sleep(0.01)
        support.gc_collect()


class _Namespace(types.ModuleType):
    """A module as the tests see it: ``overrides``, then the real module's attributes."""

    def __init__(self, module: types.ModuleType, overrides: Mapping[str, object]):
        super().__init__(module.__name__, module.__doc__)
        self.__dict__.update(overrides)
        self.__dict__["_cpython_suite_real"] = module

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_cpython_suite_real"], name)

    def __repr__(self) -> str:
        return f"<view of {self.__name__} with the class under test>"


class _NoCallQueue:
    """The stand-in for ``executor._call_queue`` (see :data:`STAND_INS`)."""

    def join_thread(self) -> None:
        return None


def _as_stdlib_executor(executor: type) -> type:
    """``executor``, given the :data:`STAND_INS` it lacks, for the tests that build their own."""
    if hasattr(executor, "_call_queue"):
        return executor
    return type(executor.__name__, (executor,), {
        "__module__": __name__,
        "__qualname__": executor.__qualname__,
        "__doc__": f"{executor.__qualname__} with a stand-in for _call_queue (STAND_INS).",
        "_call_queue": property(lambda self: _NoCallQueue()),
    })


class _Adapter(_TestGuard):
    """Mixed in first into each concurrent.futures test class."""

    def setUp(self):
        self._guard_test()
        self._patch_subprocess_scripts()
        self._patch_stdlib_constructor()
        super().setUp()

    def _test_globals(self) -> dict:
        test = inspect.unwrap(getattr(type(self), self._testMethodName))
        return getattr(test, "__globals__", {})

    def _patch_subprocess_scripts(self):
        # The shutdown tests call ``assert_python_ok`` from their module's
        # globals: swap in one that imports the executor under test.
        namespace = self._test_globals()
        original = namespace.get("assert_python_ok")
        if original is None or getattr(original, "_cpython_suite_wrapper", False):
            return
        wrapper = _script_runner(original, self.executor_type)
        if wrapper is not original:
            namespace["assert_python_ok"] = wrapper
            self.addCleanup(namespace.__setitem__, "assert_python_ok", original)

    def _patch_stdlib_constructor(self):
        # Only for the tests listed: others compare ``executor_type`` with
        # ``futures.ProcessPoolExecutor`` to skip the stdlib (test_hang_gh83386).
        if f"{type(self).__name__}.{self._testMethodName}" not in CONSTRUCTS_STDLIB_EXECUTOR:
            return
        executor = self.executor_type
        if executor is concurrent.futures.ProcessPoolExecutor:
            return
        namespace = self._test_globals()
        if namespace.get("futures") is not concurrent.futures:
            raise AssertionError(
                f"cpython_suite: {self.id()} no longer finds concurrent.futures as 'futures';"
                " update _patch_stdlib_constructor before trusting this test")
        view = _Namespace(concurrent.futures,
                          {"ProcessPoolExecutor": _as_stdlib_executor(executor)})
        namespace["futures"] = view
        self.addCleanup(namespace.__setitem__, "futures", concurrent.futures)


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


def _skip(test: Callable, reason: str) -> Callable:
    return unittest.skip(reason)(test)


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


def _start_methods_default() -> tuple[str, ...]:
    names = os.environ.get(START_METHODS_ENV, "")
    return tuple(n.strip() for n in names.split(",") if n.strip()) or START_METHODS


def build_test_classes(
    executor: type | str | None = None,
    *,
    module: str | None = None,
    skips: Mapping[str, str] | None = None,
    start_methods: Iterable[str] | None = None,
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
        start_methods: bind the classes of these start methods only. Default:
            the ``FUTUREPOOL_CPYTHON_SUITE_START_METHODS`` environment variable
            (comma-separated), else all of :data:`START_METHODS`.
        deadlock_timeout: cap in seconds on ``ExecutorDeadlockTest.TIMEOUT``;
            ``None`` keeps CPython's value.
        strict_env: fail the tests that alter the environment. Default: the
            ``FUTUREPOOL_CPYTHON_SUITE_STRICT_ENV`` environment variable.
        hard_timeout: seconds after which a test's stacks are dumped to
            ``sys.__stderr__`` and the process exits (``faulthandler``);
            ``None`` for no limit.

    Returns:
        ``{name: class}``, with CPython's names
        (``ProcessPoolForkProcessPoolExecutorTest``,
        ``ProcessPoolSpawnWaitTest`` ...).

    Raises:
        CPythonSuiteUnavailable: this interpreter has no usable CPython tests.
        ValueError: a start method that is not one of :data:`START_METHODS`.
    """
    methods = _start_methods_default() if start_methods is None else tuple(start_methods)
    unknown = [m for m in methods if m not in START_METHODS]
    if unknown:
        raise ValueError(f"start_methods must be among {START_METHODS}, got {unknown!r}")
    layout = _load_layout()
    if executor is None:
        executor = os.environ.get(EXECUTOR_ENV) or DEFAULT_EXECUTOR
    if isinstance(executor, str):
        executor = load_executor(executor)
    skips = SKIPS if skips is None else skips
    strict_env = _strict_env_default() if strict_env is None else strict_env
    module = module or __name__
    test_modules = {m.__name__ for m in layout.modules}
    test_modules |= {_PACKAGE, f"{_PACKAGE}.util", f"{_PACKAGE}.executor"}
    bound_to = f"{executor.__module__}.{executor.__qualname__}"
    mixins = tuple(layout.mixins[m] for m in START_METHODS if m in methods)

    classes: dict[str, type] = {}
    for cpython_module in layout.modules:
        for name, cls in sorted(vars(cpython_module).items()):
            if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
                continue
            if not issubclass(cls, mixins) or name in classes:
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
                    attrs[test_name] = _skip(getattr(cls, test_name), reason)
            classes[name] = type(name, (_Adapter, cls), attrs)

    for cpython_module in layout.modules:
        resources = vars(cpython_module).get(_RESOURCES)
        if resources is not None:
            classes[_RESOURCES] = _bind_resources_test(resources, classes, module)
            break
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


def _bind_resources_test(cls: type, classes: Mapping[str, type], module: str) -> type:
    """CPython's gh-104090 check, run on the bound failing-initializer classes.

    ``test_<method>`` runs ``ProcessPool<Method>FailingInitializerTest``;
    the test of a start method that is not bound is dropped.
    """

    def bind(method: str, failing_init: type, cpython_test: Callable) -> Callable:
        @functools.wraps(cpython_test)
        def test(self):
            from multiprocessing import resource_tracker

            tracker = resource_tracker._resource_tracker
            stop = tracker._stop

            def stop_unless_held(*args, **kwargs):
                holders = _tracker_pipe_holders()
                if holders:
                    raise AssertionError(
                        "the resource tracker cannot exit, other processes still hold its "
                        "pipe (CPython's check would wait for them forever): "
                        + "; ".join(holders)
                    )
                return stop(*args, **kwargs)

            with unittest.mock.patch.object(tracker, "_stop", stop_unless_held):
                self._test(failing_init)

        return test

    some_class = None
    attrs: dict[str, object] = {"__module__": module, "__qualname__": cls.__name__}
    for attr in dir(cls):
        if not attr.startswith("test"):
            continue
        method = attr[len("test_"):]
        failing_init = classes.get(f"{_variant(method)}FailingInitializerTest")
        if failing_init is None:
            attrs[attr] = None  # its start method is not bound
            continue
        some_class = failing_init
        attrs[attr] = bind(method, failing_init, getattr(cls, attr))
    if some_class is not None:
        attrs.update({
            "executor_type": inspect.getattr_static(some_class, "executor_type"),
            "_strict_env": some_class._strict_env,
            "_hard_timeout": some_class._hard_timeout,
        })
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
    parser.add_argument(
        "--start-method", dest="start_methods", action="append", choices=START_METHODS,
        help="bind the classes of this start method only (repeatable; default: "
             f"${START_METHODS_ENV}, else all of {', '.join(START_METHODS)})",
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
    args = parser.parse_args(None if argv is None else list(argv))
    args.start_methods = tuple(args.start_methods or _start_methods_default())
    return args


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
            start_methods=args.start_methods,
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
        source=f"{_PACKAGE} ({', '.join(args.start_methods)}), executor {args.executor}",
        skip_reason=_skip_reason,
        result_class=_TimedResult,
        set_up=layout.setup_module,
        tear_down=unittest.case.doModuleCleanups,
        env_changed=ENV_CHANGED,
    )


if __name__ == "__main__":
    sys.exit(main())
