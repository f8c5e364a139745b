"""Tasks that submit tasks across network namespaces (issue 11 with issue 10's pulls).

The head runs no worker; the owners and their children run on two nodes in
namespaces of their own, each with its own store (``test_objects.Hosts``), so
a child's stored result reaches an owner on the other host only by a pull,
and every host's store must be empty at the end.
"""

from __future__ import annotations

import pytest

from ..conformance import _nested_tasks as N
from ._nodes import TIMEOUT
from .test_objects import hosts  # noqa: F401 - the two-node fixture

pytestmark = [pytest.mark.chaos, pytest.mark.usefixtures("network_available")]

MB = 1_000_000


def test_owners_and_children_on_two_hosts(hosts):  # noqa: F811
    with hosts.executor() as executor:
        hosts.start(executor, "node1", workers=2)
        hosts.start(executor, "node2", workers=2)
        assert executor.submit(N.fib, 10, executor).result(TIMEOUT) == 55
        total, places, owner = executor.submit(N.big_children, 6, 3 * MB).result(TIMEOUT)
        assert total == 18 * MB
        assert owner in {hosts.ns("node1"), hosts.ns("node2")}
        assert len(places) == 2, "the children ran on one host only"
        # A large value a remote task returns inside a future: borrowed by the driver.
        inner = executor.submit(N.returns_big_future, 2 * MB).result(TIMEOUT)
        assert inner.result(TIMEOUT) == b"x" * (2 * MB)
        del inner
        assert not executor._owner.relay.tasks
