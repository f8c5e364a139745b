"""CPython's own ``concurrent.futures`` process-pool tests, run on futurepool.Executor.

The classes are CPython's process-pool test classes for the fork, forkserver
and spawn start methods, from the interpreter's installed
``test.test_concurrent_futures``, with ``executor_type`` replaced;
:mod:`futurepool.testing.cpython_suite` explains the binding and lists what it
skips, with reasons, in ``SKIPS`` (tests that patch the stdlib executor's
internals, and futurepool's intended differences).
``FUTUREPOOL_CPYTHON_SUITE_START_METHODS=fork,spawn`` binds fewer start
methods. The module is skipped when this interpreter has no CPython test
package (Debian's python3.X without libpython3.X-testsuite, for instance).

CPython's per-test checks stay on: ``BaseTestCase`` warns about threads left
running and reaps child processes after each test, on top of the leak
fixtures in ``tests/conftest.py``. CPython's module fixture
(``setup_module``) is deliberately not used here: its clean-up stops the
multiprocessing resource tracker and runs every multiprocessing finalizer in
the process, which would break the test modules that run after this one in
the same pytest worker. ``python -m futurepool.testing.cpython_suite`` runs
the same tests under unittest with that fixture.

To check the adapter itself, run the module against the stdlib::

    FUTUREPOOL_CPYTHON_SUITE_EXECUTOR=concurrent.futures:ProcessPoolExecutor \
        pytest tests/stdlib/test_cpython_concurrent_futures.py
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from futurepool.testing import cpython_suite

# Most of CPython's tests wait for results without a deadline: stop a hung
# test after TEST_TIMEOUT seconds (FUTUREPOOL_CPYTHON_SUITE_TIMEOUT, default
# 180) rather than the suite-wide 600. pytest-timeout's signal method has
# missed a deadlock here (the stdlib's gh-125451 race on 3.13.0), so each
# bound test also arms faulthandler to end the process HARD_TIMEOUT_GRACE
# seconds later; pytest-xdist then reports the test as crashed. (The thread
# method would do both, but its timer thread trips the session leak check.)
pytestmark = pytest.mark.timeout(cpython_suite.TEST_TIMEOUT)

try:
    _CLASSES = cpython_suite.build_test_classes(module=__name__)
except cpython_suite.CPythonSuiteUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

# gh-104090's test stops the process-wide resource tracker and expects it to
# exit cleanly, so it fails whenever an earlier test in the same pytest worker
# still has a semaphore registered. It runs in a fresh interpreter instead,
# through the same adapter (test_resource_tracker_test_in_a_fresh_process).
_ISOLATED = "FailingInitializerResourcesTest"
# Not kept in a module global: pytest collects any TestCase it finds there,
# whatever its name, and would run it in-process after all.
_ISOLATED_TESTS = [name for name in dir(_CLASSES.get(_ISOLATED, object))
                   if name.startswith("test")
                   and callable(getattr(_CLASSES.get(_ISOLATED, object), name))]
_CLASSES.pop(_ISOLATED, None)
globals().update(_CLASSES)


@pytest.mark.skipif(not _ISOLATED_TESTS, reason=f"this Python's suite has no {_ISOLATED}")
def test_resource_tracker_test_in_a_fresh_process():
    """CPython's FailingInitializerResourcesTest, alone in its own interpreter."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-m", "futurepool.testing.cpython_suite", "-k", _ISOLATED],
        capture_output=True, text=True, timeout=cpython_suite.TEST_TIMEOUT, env=env)
    report = done.stdout + done.stderr  # unittest reports on stderr
    assert done.returncode == 0, report[-3000:]
    assert f": {len(_ISOLATED_TESTS)} run, 0 failures, 0 errors," in report, report[-3000:]
