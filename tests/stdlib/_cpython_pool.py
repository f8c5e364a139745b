"""CPython's own ``multiprocessing.Pool`` tests, run on futurepool.Pool: the shared part.

``test_cpython_pool_fork.py``, ``_forkserver.py`` and ``_spawn.py`` each bind
CPython's ``processes`` test classes from the interpreter's installed
``test._test_multiprocessing`` for one start method, as CPython's
``test_multiprocessing_<method>`` packages do (the classes have the same
names for every start method, hence a module each), with the pool
replaced; :mod:`futurepool.testing.cpython_pool_suite` explains the binding
and lists what it skips, with reasons, in ``SKIPS``. A module is skipped when
this interpreter has no CPython test package (Debian's python3.X without
libpython3.X-testsuite, for instance), or when
``FUTUREPOOL_CPYTHON_SUITE_START_METHODS`` leaves its start method out.

CPython's per-class checks stay on: ``BaseMixin.tearDownClass`` warns about
processes and threads left behind, on top of the leak fixtures in
``tests/conftest.py``. CPython's module fixture (``setUpModule`` and
``tearDownModule`` of ``test_multiprocessing_<method>``) is deliberately not
used here: its clean-up stops the multiprocessing resource tracker and runs
every multiprocessing finalizer in the process, which would break the test
modules that run after this one in the same pytest worker. Each class sets
its start method for as long as it runs instead.
``python -m futurepool.testing.cpython_pool_suite`` runs the same tests under
unittest with that fixture.

To check the adapter itself, run the modules against the stdlib::

    FUTUREPOOL_CPYTHON_POOL_SUITE_POOL=multiprocessing.pool:Pool \\
        pytest tests/stdlib/test_cpython_pool_*.py
"""

from __future__ import annotations

import pytest

from futurepool.testing import cpython_pool_suite, cpython_suite

# The leak check of tests/conftest.py runs around each test, and would blame
# the first test for workers of the class's shared pool that come up after
# Pool() returned: wait for them in setUpClass (up to this many seconds).
_SETTLE_TIMEOUT = 30.0


def bind(start_method: str, module: str) -> dict[str, object]:
    """The globals of the pytest module ``module`` for ``start_method``: classes, pytestmark."""
    if start_method not in cpython_suite._start_methods_default():
        pytest.skip(
            f"{cpython_suite.START_METHODS_ENV} leaves out the {start_method} start method",
            allow_module_level=True,
        )
    try:
        classes = cpython_pool_suite.build_test_classes(
            start_method=start_method, module=module, settle_timeout=_SETTLE_TIMEOUT
        )
    except cpython_pool_suite.CPythonPoolSuiteUnavailable as exc:
        pytest.skip(str(exc), allow_module_level=True)
    # As in test_cpython_concurrent_futures.py: stop a hung test after
    # TEST_TIMEOUT seconds (FUTUREPOOL_CPYTHON_SUITE_TIMEOUT, default 180); each
    # bound test also arms faulthandler to end the process HARD_TIMEOUT_GRACE
    # seconds later, for the deadlocks pytest-timeout's signal method misses.
    return {"pytestmark": pytest.mark.timeout(cpython_pool_suite.TEST_TIMEOUT), **classes}
