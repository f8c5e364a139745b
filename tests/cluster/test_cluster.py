"""The cluster, end to end: `futurepool worker --connect` adds a host's cores (issue 9).

Real processes and real sockets: the head is this test process (or a script
run as the user runs it), every remote node a ``futurepool worker`` process.
Tests marked ``chaos`` put each node in its own network namespace
(:class:`futurepool.testing.netns.Network`), so addresses, reachability and
partitions are real; the others use loopback. A task proves where it ran by
returning the inode of its network namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import futurepool
from futurepool import config
from futurepool.errors import WorkerCrashedError
from futurepool.testing import netns, wait_until

from ._nodes import MY_NETNS, REPO, TIMEOUT, joined, start_worker, stop, where


@pytest.fixture
def fast_liveness(monkeypatch):
    """Tests use a deadline of about a second (the default is a few)."""
    monkeypatch.setattr(config, "NODE_TIMEOUT", 1.5)
    monkeypatch.setattr(config, "HEARTBEAT_INTERVAL", 0.2)
    return {"FUTUREPOOL_NODE_TIMEOUT": "1.5", "FUTUREPOOL_HEARTBEAT_INTERVAL": "0.2"}


# --- loopback -----------------------------------------------------------------------------


def test_a_remote_node_runs_tasks_and_leaves_on_sigterm(key_file):
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        assert executor.address.startswith("tcp://127.0.0.1:")
        assert executor._max_workers == 0
        proc = start_worker(executor.address, key_file)
        try:
            assert joined(executor, 2), "the node did not join"
            results = list(executor.map(where, range(20)))
            assert [x for _, x in results] == list(range(20))
            pending = executor.submit(where, "late", 0.5)
            time.sleep(0.1)
        finally:
            code, _out, err = stop(proc)
        # SIGTERM: the running task finished, nothing was lost; the node left cleanly.
        assert pending.result(timeout=TIMEOUT)[1] == "late"
        assert code == 0, err
        assert wait_until(lambda: executor._max_workers == 0, TIMEOUT)


def test_a_wrong_key_is_refused_within_ten_seconds(tmp_path, key_file):
    from futurepool.protocol import security

    other = security.create_key_file(tmp_path / "other.key")
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        started = time.monotonic()
        proc = start_worker(executor.address, other)
        code = proc.wait(timeout=TIMEOUT)
        took = time.monotonic() - started
        _out, err = proc.communicate()
    assert code == 1, err
    assert "authentication failed" in err
    assert took < 10.0
    assert executor._max_workers == 0


def test_a_version_mismatch_is_refused_on_both_sides(key_file, caplog):
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        proc = start_worker(executor.address, key_file,
                            env={"FUTUREPOOL_TESTING_FAULTS": "version-skew"})
        code = proc.wait(timeout=TIMEOUT)
        _out, err = proc.communicate()
    assert code == 1
    assert "versions differ" in err and "cloudpickle" in err and "+skew" in err, err
    assert any("versions differ" in r.getMessage() for r in caplog.records)


def test_bad_usage_is_one_line_and_exit_code_two():
    proc = subprocess.run([sys.executable, "-m", "futurepool", "worker", "--workers", "0",
                           "--connect", "tcp://127.0.0.1:1"], capture_output=True, text=True,
                          timeout=TIMEOUT, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--workers" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "futurepool", "worker"], capture_output=True,
                          text=True, timeout=TIMEOUT,
                          env={k: v for k, v in dict(os.environ, PYTHONPATH=REPO).items()
                               if k != "FUTUREPOOL_CONNECT"})
    assert proc.returncode == 2 and "--connect" in proc.stderr


def test_a_killed_node_fails_its_running_task_naming_the_node(key_file, fast_liveness):
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        proc = start_worker(executor.address, key_file, workers=1, env=fast_liveness)
        try:
            assert joined(executor, 1)
            running = executor.submit(where, "never", 60)
            time.sleep(0.5)
            proc.send_signal(signal.SIGSTOP)  # frozen: silent, its connection stays up
            with pytest.raises(WorkerCrashedError) as info:
                running.result(timeout=TIMEOUT)
            assert "was lost" in str(info.value) and "silent" in str(info.value)
        finally:
            proc.send_signal(signal.SIGCONT)
            stop(proc, signal.SIGKILL)


# --- several hosts: network namespaces -------------------------------------------------------

_SCRIPT = """
import json, os, sys, time
import futurepool

STATE = {"set": None}

def init(value):
    STATE["set"] = value

def task(x):
    time.sleep(0.05)
    return os.readlink("/proc/self/ns/net"), STATE["set"], x * x

if __name__ == "__main__":
    with futurepool.Executor(0, initializer=init, initargs=("from the initializer",)) as ex:
        print(json.dumps({"address": ex.address}), flush=True)
        deadline = time.monotonic() + 30
        while ex._max_workers < int(sys.argv[1]) and time.monotonic() < deadline:
            time.sleep(0.05)
        results = list(ex.map(task, range(40)))
    print(json.dumps(results), flush=True)
