"""Memory faults in a cgroup (FAULTS.md 18, and issue 12 point 5 against the OOM killer).

A driver runs in a subprocess inside a fresh memory cgroup (v2 ``memory.max``
or v1 ``memory.limit_in_bytes``, 400 MB; we are root, so these are marked
``chaos``), with its node and workers. A task that allocates past the
cgroup's limit is killed by the kernel's OOM killer: its future fails with
``WorkerCrashedError`` naming SIGKILL with the OOM hint, and the pool runs
the next task (FAULTS 18). Given a ``memory_limit`` below the cgroup's, the
same task is stopped by futurepool first: ``TaskMemoryError``, and the
kernel killed nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0
CGROUP_LIMIT = 400 * 10**6

DRIVER = """
import json, sys
import futurepool
from tests.conformance import _control_tasks as C

if __name__ == "__main__":
    out = {}
    with futurepool.Executor(1) as executor:
        executor.submit(abs, 1).result(30)
        limit = json.loads(sys.argv[1])
        view = executor.options(memory_limit=limit) if limit else executor
        try:
            out["result"] = view.submit(C.grow, 8 * 10**6).result(60)
        except BaseException as error:
            out["error"] = type(error).__name__
            out["message"] = str(error)
            out["signal"] = getattr(error, "signal_name", None)
        out["next"] = executor.submit(abs, -3).result(30)
    print(json.dumps(out))
"""


def _memory_cgroup() -> tuple[Path, str, str] | None:
    """(this process's memory cgroup, its limit file, its OOM-kill counter file), or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if controllers == "" and Path(f"/sys/fs/cgroup{path}/cgroup.controllers").exists():
            if "memory" in Path(f"/sys/fs/cgroup{path}/cgroup.controllers").read_text().split():
                return Path(f"/sys/fs/cgroup{path}"), "memory.max", "memory.events"
        if "memory" in controllers.split(","):
            return Path(f"/sys/fs/cgroup/memory{path}"), "memory.limit_in_bytes", \
                "memory.oom_control"
    return None


def _oom_kills(text: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return 0


@pytest.fixture
def cgroup():
    """A new memory cgroup limited to CGROUP_LIMIT: ``(path, oom-counter file)``."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    found = _memory_cgroup()
    if found is None:
        pytest.skip("no memory cgroup controller here")
    parent, limit_file, events_file = found
    path = parent / f"futurepool-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
        (path / limit_file).write_text(str(CGROUP_LIMIT))
    except OSError as exc:
        if path.exists():
            path.rmdir()
        pytest.skip(f"cannot make a memory cgroup under {parent}: {exc}")
    try:
        yield path, events_file
    finally:
        deadline = time.monotonic() + TIMEOUT
        while True:  # its last pages are uncharged a moment after its processes exit
            try:
                path.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def run_in(cgroup, memory_limit) -> dict:
    path, _events = cgroup
    command = (f"echo $$ > {path / 'cgroup.procs'} && exec {sys.executable} -c"
               f" \"$FP_DRIVER\" '{json.dumps(memory_limit)}'")
    done = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, timeout=TIMEOUT * 2, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), FP_DRIVER=DRIVER))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.chaos
def test_the_kernel_oom_kill_is_a_worker_crash_with_a_hint(cgroup):
    """FAULTS 18: the OOM killer picks the growing worker; the node survives it."""
    out = run_in(cgroup, None)
    assert out["error"] == "WorkerCrashedError", out
    assert out["signal"] == "SIGKILL" and "out-of-memory killer" in out["message"], out
    assert out["next"] == 3
    path, events = cgroup
    assert _oom_kills((path / events).read_text()) >= 1


@pytest.mark.chaos
def test_a_memory_limit_stops_the_task_before_the_oom_killer(cgroup):
    out = run_in(cgroup, 250 * 10**6)
    assert out["error"] == "TaskMemoryError", out
    assert "250.0MB" in out["message"], out
    assert out["next"] == 3
    path, events = cgroup
    assert _oom_kills((path / events).read_text()) == 0, "the kernel killed a process first"
