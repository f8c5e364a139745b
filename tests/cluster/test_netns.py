"""Several hosts on one machine (futurepool.testing.netns), and CURVE across them.

Marked ``chaos``: they need root. Every address used belongs to a network
the test built (or is loopback); nothing is sent anywhere else.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import zmq

from futurepool.protocol import security
from futurepool.protocol.zap import AuthenticatorThread
from futurepool.testing import netns, wait_until
from futurepool.testing.netns import Network

from .conftest import TIMEOUT

pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("network_available")]

REPO = Path(__file__).resolve().parents[2]


def peer(net: Network, member: str, *args: str) -> subprocess.Popen:
    """Start ``python -m tests.cluster._peers ARGS`` in ``member``'s namespace."""
    return net.popen(member, [sys.executable, "-m", "tests.cluster._peers", *args],
                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line of ``proc``'s stdout, waiting at most ``timeout`` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no output from {proc.args} in {timeout} s")
    return proc.stdout.readline()


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=TIMEOUT * 2)
    return proc.returncode, out, err


def tcp_reachable(net: Network, source: str, target: str, port: int, timeout: float) -> bool:
    """Whether ``source`` can open a TCP connection to ``target``'s address and ``port``."""
    code = (f"import socket\ntry:\n socket.create_connection(({net.address(target)!r}, {port}),"
            f" timeout={timeout}).close()\nexcept OSError:\n raise SystemExit(1)")
    return net.run(source, [sys.executable, "-c", code], timeout=timeout + TIMEOUT).returncode == 0


@pytest.fixture
def listener():
    """A TCP listener in the test process, bound by the test to a network's head address."""
    sockets = []

    def listen(address: str) -> int:
        sock = socket.socket()
        sock.bind((address, 0))
        sock.listen(16)
        sockets.append(sock)
        return sock.getsockname()[1]

    yield listen
    for sock in sockets:
        sock.close()


# --- the helper itself ----------------------------------------------------------------------


def test_network_is_built_as_documented_and_leaves_nothing():
    with Network(2, head_in_root=True) as net:
        names = netns.leftovers(net.prefix)
        assert sorted(names) == sorted([f"link {net.prefix}", f"netns {net.prefix}-sw",
                                        f"netns {net.prefix}-node1", f"netns {net.prefix}-node2"])
        assert len(net.prefix) <= 15, "interface names are limited to 15 characters"
        assert net.subnet.subnet_of(ipaddress.ip_network("198.18.0.0/15"))
        addresses = [net.address(member) for member in net.members]
        assert len(set(addresses)) == 3
        assert all(ipaddress.ip_address(a) in net.subnet for a in addresses)
        for node in net.nodes:
            routes = net.run(node, ["ip", "-4", "route"], timeout=TIMEOUT, capture_output=True,
                             text=True).stdout
            assert "default" not in routes, "a namespace must not reach beyond the network"
            assert "lo" in net.run(node, ["ip", "-br", "link"], timeout=TIMEOUT,
                                   capture_output=True, text=True).stdout
        entry = Path(netns.REGISTRY, f"{net.token}.json")
        assert json.loads(entry.read_text())["subnet"] == str(net.subnet)
    assert net.closed
    assert netns.leftovers(net.prefix) == []
    assert not entry.exists()
    net.close()  # idempotent


def test_parallel_networks_get_their_own_names_and_subnets():
    with Network(1) as first, Network(1, head_in_root=True) as second:
        assert first.prefix != second.prefix
        assert not first.subnet.overlaps(second.subnet)
        assert first.namespace("head") == f"{first.prefix}-head"
        assert second.namespace("head") is None


def test_teardown_kills_every_process_in_the_namespaces():
    with Network(2) as net:
        started = net.popen("node1", ["sleep", "300"])
        # Started behind the helper's back: found through its namespace.
        hidden = subprocess.Popen(net.command("node2", ["sleep", "300"]))
        assert wait_until(lambda: len(net.processes()) == 2, TIMEOUT)
    assert started.returncode == -signal.SIGKILL
    # Killed and reaped by the teardown (so its Popen can only see exit status 0).
    hidden.wait(TIMEOUT)
    assert not psutil.pid_exists(hidden.pid)
    assert netns.leftovers(net.prefix) == []


