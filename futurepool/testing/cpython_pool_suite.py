"""CPython's own ``multiprocessing.Pool`` tests, bound to any pool class.

``futurepool.Pool`` is meant to be a drop-in ``multiprocessing.pool.Pool``,
and the pool tests in CPython's ``test._test_multiprocessing`` are the
yardstick. As :mod:`futurepool.testing.cpython_suite` does for
``concurrent.futures``, this module does not copy those tests: it imports
them from the interpreter's installed ``test`` package (3.10 to 3.13) and
subclasses the classes CPython generates, replacing the pool.

How CPython binds a test to a pool: each behaviour lives in a plain class
derived from ``BaseTestCase`` whose ``ALLOWED_TYPES`` names the kinds it runs
on (``'processes'``, ``'threads'``, ``'manager'``).
``install_tests_in_module_dict(globals(), start_method)``, called by each
``test_multiprocessing_<start method>`` module, makes ``With<Type><Name>``
for each allowed type from ``(base, <Type>Mixin, unittest.TestCase)``, copies
the plain ``unittest.TestCase`` classes as they are, and adds a
``setUpModule`` that sets the start method (and a ``tearDownModule`` that
restores it and runs multiprocessing's clean-up). ``ProcessesMixin`` has
``Pool = staticmethod(multiprocessing.Pool)``.

The pool tests, and how each reaches the pool:

* ``WithProcessesTestPool`` (``_TestPool``): ``self.Pool(n)``, and a pool of
  4 that ``setUpClass`` shares between its tests (``self.pool``).
* ``WithProcessesTestPoolWorkerErrors`` and
  ``WithProcessesTestPoolWorkerLifetime``: ``multiprocessing.Pool(...)``,
  through the test module's global ``multiprocessing``; one test runs a
  script that does ``from multiprocessing import Pool``.
* ``TestInitializers.test_pool_initializer``: ``multiprocessing.Pool``.
* ``TestPoolNotLeakOnFailure``: ``multiprocessing.pool.Pool(5, context=...)``.
* ``MiscTestCase.test_large_pool`` (3.13): a script with
  ``multiprocessing.Pool(200)``.

The ``processes`` classes are bound once per start method, ``fork``,
``forkserver`` and ``spawn``, as CPython's ``test_multiprocessing_fork``,
``_forkserver`` and ``_spawn`` packages do, under CPython's names
(``WithProcessesTestPool`` ...): futurepool honours the start method as the
stdlib does (``futurepool.core.startup``), so each runs code paths of its
own. The names are the same for every start method, so each start method
gets a module of its own (``tests/stdlib/test_cpython_pool_<method>.py``;
``main()`` puts the start method in the test ids). ``start_methods=``
(``--start-method``, ``FUTUREPOOL_CPYTHON_SUITE_START_METHODS=fork,spawn``)
binds fewer. The ``threads`` and ``manager`` types test
``multiprocessing.dummy`` and ``SyncManager.Pool``, not a process pool. Not
bound: the manager's own ``TestInitializers.test_manager_initializer``, and
``TestStdinBadfiledescriptor.test_pool_in_process``, whose pool is made in a
``multiprocessing.Process`` (that imports the test module afresh under spawn
and forkserver, where no substitution reaches) and whose outcome the test
never checks (it ignores the child's exit code).

What the adapter changes, and nothing else:

* ``Pool`` is the pool under test, and so are ``multiprocessing.Pool`` and
  ``multiprocessing.pool.Pool`` as the test module sees them: while a test
  runs, the module's global ``multiprocessing`` is a view of the package in
  which only those two names differ.
* Scripts run in a fresh interpreter (``assert_python_ok``) are rewritten to
  import the pool under test, with ``PYTHONPATH`` pointing at it.
* The start method is the class's while a bound class runs, as in CPython's
  ``test_multiprocessing_<method>`` (set for the whole module there).
* Classmethods that are tasks (``_test_traceback``) are re-bound to the
  CPython class that defines them, so a task referring to one pickles by
  reference to a class that worker processes can import.
* :data:`SKIPS` are skipped, each with its reason: a test that injects a mock
  ``context`` the pool under test never calls, and the intended differences
  of futurepool (see the README's "Differences from the stdlib").
* ``test_pool_worker_lifetime`` calls ``pool._repopulate_pool()``, the stdlib
  pool's step that starts replacements for workers that exited: a pool
  without one gets a stand-in that returns at once (:data:`STAND_INS`).

Each bound test arms ``faulthandler`` to dump every stack and end the
process if it runs past ``TEST_TIMEOUT + HARD_TIMEOUT_GRACE`` seconds (see
:mod:`futurepool.testing.cpython_suite`). ``test.support`` sets
``environment_altered`` when a class leaves processes or threads behind;
bound classes and tests record that in :data:`ENV_CHANGED`, and fail when
strict (``--strict-env``, ``FUTUREPOOL_CPYTHON_SUITE_STRICT_ENV=1``).

From pytest (``tests/stdlib/test_cpython_pool_fork.py`` and its siblings)::

    globals().update(build_test_classes(start_method="fork", module=__name__))

From the command line, under unittest, on Python 3.10 to 3.13::

    python -m futurepool.testing.cpython_pool_suite [--pool module:Class]
        [--start-method fork] [-k pattern] [-v]

``--pool multiprocessing.pool:Pool`` runs the same selection on the stdlib,
which is how the adapter itself is checked (add ``--no-skips`` to run the
skipped tests too).
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import importlib
import importlib.util
import multiprocessing
import multiprocessing.pool
import os
import sys
import time
import unittest
import unittest.mock
from collections.abc import Callable, Iterable, Mapping

from .cpython_suite import (
    HARD_TIMEOUT_GRACE,
    START_METHODS,
    TEST_TIMEOUT,
    CPythonSuiteUnavailable,
    _Namespace,
    _parse_suite_args,
    _run_suite,
    _strict_env_default,
    _TestGuard,
    _TimedResult,
    _Watchdog,
)

__all__ = [
    "DEFAULT_POOL",
    "ENV_CHANGED",
    "HARD_TIMEOUT_GRACE",
    "SKIPS",
    "STAND_INS",
    "START_METHODS",
    "TEST_TIMEOUT",
    "CPythonPoolSuiteUnavailable",
    "build_test_classes",
    "load_pool",
    "main",
]

#: The pool bound when none is given, as ``"module:qualname"``.
DEFAULT_POOL = "futurepool:Pool"
#: Environment variable that overrides :data:`DEFAULT_POOL`.
POOL_ENV = "FUTUREPOOL_CPYTHON_POOL_SUITE_POOL"

_MODULE = "test._test_multiprocessing"

# CPython's generated classes, under the names it gives them.
_POOL = "WithProcessesTestPool"
_WORKER_ERRORS = "WithProcessesTestPoolWorkerErrors"
_LIFETIME = "WithProcessesTestPoolWorkerLifetime"
_INITIALIZERS = "TestInitializers"
_NOT_LEAK = "TestPoolNotLeakOnFailure"
_MISC = "MiscTestCase"

# Class -> the tests of it that exercise a pool (None: all of them).
_BOUND: dict[str, tuple[str, ...] | None] = {
    _POOL: None,
    _WORKER_ERRORS: None,
    _LIFETIME: None,
    _INITIALIZERS: ("test_pool_initializer",),
    _NOT_LEAK: None,
    _MISC: ("test_large_pool",),
}

#: ``"Class.test": reason`` for the tests that cannot apply to the pool under
#: test, in every start method: a mock injected where the pool under test
#: never looks, and the intended differences.
SKIPS: dict[str, str] = {
    f"{_WORKER_ERRORS}.test_unpickleable_result": (
        "intended difference: a task returning a lambda succeeds, because results travel"
        " by cloudpickle, like code; the test expects MaybeEncodingError, which still comes"
        " for what cloudpickle cannot pickle (a lock: tests/conformance/test_pool.py)"
    ),
    f"{_NOT_LEAK}.test_release_unused_processes": (
        "injects a mock context (context=MagicMock(Process=...)) whose fourth Process.start()"
        " fails; the pool under test starts its workers from its node, never through"
        " context.Process, so the mock is never called"
    ),
}

#: Private methods of the stdlib pool that a test calls and the pool under
#: test may lack, with the stand-in's behaviour and why it is faithful.
STAND_INS: dict[str, str] = {
    "_repopulate_pool": (
        "returns at once: test_pool_worker_lifetime calls it to start replacements for the"
        " workers that maxtasksperchild retired, then waits up to 5 s for pool._pool to be"
        " all alive; futurepool's node starts a replacement as soon as a worker exits"
    ),
}
# The tests that construct their pool through ``multiprocessing.Pool`` and
# need the STAND_INS.
_NEEDS_STAND_INS = frozenset({f"{_LIFETIME}.test_pool_worker_lifetime"})

#: Ids of the tests and classes that altered the environment, as they run.
ENV_CHANGED: list[str] = []


class CPythonPoolSuiteUnavailable(CPythonSuiteUnavailable):
    """This interpreter has no usable ``test._test_multiprocessing``."""


def _load_cpython_tests(start_method: str = "spawn") -> dict[str, object]:
    """CPython's test classes and module fixture for a start method, in a namespace."""
    try:
        tests = importlib.import_module(_MODULE)
    except unittest.SkipTest as exc:
        raise CPythonPoolSuiteUnavailable(f"{_MODULE} skips itself here: {exc}") from exc
    except ImportError as exc:
        raise CPythonPoolSuiteUnavailable(
            f"CPython's {_MODULE} is not installed with {sys.executable} "
            f"(Python {sys.version.split()[0]}): {exc}. Debian and Ubuntu ship it "
            "separately (libpython3.X-testsuite); pyenv and python.org builds include it."
        ) from exc
    # What test_multiprocessing_<method> does, into a namespace of our own: the
    # With<Type><Name> classes, the plain TestCases, setUpModule/tearDownModule.
    # (3.10 has no only_type=: the classes it adds for other types go unused.)
    namespace: dict[str, object] = {"__name__": f"{__name__}._cpython"}
    tests.install_tests_in_module_dict(namespace, start_method)
    missing = [name for name in _BOUND if name not in namespace and name != _MISC]
    if missing:
        raise CPythonPoolSuiteUnavailable(
            f"{_MODULE} of Python {sys.version.split()[0]} has no {', '.join(missing)}: "
            "update cpython_pool_suite._BOUND"
        )
    return namespace