"""


@pytest.mark.chaos
def test_an_unchanged_script_scales_out_to_two_hosts(tmp_path, key_file):
    """FUTUREPOOL_LISTEN makes an unchanged script a head; two namespaces join it."""
    netns.skip_unless_available()
    script = tmp_path / "my_script.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    with netns.Network(nodes=2, head_in_root=False) as net:
        head = net.popen("head", [sys.executable, str(script), "4"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=REPO, FUTUREPOOL_KEY_FILE=key_file,
                                  FUTUREPOOL_LISTEN=f"tcp://{net.address('head')}:0"))
        first = head.stdout.readline()
        address = json.loads(first)["address"]
        assert address.startswith(f"tcp://{net.address('head')}:")
        nodes = [start_worker(address, key_file, net=net, member=m) for m in ("node1", "node2")]
        out, err = head.communicate(timeout=TIMEOUT * 2)
        assert head.returncode == 0, err
        results = json.loads(out.strip().splitlines()[-1])
        assert [r[2] for r in results] == [x * x for x in range(40)]
        assert {r[1] for r in results} == {"from the initializer"}
        namespaces = {r[0] for r in results}
        assert len(namespaces) == 2, "the tasks did not run on both hosts"
        for node in nodes:
            stop(node)


@pytest.mark.chaos
def test_a_partitioned_node_is_declared_dead_and_its_task_runs_elsewhere(key_file,
                                                                       fast_liveness):
    netns.skip_unless_available()
    with netns.Network(nodes=2, head_in_root=True) as net:
        listen = f"tcp://{net.address('head')}:0"
        with futurepool.Executor(0, listen=listen, key_file=key_file,
                                 max_retries=1) as executor:
            first = start_worker(executor.address, key_file, net=net, member="node1",
                                 workers=1, env=fast_liveness)
            assert joined(executor, 1)
            running = executor.submit(where, "survivor", 3.0)
            time.sleep(0.5)
            second = start_worker(executor.address, key_file, net=net, member="node2",
                                  workers=1, env=fast_liveness)
            net.partition("node1")
            namespace, value = running.result(timeout=TIMEOUT)
            assert value == "survivor"
            assert namespace != MY_NETNS
            net.heal("node1")
            # The node saw the head go silent too: it dropped that session and rejoins.
            assert wait_until(lambda: executor._max_workers == 2, TIMEOUT)
            for node in (first, second):
                stop(node)


_PRINTS = """
import os, subprocess, sys
import futurepool

def speak(x):
    print("out", x)
    print("err", x, file=sys.stderr)
    os.system(f"echo shell {x}")   # a child process writing to fd 1 directly
    return x

if __name__ == "__main__":
    key_file = sys.argv[1]
    with futurepool.Executor(0, listen="tcp://127.0.0.1:0", key_file=key_file) as ex:
        node = subprocess.Popen([sys.executable, "-m", "futurepool", "worker", "--connect",
                                 ex.address, "--key-file", key_file, "--workers", "1",
                                 "--once"])
        assert list(ex.map(speak, range(3))) == [0, 1, 2]
    node.wait(timeout=30)
"""


def test_what_remote_workers_print_reaches_the_driver_prefixed(tmp_path, key_file):
    script = tmp_path / "prints.py"
    script.write_text(textwrap.dedent(_PRINTS))
    proc = subprocess.run([sys.executable, str(script), key_file], capture_output=True,
                          text=True, timeout=TIMEOUT * 2, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr
    host = os.uname().nodename
    for x in range(3):
        assert f"[{host}:w0] out {x}\n" in proc.stdout, proc.stdout
        assert f"[{host}:w0] shell {x}\n" in proc.stdout, proc.stdout
        assert f"[{host}:w0] err {x}\n" in proc.stderr, proc.stderr


def test_status_shows_the_nodes_and_tasks(key_file):
    with futurepool.Executor(1, listen="tcp://127.0.0.1:0", key_file=key_file) as executor:
        proc = start_worker(executor.address, key_file, workers=2)
        try:
            assert joined(executor, 3)
            gate = [executor.submit(time.sleep, 1.0) for _ in range(4)]
            time.sleep(0.3)
            out = subprocess.run([sys.executable, "-m", "futurepool", "status", "--connect",
                                  executor.address, "--key-file", key_file, "--json"],
                                 capture_output=True, text=True, timeout=TIMEOUT,
                                 env=dict(os.environ, PYTHONPATH=REPO))
            assert out.returncode == 0, out.stderr
            status = json.loads(out.stdout)
            assert status["address"] == executor.address
            assert [n["workers"] for n in status["nodes"]] == [1, 2]
            assert sum(n["busy"] for n in status["nodes"]) == 3
            assert sum(status["tasks"].values()) == 4, status["tasks"]
            assert status["counts"] == {"submitted": 4, "failed": 0}, status["counts"]
            text = subprocess.run([sys.executable, "-m", "futurepool", "status", "--key-file",
                                   key_file], capture_output=True, text=True, timeout=TIMEOUT,
                                  env=dict(os.environ, PYTHONPATH=REPO))
            assert text.returncode == 0 and executor.address in text.stdout, text.stderr
            assert "4 submitted, 0 failed" in text.stdout, text.stdout
            for future in gate:
                future.result(timeout=TIMEOUT)
        finally:
            stop(proc)


def test_a_pool_listens_too(key_file):
    """Pool(0, listen=...): a multiprocessing.Pool whose workers are all on other hosts."""
    with futurepool.Pool(0, listen="tcp://127.0.0.1:0", key_file=key_file) as pool:
        assert pool.address.startswith("tcp://127.0.0.1:")
        proc = start_worker(pool.address, key_file, workers=2)
        try:
            assert pool.map(abs, range(-50, 0), chunksize=5) == list(range(50, 0, -1))
            assert sorted(pool.imap_unordered(abs, range(-20, 0))) == list(range(1, 21))
        finally:
            stop(proc)