def test_members_reach_each_other_over_the_switch(listener):
    with Network(2, head_in_root=True) as net:
        port = listener(net.address("head"))
        assert tcp_reachable(net, "node1", "head", port, TIMEOUT)
        assert tcp_reachable(net, "node2", "head", port, TIMEOUT)
        server = net.popen("node1", [sys.executable, "-c", textwrap.dedent(f"""
            import socket
            s = socket.socket(); s.bind(({net.address('node1')!r}, 7000)); s.listen()
            s.settimeout({TIMEOUT}); s.accept()[0].sendall(b'node-to-node')""")])
        code = textwrap.dedent(f"""
            import socket, time
            deadline = time.monotonic() + {TIMEOUT}
            while True:
                try:
                    c = socket.create_connection(({net.address('node1')!r}, 7000), timeout=1)
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            print(c.recv(100).decode())""")
        done = net.run("node2", [sys.executable, "-c", code], timeout=TIMEOUT * 2,
                       capture_output=True, text=True)
        assert done.stdout.strip() == "node-to-node", done.stderr
        assert server.wait(TIMEOUT) == 0


@pytest.mark.parametrize("cut, restore", [("partition", "heal"), ("link_down", "link_up")])
def test_partition_and_heal(listener, cut, restore):
    with Network(1, head_in_root=True) as net:
        port = listener(net.address("head"))
        assert tcp_reachable(net, "node1", "head", port, TIMEOUT)
        getattr(net, cut)("node1")
        assert not tcp_reachable(net, "node1", "head", port, 0.5)
        getattr(net, restore)("node1")
        assert wait_until(lambda: tcp_reachable(net, "node1", "head", port, 1.0), TIMEOUT)


