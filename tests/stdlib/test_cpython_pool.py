"""CPython's own ``multiprocessing.Pool`` tests, run on futurepool.Pool.

The classes are CPython's ``processes`` test classes for the spawn start
method from the interpreter's installed ``test._test_multiprocessing``, with
the pool replaced; :mod:`futurepool.testing.cpython_pool_suite` explains the
binding and lists what it skips (only tests that read or patch the stdlib
pool's private internals) in ``SKIPS``. The module is skipped when this
interpreter has no CPython test package (Debian's python3.X without
libpython3.X-testsuite, for instance).

CPython's per-class checks stay on: ``BaseMixin.tearDownClass`` warns about
processes and threads left behind, on top of the leak fixtures in
``tests/conftest.py``. CPython's module fixture (``setUpModule`` and
``tearDownModule`` of ``test_multiprocessing_spawn``) is deliberately not
used here: its clean-up stops the multiprocessing resource tracker and runs
every multiprocessing finalizer in the process, which would break the test
modules that run after this one in the same pytest worker. Each class sets
the spawn start method for as long as it runs instead.
``python -m futurepool.testing.cpython_pool_suite`` runs the same tests under
unittest with that fixture.

To check the adapter itself, run the module against the stdlib::

    FUTUREPOOL_CPYTHON_POOL_SUITE_POOL=multiprocessing.pool:Pool \
        pytest tests/stdlib/test_cpython_pool.py
"""

from __future__ import annotations

import pytest

from futurepool.testing import cpython_pool_suite

# As in test_cpython_concurrent_futures.py: stop a hung test after
# TEST_TIMEOUT seconds (FUTUREPOOL_CPYTHON_SUITE_TIMEOUT, default 180); each
# bound test also arms faulthandler to end the process HARD_TIMEOUT_GRACE
# seconds later, for the deadlocks pytest-timeout's signal method misses.
pytestmark = pytest.mark.timeout(cpython_pool_suite.TEST_TIMEOUT)

# The leak check of tests/conftest.py runs around each test, and would blame
# the first test for workers of the class's shared pool that come up after
# Pool() returned: wait for them in setUpClass (up to this many seconds).
_SETTLE_TIMEOUT = 30.0

try:
    _CLASSES = cpython_pool_suite.build_test_classes(
        module=__name__, settle_timeout=_SETTLE_TIMEOUT
    )
except cpython_pool_suite.CPythonPoolSuiteUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

globals().update(_CLASSES)
