"""Fixtures for the cluster's foundations: keys, key files, zmq contexts, networks."""

from __future__ import annotations

import threading

import pytest
import zmq

from futurepool.protocol import security
from futurepool.testing import netns

#: Seconds any single wait in these tests may take.
TIMEOUT = 10.0


@pytest.fixture
def secret() -> bytes:
    return bytes(range(32))


@pytest.fixture
def keys(secret) -> security.ClusterKeys:
    return security.derive_keypairs(secret)


@pytest.fixture
def key_file(tmp_path) -> str:
    return security.create_key_file(tmp_path / "cluster.key")


@pytest.fixture
def other_key_file(tmp_path) -> str:
    """A valid key file of another cluster."""
    return security.create_key_file(tmp_path / "other.key")


def term(context: zmq.Context, timeout: float = TIMEOUT) -> None:
    """Terminate ``context``, failing (not hanging) if a socket was left open."""
    done = threading.Thread(target=context.term, name="term-context")
    done.start()
    done.join(timeout)
    if done.is_alive():
        context.destroy(linger=0)
        done.join(timeout)
        pytest.fail(f"zmq context did not terminate within {timeout} s: a socket was left open")


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    term(ctx)


@pytest.fixture
def network_available() -> None:
    """Skip unless network namespaces can be built (root, iproute2, kernel support)."""
    netns.skip_unless_available()