def test_shaping_limits_bandwidth_both_ways(listener):
    payload = 400_000  # bytes; 0.4 s at 8 Mbit/s, a few ms unshaped

    def transfer_seconds(net: Network, port: int, server: socket.socket) -> float:
        code = (f"import socket, time\nc = socket.create_connection(({net.address('head')!r},"
                f" {port}), timeout={TIMEOUT})\nt = time.monotonic()\n"
                f"c.sendall(bytes({payload}))\nc.shutdown(socket.SHUT_WR)\nc.recv(1)\n"
                "print(time.monotonic() - t)")
        proc = net.popen("node1", [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        server.settimeout(TIMEOUT)
        conn, _ = server.accept()
        with conn:
            received = 0
            while chunk := conn.recv(65536):
                received += len(chunk)
            conn.sendall(b"!")
        out, _ = proc.communicate(timeout=TIMEOUT)
        assert received == payload
        return float(out)

    with Network(1, head_in_root=True) as net:
        server = socket.socket()
        try:
            server.bind((net.address("head"), 0))
            server.listen()
            port = server.getsockname()[1]
            net.shape("node1", 8_000_000)
            qdiscs = net.run("node1", ["tc", "qdisc", "show", "dev", "eth0"], timeout=TIMEOUT,
                             capture_output=True, text=True).stdout
            assert "tbf" in qdiscs and "8Mbit" in qdiscs
            assert transfer_seconds(net, port, server) > 0.25
            net.unshape("node1")
            assert transfer_seconds(net, port, server) < 0.25
        finally:
            server.close()


def test_networks_of_a_dead_creator_are_swept():
    creator = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import os, sys
            from futurepool.testing.netns import Network
            net = Network(1, head_in_root=True)
            print(net.prefix, net.token, flush=True)
            sys.stdin.read()
            os._exit(0)  # no teardown, as if killed
            """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        prefix, token = read_line(creator, TIMEOUT * 3).split()
        # Hold the registry so that no parallel test sweeps it before we look.
        lock = netns._lock_registry()
        try:
            creator.stdin.close()
            assert creator.wait(TIMEOUT) == 0
            assert len(netns.leftovers(prefix)) == 3
            assert token not in netns._live_entries()  # which removes it
            assert netns.leftovers(prefix) == []
        finally:
            os.close(lock)
    finally:
        if creator.poll() is None:
            creator.kill()
        creator.wait(TIMEOUT)
        creator.stdout.close()
        netns.sweep()


def test_invalid_members_and_sizes_are_refused():
    with pytest.raises(ValueError, match="nodes must be"):
        Network(0)
    with Network(1) as net:
        with pytest.raises(ValueError, match="member must be one of"):
            net.address("node2")
        with pytest.raises(ValueError, match="rate must be"):
            net.shape("node1", 0)


# --- CURVE across namespaces ------------------------------------------------------------------


def test_curve_between_namespaces_admits_the_key_and_refuses_others(
        key_file, other_key_file, caplog):
    """Head in the test process, nodes in namespaces: who gets in, and what the head logs."""
    caplog.set_level(logging.WARNING, "futurepool")
    keys = security.load_keys(key_file)
    context = zmq.Context()
    auth = AuthenticatorThread(context, security.admitted_keys(keys))
    server = context.socket(zmq.ROUTER)
    server.linger = 0
    try:
        with Network(3, head_in_root=True) as net:
            security.make_curve_server(server, keys)
            auth.watch(server)
            port = server.bind_to_random_port(f"tcp://{net.address('head')}")
            endpoint = f"tcp://{net.address('head')}:{port}"
            # node2: knows the head's public key, not the node key (ZAP refuses it);
            # node3: another cluster's key file (CURVE itself refuses it).
            stranger = peer(net, "node2", "call", endpoint, key_file, "--stranger",
                            "--timeout", "2")
            wrong = peer(net, "node3", "call", endpoint, other_key_file, "--timeout", "2")
            good = peer(net, "node1", "call", endpoint, key_file)
            assert server.poll(TIMEOUT * 1000), "the node with the key got nothing through"
            routing_id, body = server.recv_multipart()
            assert body == b"ping"
            server.send_multipart([routing_id, b"pong"])
            assert finish(good)[:2] == (0, "pong\n")
            for proc in (stranger, wrong):
                code, out, err = finish(proc)
                assert code == 3, err
                assert "handshakes 0" in out
            assert server.poll(0) == 0, "a refused node got a frame through"
            assert auth.admitted == 1 and auth.refused >= 2
            lines = [r.getMessage() for r in caplog.records if r.name == "futurepool"]
            assert any(f"from {net.address('node2')}" in line
                       and "not this cluster's node key" in line for line in lines), lines
            refused_wrong = [line for line in lines if "does not hold this cluster's key" in line]
            assert refused_wrong, lines
            # The address is best effort, but never another member's.
            assert all(f"from {net.address('node3')} " in line or "unknown address" in line
                       for line in refused_wrong), refused_wrong
    finally:
        server.close()
        auth.stop(TIMEOUT)
        context.term()


def test_curve_between_two_namespaces(key_file):
    """Head and node each in a namespace of their own, talking over the switch."""
    with Network(1) as net:
        head = peer(net, "head", "serve", net.address("head"), key_file)
        endpoint = read_line(head, TIMEOUT).strip()
        assert endpoint.startswith(f"tcp://{net.address('head')}:"), finish(head)
        node = peer(net, "node1", "call", endpoint, key_file)
        assert finish(node)[:2] == (0, "pong:ping\n")
        code, out, err = finish(head)
        assert code == 0, err
        assert out.strip() == "admitted 1 refused 0"


def test_key_file_is_checked_inside_a_namespace_too(key_file):
    """A node started in a namespace refuses a key file other users can read."""
    os.chmod(key_file, 0o644)
    with Network(1) as net:
        code, out, err = finish(peer(net, "node1", "call", "tcp://127.0.0.1:9", key_file))
    assert code != 0
    assert "mode 0644" in err and f"chmod 600 {key_file}" in err
