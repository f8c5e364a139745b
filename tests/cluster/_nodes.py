"""Driving ``futurepool worker`` processes from tests: start, wait for the join, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import zmq

from futurepool.protocol import security
from futurepool.testing import wait_until

#: Seconds a node may take to join, a result to arrive, a process to exit.
TIMEOUT = 30.0
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def where(x=None, seconds=0.0):
    """Runs in a worker: which network namespace it is in, and its argument."""
    time.sleep(seconds)
    return os.readlink("/proc/self/ns/net"), x


MY_NETNS = os.readlink("/proc/self/ns/net")


def worker_command(address, key_file, *extra, workers=2):
    return [sys.executable, "-m", "futurepool", "worker", "--connect", address,
            "--key-file", str(key_file), "--workers", str(workers), *extra]


def start_worker(address, key_file, *extra, workers=2, net=None, member=None, env=None):
    command = worker_command(address, key_file, *extra, workers=workers)
    environment = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    if net is not None:
        return net.popen(member, command, **kwargs)
    return subprocess.Popen(command, **kwargs)


def joined(executor, slots):
    return wait_until(lambda: executor._max_workers >= slots, TIMEOUT)


def stop(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err




@contextlib.contextmanager
def node_peer(address, key_file):
    """A DEALER with the cluster's node key, connected to a head: an authenticated peer."""
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.linger = 0
    try:
        security.make_curve_client(peer, security.load_keys(key_file))
        peer.connect(address)
        yield peer
    finally:
        peer.close()
        ctx.term()