def load_pool(spec: str) -> Callable:
    """Import ``"module:qualname"`` (such as ``"futurepool:Pool"``) and return it."""
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"pool must look like 'module:Class', got {spec!r}")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _spec_of(pool: Callable) -> str | None:
    """``"module:qualname"`` that imports ``pool`` in a fresh interpreter, if any."""
    module, qualname = getattr(pool, "__module__", None), getattr(pool, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<locals>" in qualname:
        return None
    spec = f"{module}:{qualname}"
    try:
        return spec if load_pool(spec) == pool else None
    except (ImportError, AttributeError):
        return None


def _multiprocessing_view(pool: Callable) -> _Namespace:
    """``multiprocessing`` with ``Pool`` and ``pool.Pool`` replaced by ``pool``."""
    return _Namespace(
        multiprocessing,
        {"Pool": pool, "pool": _Namespace(multiprocessing.pool, {"Pool": pool})},
    )


def _with_stand_ins(pool: Callable) -> Callable:
    """``pool``, given the :data:`STAND_INS` it lacks."""
    if not isinstance(pool, type) or hasattr(pool, "_repopulate_pool"):
        return pool
    return type(pool.__name__, (pool,), {
        "__module__": __name__,
        "__qualname__": pool.__qualname__,
        "__doc__": f"{pool.__qualname__} with a stand-in for _repopulate_pool (STAND_INS).",
        "_repopulate_pool": lambda self: None,
    })


def _import_roots(module_name: str) -> list[str]:
    """Directories to put on ``sys.path`` so a fresh interpreter finds ``module_name``."""
    spec = importlib.util.find_spec(module_name.partition(".")[0])
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [os.path.dirname(p) for p in spec.submodule_search_locations]
    return [os.path.dirname(spec.origin)] if spec.origin else []


# What CPython's scripts say, and the expression that replaces ``Pool`` there.
_SCRIPT_IMPORT = "from multiprocessing import Pool"
_SCRIPT_CALL = "multiprocessing.Pool("


def _script_runner(original: Callable, spec: str | None) -> Callable:
    """Wrap ``assert_python_ok`` so that its script uses the pool ``spec`` names."""

    @functools.wraps(original)
    def run(*args, **env_vars):
        if spec is None:
            raise unittest.SkipTest(
                "the pool cannot be imported by a fresh interpreter (defined in __main__"
                " or in a function), and this test runs a script"
            )
        module_name, _, qualname = spec.partition(":")
        expression = f"__import__('importlib').import_module({module_name!r}).{qualname}"
        args = list(args)
        if "-c" in args:
            index = args.index("-c") + 1
            args[index] = _rewrite_script(args[index], expression)
        else:
            # A script file the test wrote (and removes): rewrite it in place.
            path = next(a for a in args if isinstance(a, str) and not a.startswith("-"))
            with open(path, encoding="utf-8") as f:
                source = f.read()
            with open(path, "w", encoding="utf-8") as f:
                f.write(_rewrite_script(source, expression))
        # Any environment variable turns off test.support's -I/-E, so the
        # interpreter reads PYTHONPATH and keeps its site-packages.
        path = [*_import_roots(module_name), os.environ.get("PYTHONPATH", "")]
        env_vars.setdefault("PYTHONPATH", os.pathsep.join(p for p in path if p))
        return original(*args, **env_vars)

    run._cpython_pool_suite_wrapper = True
    return run


def _rewrite_script(source: str, expression: str) -> str:
    if _SCRIPT_IMPORT not in source and _SCRIPT_CALL not in source:
        raise AssertionError(
            f"cpython_pool_suite: CPython's script has neither {_SCRIPT_IMPORT!r} nor "
            f"{_SCRIPT_CALL!r}; update _rewrite_script before trusting this test"
        )
    # One line each, so the script's indentation is kept.
    source = source.replace(_SCRIPT_IMPORT, f"Pool = {expression}")
    return source.replace(_SCRIPT_CALL, f"{expression}(")


class _Adapter(_TestGuard):
    """Mixed in first: what every bound class and test does around CPython's own."""

    _env_changed = ENV_CHANGED
    _settle_timeout: float | None = None
    _pool_spec: str | None = None
    _view: _Namespace | None = None
    _stand_in_view: _Namespace | None = None
    _start_method = "spawn"

    @classmethod
    def setUpClass(cls):
        from test import support

        # CPython's test_multiprocessing_<method> sets the start method for the
        # whole module; here each class sets it for as long as it runs.
        old = multiprocessing.get_start_method(allow_none=True)
        if old != cls._start_method:
            multiprocessing.set_start_method(cls._start_method, force=True)
            cls.addClassCleanup(multiprocessing.set_start_method, old, force=True)
        cls._class_env_before = support.environment_altered
        support.environment_altered = False
        if cls._hard_timeout:
            # _TestPool.setUpClass starts a pool: that can hang too.
            faulthandler.dump_traceback_later(cls._hard_timeout, exit=True, file=sys.__stderr__)
        try:
            super().setUpClass()
            if cls._settle_timeout and getattr(cls, "pool", None) is not None:
                _wait_for_quiet_children(cls._settle_timeout)
        finally:
            if cls._hard_timeout:
                faulthandler.cancel_dump_traceback_later()

    @classmethod
    def tearDownClass(cls):
        from test import support

        try:
            super().tearDownClass()
        finally:
            altered = support.environment_altered
            support.environment_altered = cls._class_env_before or altered
        if altered:
            # BaseMixin.tearDownClass found processes or threads left behind.
            ENV_CHANGED.append(f"{cls.__module__}.{cls.__qualname__}")
            if cls._strict_env:
                raise AssertionError(
                    f"{cls.__qualname__} left processes or threads running (the warnings"
                    " of test.support are on stderr)"
                )

    def setUp(self):
        from test.support import script_helper

        self._guard_test()
        cpython = sys.modules[_MODULE]
        view = self._view
        if f"{type(self).__name__}.{self._testMethodName}" in _NEEDS_STAND_INS:
            view = self._stand_in_view
        patches = [
            unittest.mock.patch.dict(cpython.__dict__, {"multiprocessing": view}),
            unittest.mock.patch.object(
                script_helper,
                "assert_python_ok",
                _script_runner(script_helper.assert_python_ok, self._pool_spec),
            ),
        ]
        for patch in patches:
            patch.start()
            self.addCleanup(patch.stop)
        super().setUp()


def _wait_for_quiet_children(timeout: float, quiet: float = 1.0) -> None:
    """Wait until no child process has come or gone for ``quiet`` seconds.

    For the shared pool of ``_TestPool.setUpClass`` under pytest: a pool
    whose workers come up after ``Pool()`` returns (futurepool's node starts
    them) would otherwise have them blamed on the first test by the per-test
    leak check of ``tests/conftest.py``, which kills them.
    """
    import psutil

    def pids() -> set[int]:
        try:
            return {p.pid for p in psutil.Process().children(recursive=True)}
        except psutil.Error:
            return set()

    deadline = time.monotonic() + timeout
    last, since = pids(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = pids()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def _skip(test: Callable, reason: str) -> Callable:
    return unittest.skip(reason)(test)


def _rebound_classmethods(cls: type) -> dict[str, staticmethod]:
    # ``self._test_traceback`` would be bound to the generated class, which
    # worker processes cannot import: bind it to CPython's class that defines
    # it (``_TestPool``, a global of test._test_multiprocessing) instead.
    found = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__ != _MODULE or getattr(sys.modules[_MODULE], klass.__name__, None) \
                is not klass:
            continue
        for attr, raw in vars(klass).items():
            if isinstance(raw, classmethod) and attr.startswith("_test"):
                found[attr] = staticmethod(getattr(klass, attr))
    return found


def build_test_classes(
    pool: Callable | str | None = None,
    *,
    start_method: str = "spawn",
    module: str | None = None,
    skips: Mapping[str, str] | None = None,
    strict_env: bool | None = None,
    hard_timeout: float | None = TEST_TIMEOUT + HARD_TIMEOUT_GRACE,
    settle_timeout: float | None = None,
) -> dict[str, type]:
    """Build ``unittest`` classes that run CPython's pool tests on ``pool``.

    Args:
        pool: the pool class (or factory), or ``"module:Class"``. Default: the
            ``FUTUREPOOL_CPYTHON_POOL_SUITE_POOL`` environment variable, else
            :data:`DEFAULT_POOL`.
        start_method: the start method set while the classes run, one of
            :data:`START_METHODS` (CPython's ``test_multiprocessing_<method>``).
        module: ``__module__`` of the classes; a pytest module passes its
            ``__name__`` and puts the result in its globals.
        skips: ``"Class.test": reason`` to skip. Default :data:`SKIPS`;
            ``{}`` runs everything, which only the stdlib pool passes.
        strict_env: fail the tests and classes that alter the environment.
            Default: the ``FUTUREPOOL_CPYTHON_SUITE_STRICT_ENV`` environment
            variable.
        hard_timeout: seconds after which a test's stacks are dumped to
            ``sys.__stderr__`` and the process exits (``faulthandler``);
            ``None`` for no limit.
        settle_timeout: after a class has made its shared pool, wait up to
            this many seconds for its child processes to stop coming and
            going (for a per-test process-leak check); ``None``: do not wait.

    Returns:
        ``{name: class}``, with CPython's names (``WithProcessesTestPool`` ...).

    Raises:
        CPythonPoolSuiteUnavailable: this interpreter has no usable CPython tests.
        ValueError: a start method that is not one of :data:`START_METHODS`.
    """
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    cpython = _load_cpython_tests(start_method)
    if pool is None:
        pool = os.environ.get(POOL_ENV) or DEFAULT_POOL
    if isinstance(pool, str):
        spec, pool = pool, load_pool(pool)
    else:
        spec = _spec_of(pool)
    skips = SKIPS if skips is None else skips
    strict_env = _strict_env_default() if strict_env is None else strict_env
    module = module or __name__
    bound_to = spec.replace(":", ".") if spec else repr(pool)
    view = _multiprocessing_view(pool)
    stand_in_view = _multiprocessing_view(_with_stand_ins(pool))

    classes: dict[str, type] = {}
    for name, tests in _BOUND.items():
        cls = cpython.get(name)
        if cls is None:  # MiscTestCase.test_large_pool is new in 3.13
            continue
        attrs = {
            "__module__": module,
            "__qualname__": name,
            "__doc__": f"CPython's {_MODULE} {name} ({start_method}), bound to {bound_to}.",
            "Pool": staticmethod(pool),
            "_view": view,
            "_stand_in_view": stand_in_view,
            "_start_method": start_method,
            "_pool_spec": spec,
            "_strict_env": strict_env,
            "_hard_timeout": hard_timeout,
            "_settle_timeout": settle_timeout,
            **_rebound_classmethods(cls),
        }
        names = unittest.TestLoader().getTestCaseNames(cls)
        if tests is not None:
            if any(test not in names for test in tests):
                continue  # this version does not have the test
            for test in names:
                if test not in tests:
                    attrs[test] = None  # not a pool test: not bound
        for key, reason in skips.items():
            cls_name, _, test_name = key.partition(".")
            if cls_name == name and test_name in names and test_name not in attrs:
                attrs[test_name] = _skip(getattr(cls, test_name), reason)
        classes[name] = type(name, (_Adapter, cls), attrs)
    return classes


class _PoolTimedResult(_TimedResult):
    """cpython_suite's result class, with timings of its own."""

    watchdog: _Watchdog | None = None
    timings: list[tuple[float, str]] = []


def _parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    return _parse_suite_args(
        argv,
        prog="python -m futurepool.testing.cpython_pool_suite",
        description="Run CPython's multiprocessing.Pool tests on a pool class.",
        target="--pool",
        default=os.environ.get(POOL_ENV) or DEFAULT_POOL,
        noun="pool",
    )


def _skip_reason(method: Callable) -> str | None:
    return getattr(method, "__unittest_skip_why__", None)


def main(argv: Iterable[str] | None = None) -> int:
    """Run the bound tests under unittest; returns the exit status (2: not available)."""
    args = _parse_args(argv)
    classes: dict[str, type] = {}
    try:
        for method in args.start_methods:
            # One "module" per start method, as CPython's test_multiprocessing_<method>:
            # the ids say which (-k fork selects it).
            bound = build_test_classes(
                args.pool,
                start_method=method,
                module=f"{__name__}.{method}",
                skips={} if args.no_skips else None,
                strict_env=args.strict_env,
                hard_timeout=None,  # the watchdog does better
            )
            classes.update((f"{method}.{name}", cls) for name, cls in bound.items())
        cpython = _load_cpython_tests(args.start_methods[0])
    except CPythonPoolSuiteUnavailable as exc:
        print(f"cpython_pool_suite: not run: {exc}", file=sys.stderr)
        return 2
    except (ImportError, AttributeError, ValueError) as exc:
        print(f"cpython_pool_suite: cannot load the pool {args.pool!r}: {exc}", file=sys.stderr)
        return 2
    # CPython's module fixture for test_multiprocessing_<method>: the start
    # method, a check for dangling processes and threads over the whole run,
    # then multiprocessing's clean-up (resource tracker, forkserver, finalizers).
    # Each class sets its own start method while it runs.
    return _run_suite(
        args,
        classes,
        name="cpython_pool_suite",
        source=f"{_MODULE} (processes; {', '.join(args.start_methods)}), pool {args.pool}",
        skip_reason=_skip_reason,
        result_class=_PoolTimedResult,
        set_up=cpython["setUpModule"],
        tear_down=cpython["tearDownModule"],
        env_changed=ENV_CHANGED,
        altered_by="tests or classes",
    )


if __name__ == "__main__":
    sys.exit(main())
