"""Session set-up and the leak checks that run after every test (FAULTS.md §2).

After each test, everything that appeared during it must be gone within
LEAK_TIMEOUT seconds: processes (exited *and* reaped), threads, entries in
this session's run directory and its shared-memory segments. A leftover fails
the test, is listed, and is cleaned up so that the next test starts clean.
A session-wide check does the same for module- and session-scoped fixtures.

Each xdist worker gets its own FUTUREPOOL_TMPDIR and FUTUREPOOL_SHM_PREFIX,
so parallel workers never see each other's files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

import psutil
import pytest

# futurepool.config reads its environment once, at import: set these first.
if "futurepool.config" in sys.modules:
    raise RuntimeError("futurepool.config was imported before tests/conftest.py set its variables")
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
RUN_ROOT = tempfile.mkdtemp(prefix=f"futurepool-{_WORKER}-{os.getpid()}-")
SHM_PREFIX = f"fp_{_WORKER}_{os.getpid()}_"
os.environ["FUTUREPOOL_TMPDIR"] = RUN_ROOT
os.environ["FUTUREPOOL_SHM_PREFIX"] = SHM_PREFIX

from futurepool.testing import (  # noqa: E402
    SHM_DIR,
    assert_no_leaked_files,
    assert_no_leaked_processes,
    assert_no_leaked_threads,
    descendants,
    list_entries,
    tagged_processes,
)

#: Seconds a test's leftovers get to disappear after it.
LEAK_TIMEOUT = 10.0

# Every process futurepool starts in this session inherits this variable,
# which finds them even after they have left our process tree.
_ENV_TAG = ("FUTUREPOOL_TMPDIR", RUN_ROOT)

# Threads cannot be killed: once a test is blamed for one, no later check is.
_reported_threads: set[threading.Thread] = set()


@dataclass(frozen=True)
class _Snapshot:
    processes: frozenset[psutil.Process]
    threads: frozenset[threading.Thread]
    run_entries: frozenset[str]
    segments: frozenset[str]


def _snapshot() -> _Snapshot:
    return _Snapshot(
        processes=frozenset(descendants()) | frozenset(tagged_processes(*_ENV_TAG)),
        threads=frozenset(threading.enumerate()),
        run_entries=frozenset(list_entries(RUN_ROOT)),
        segments=frozenset(list_entries(SHM_DIR, SHM_PREFIX)),
    )


def _check_threads(before: frozenset[threading.Thread]) -> None:
    try:
        assert_no_leaked_threads(before | _reported_threads, LEAK_TIMEOUT)
    except AssertionError:
        _reported_threads.update(threading.enumerate())
        raise


def _check_leaks(before: _Snapshot) -> None:
    # Processes first: threads of ours may be waiting for them to exit.
    checks = [
        lambda: assert_no_leaked_processes(before.processes, LEAK_TIMEOUT, env_tag=_ENV_TAG),
        lambda: _check_threads(before.threads),
        lambda: assert_no_leaked_files(RUN_ROOT, before.run_entries, LEAK_TIMEOUT),
        lambda: assert_no_leaked_files(SHM_DIR, before.segments, LEAK_TIMEOUT, prefix=SHM_PREFIX),
    ]
    failures = []
    for check in checks:
        try:
            check()
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        pytest.fail("Leak check failed.\n" + "\n".join(failures), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _no_session_leaks():
    """What module- and session-scoped fixtures started must be gone at the end."""
    before = _snapshot()
    yield
    _check_leaks(before)


@pytest.fixture(autouse=True)
def _no_leaks():
    """What the test (and its function-scoped fixtures) started must be gone after it."""
    before = _snapshot()
    yield
    _check_leaks(before)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("chaos") and os.geteuid() != 0:
        pytest.skip("chaos tests need root (network namespaces, cgroups, mounts)")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(RUN_ROOT, ignore_errors=True)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs file systems: ``tmpfs("16m")`` -> its path; unmounted at the end."""
    mounts = []

    def mount(size: str) -> str:
        path = tmp_path / f"tmpfs{len(mounts)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], check=True, timeout=30)
        mounts.append(path)
        return str(path)

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)
