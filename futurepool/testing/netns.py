"""Several hosts on one machine: network namespaces joined by a virtual switch.

:class:`Network` builds a head and N nodes, each in its own network namespace
(the head may instead be the root namespace, i.e. the test process itself),
all plugged into one bridge that lives in a namespace of its own::

    head (root ns, or ns fpn<T>-head)      switch ns fpn<T>-sw        node ns fpn<T>-node1
    ┌────────────────────────────┐        ┌──────────────────────┐    ┌───────────────────┐
    │ fpn<T> / eth0  198.18.X.1  ◄─veth───► p0 ─┐                │    │ eth0  198.18.X.2  │
    └────────────────────────────┘        │      br0 ◄── p1 ◄────┼────► (veth)            │
                                          │     (bridge)  ...    │    └───────────────────┘
                                          └──────────────────────┘

* **Names** carry a random token ``T`` per network (``fpn`` + 6 hex digits),
  so parallel tests (pytest-xdist workers) never collide. Interfaces inside
  our namespaces have fixed short names; the only one in the root namespace
  (when the head is there) is ``fpn<T>``, 9 characters (the limit is 15).
* **Addresses** come from 198.18.0.0/15 (RFC 2544, reserved for network
  benchmarks, never routed on the Internet): one /24 per network, allocated
  through a registry of lock files under ``/run/futurepool-netns`` so two live
  networks never share one, and never one that overlaps a root route.
  Namespaces get no default route: traffic can only reach the addresses of
  the network itself (and each namespace's own loopback).
* **The bridge lives in a namespace**, not in the root one, so that the
  host's firewall (``br_netfilter``, Docker's FORWARD policy) cannot drop
  traffic between nodes.
* **Faults**: :meth:`Network.link_down` / :meth:`Network.link_up` take a
  member's switch port down (its side sees no carrier);
  :meth:`Network.partition` / :meth:`Network.heal` silently unplug a member
  from the bridge (both sides stay up, packets vanish, as in a real
  partition); :meth:`Network.shape` limits bandwidth with ``tbf`` in both
  directions. This kernel has no ``netem``: delays and drops need the
  product's fault hooks or a proxy.
* **Teardown** (:meth:`Network.close`, the ``with`` exit, or a finaliser at
  interpreter exit) kills every process in the network's namespaces, not only
  those started through :meth:`Network.popen`, then deletes the root link and
  the namespaces. A network whose creator died without closing it (SIGKILL)
  is removed by the next :class:`Network` created on the machine, or by
  :func:`sweep`. :func:`leftovers` lists what remains, for tests to assert on.

Everything here needs root and iproute2; :func:`unavailable_reason` says
why it cannot work, and :func:`skip_unless_available` skips a pytest test.
"""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import weakref
from collections.abc import Sequence

import psutil

from futurepool.testing.leaks import kill_processes

__all__ = [
    "NETNS_PREFIX",
    "Network",
    "leftovers",
    "skip_unless_available",
    "sweep",
    "unavailable_reason",
]

#: Every namespace, and every root-namespace link, made here starts with this.
NETNS_PREFIX = "fpn"

#: Where networks register their names and /24 (lock files; root only).
REGISTRY = "/run/futurepool-netns"

_SUBNETS = ipaddress.ip_network("198.18.0.0/15")
_SWITCH_PORT = "p{}"  # in the switch namespace; p0 is the head's
_MEMBER_LINK = "eth0"  # in a member's own namespace
_NETNS_DIR = "/run/netns"

# Seconds one `ip` / `tc` command may take.
_COMMAND_TIMEOUT = 10.0


# --- availability --------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why networks cannot be built here, or ``None`` if they can.

    Checks root, ``ip``, and (once per process) that a namespace with a
    bridge and a veth pair can really be created.
    """
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip` command, which is not installed"
    probe = f"{NETNS_PREFIX}probe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("link", "add", "name", "br0", "type", "bridge", netns=probe)
        _ip("link", "add", "name", "va", "type", "veth", "peer", "name", "vb", netns=probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot build virtual networks here: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def skip_unless_available() -> None:
    """Skip the calling pytest test, with the reason, unless networks can be built."""
    reason = unavailable_reason()
    if reason is not None:
        import pytest

        pytest.skip(reason)


# --- commands ----------------------------------------------------------------------------


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    return _command(["ip", *(["-n", netns] if netns else []), *args], check)


def _tc(*args: str, netns: str | None = None, check: bool = True) -> str:
    if shutil.which("tc") is None:
        raise RuntimeError("shaping needs iproute2's `tc` command, which is not installed")
    return _command(["tc", *(["-n", netns] if netns else []), *args], check)


def _command(args: list[str], check: bool) -> str:
    done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=_COMMAND_TIMEOUT)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed ({done.returncode}):"
                           f" {done.stderr.strip()}")
    return done.stdout


def _namespaces() -> list[str]:
    try:
        return sorted(os.listdir(_NETNS_DIR))
    except FileNotFoundError:
        return []


def _root_links() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


def leftovers(prefix: str = NETNS_PREFIX) -> list[str]:
    """Namespaces and root-namespace links whose name starts with ``prefix``.

    Pass a network's :attr:`Network.prefix` to see only its own: other
    tests running in parallel may have live networks of their own.

    Returns:
        ``["netns fpn1a2b3c-sw", "link fpn1a2b3c", ...]``, sorted.
    """
    return ([f"netns {name}" for name in _namespaces() if name.startswith(prefix)]
            + [f"link {name}" for name in _root_links() if name.startswith(prefix)])


# --- processes in a namespace ------------------------------------------------------------


def _namespace_id(name: str) -> tuple[int, int] | None:
    try:
        status = os.stat(os.path.join(_NETNS_DIR, name))
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def _processes_in(names: Sequence[str]) -> list[psutil.Process]:
    """Processes whose network namespace is one of ``names``."""
    wanted = {ident for ident in map(_namespace_id, names) if ident is not None}
    if not wanted:
        return []
    found = []
    me = os.getpid()
    for pid in psutil.pids():
        if pid == me:
            continue
        try:
            status = os.stat(f"/proc/{pid}/ns/net")
            if (status.st_dev, status.st_ino) in wanted:
                found.append(psutil.Process(pid))
        except (OSError, psutil.Error):
            continue
    return found


def _remove(namespaces: Sequence[str], links: Sequence[str], timeout: float) -> None:
    """Kill everything in ``namespaces``, then delete ``links`` and ``namespaces``."""
    deadline = time.monotonic() + timeout
    while True:
        procs = _processes_in(namespaces)
        if not procs or time.monotonic() > deadline:
            break
        kill_processes(procs, timeout=max(0.1, deadline - time.monotonic()))
    present = set(_root_links())
    for link in links:
        if link in present:  # deleting one end of a veth deletes both
            _ip("link", "del", link, check=False)
    for name in namespaces:
        if _namespace_id(name) is not None:
            _ip("netns", "del", name, check=False)


# --- the registry ---------------------------------------------------------------------------


def _lock_registry() -> int:
    os.makedirs(REGISTRY, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(REGISTRY, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by other processes only for a few ip commands
    return fd


def _live_entries() -> dict[str, dict]:
    """Registered networks whose creator lives; those of dead creators are removed.

    Call with the registry locked. A creator holds an exclusive ``flock`` on
    its entry for the network's lifetime, so an entry that can be locked
    belongs to a process that is gone (the kernel released its lock).
    """
    live = {}
    for entry in sorted(os.listdir(REGISTRY)):
        if not entry.endswith(".json"):
            continue
        path = os.path.join(REGISTRY, entry)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            with open(fd, closefd=False) as file:
                try:
                    record = json.load(file)
                except ValueError:
                    record = {}
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live[entry[:-5]] = record
                continue
            _remove(record.get("namespaces", []), record.get("links", []), timeout=10.0)
            os.unlink(path)
        finally:
            os.close(fd)
    return live


def sweep() -> list[str]:
    """Remove the networks whose creator died without closing them.

    Also removes the probe namespace of :func:`unavailable_reason` if the
    process that made it is gone.

    Returns:
        The tokens of the networks removed.
    """
    if unavailable_reason() is not None:
        return []
    lock = _lock_registry()
    try:
        before = {entry[:-5] for entry in os.listdir(REGISTRY) if entry.endswith(".json")}
        swept = sorted(before - set(_live_entries()))
    finally:
        os.close(lock)
    probe = NETNS_PREFIX + "probe"
    for name in _namespaces():
        if name.startswith(probe) and name[len(probe):].isdigit():
            if not psutil.pid_exists(int(name[len(probe):])):
                _ip("netns", "del", name, check=False)
    return swept


def _taken_subnets(live: dict[str, dict]) -> set[ipaddress.IPv4Network]:
    taken = {ipaddress.ip_network(record["subnet"]) for record in live.values()
             if "subnet" in record}
    # Nothing on this host may already route into the /24 we pick.
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        try:
            routed = ipaddress.ip_network(route.get("dst", ""), strict=False)
        except ValueError:  # "default", or a name
            continue
        if routed.overlaps(_SUBNETS):
            taken.update(s for s in _SUBNETS.subnets(new_prefix=24) if s.overlaps(routed))
    return taken


# --- the network --------------------------------------------------------------------------


class _State:
    """What a network must undo; shared with its finaliser (which must not hold the network)."""

    def __init__(self):
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.popens: list[subprocess.Popen] = []
        self.entry_fd: int | None = None
        self.entry_path: str | None = None


def _close_state(state: _State, timeout: float) -> None:
    for proc in state.popens:
        if proc.poll() is None:
            proc.kill()
    for proc in state.popens:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass  # left to _remove, which finds it by namespace
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    # The switch last: members first lose their links, then the bridge goes.
    _remove(state.namespaces[::-1], state.links, timeout)
    if state.entry_fd is not None:
        if state.entry_path and os.path.exists(state.entry_path):
            os.unlink(state.entry_path)
        os.close(state.entry_fd)  # releases the flock
        state.entry_fd = None


class Network:
    """A head and ``nodes`` nodes on one switch, each in its own network namespace.

    Members are named ``"head"``, ``"node1"`` ... ``"nodeN"``. With
    ``head_in_root=True`` the head is the root namespace: code in the test
    process can bind the head's :meth:`address` directly, and nodes reach it
    over their veth links. Anything a test sends must go to loopback or to
    :meth:`address` of a member.

    Args:
        nodes: how many node namespaces (1 to 200).
        head_in_root: the head is the root namespace, not one of its own.
        timeout: seconds teardown may take to kill processes.

    Raises:
        RuntimeError: networks cannot be built here (see
            :func:`unavailable_reason`), or an ``ip`` command failed; whatever
            was built is removed first.

    .. versionadded:: 0.2
    """

    def __init__(self, nodes: int = 1, *, head_in_root: bool = False, timeout: float = 10.0):
        if not isinstance(nodes, int) or not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be between 1 and 200, got {nodes!r}")
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        self.head_in_root = head_in_root
        self.timeout = timeout
        self._state = state = _State()
        self._finalizer = weakref.finalize(self, _close_state, state, timeout)
        try:
            self._register(nodes)
            self._build()
        except BaseException:
            self._finalizer()
            raise

    # -- names and addresses

    @property
    def members(self) -> list[str]:
        """``["head", "node1", ...]``."""
        return ["head", *self.nodes]

    def namespace(self, member: str) -> str | None:
        """The namespace ``member`` lives in, or ``None`` for a head in the root namespace."""
        self._check_member(member)
        if member == "head" and self.head_in_root:
            return None
        return f"{self.prefix}-{member}"

    def address(self, member: str) -> str:
        """``member``'s IPv4 address on the switch (the head's is the subnet's first)."""
        return str(self.subnet[self._index(member) + 1])

    def _index(self, member: str) -> int:
        self._check_member(member)
        return 0 if member == "head" else int(member[4:])

    def _check_member(self, member: str) -> None:
        if member != "head" and member not in self.nodes:
            raise ValueError(f"member must be one of {self.members}, got {member!r}")

    def _link(self, member: str) -> tuple[str | None, str]:
        """(namespace, interface) of ``member``'s own end of its link."""
        if member == "head" and self.head_in_root:
            return None, self.prefix
        return self.namespace(member), _MEMBER_LINK

    # -- building

    def _register(self, nodes: int) -> None:
        lock = _lock_registry()
        try:
            live = _live_entries()
            existing = set(_namespaces()) | set(_root_links())
            while True:
                token = secrets.token_hex(3)
                if token not in live and not any(n.startswith(NETNS_PREFIX + token)
                                                 for n in existing):
                    break
            candidates = list(_SUBNETS.subnets(new_prefix=24))
            taken = _taken_subnets(live)
            start = secrets.randbelow(len(candidates))
            for subnet in candidates[start:] + candidates[:start]:
                if subnet not in taken:
                    break
            else:
                raise RuntimeError(f"every /24 of {_SUBNETS} is in use by live networks")
            self.token, self.subnet = token, subnet
            self.prefix = NETNS_PREFIX + token
            self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
            state = self._state
            state.namespaces = [f"{self.prefix}-sw"] + [
                name for name in map(self.namespace, self.members) if name is not None]
            state.links = [self.prefix] if self.head_in_root else []
            path = os.path.join(REGISTRY, f"{token}.json")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            state.entry_fd, state.entry_path = fd, path
            os.write(fd, json.dumps({"pid": os.getpid(), "subnet": str(subnet),
                                     "namespaces": state.namespaces,
                                     "links": state.links}).encode())
        finally:
            os.close(lock)

    def _build(self) -> None:
        switch = self._state.namespaces[0]
        for name in self._state.namespaces:
            _ip("netns", "add", name)
            _ip("link", "set", "lo", "up", netns=name)
        _ip("link", "add", "name", "br0", "type", "bridge", netns=switch)
        _ip("link", "set", "br0", "up", netns=switch)
        for member in self.members:
            port = _SWITCH_PORT.format(self._index(member))
            netns, link = self._link(member)
            if netns is None:
                _ip("link", "add", "name", link, "type", "veth", "peer", "name", port, "netns",
                    switch)
            else:
                _ip("link", "add", "name", port, "type", "veth", "peer", "name", link, "netns",
                    netns, netns=switch)
            _ip("link", "set", port, "master", "br0", netns=switch)
            _ip("link", "set", port, "up", netns=switch)
            _ip("addr", "add", f"{self.address(member)}/{self.subnet.prefixlen}", "dev", link,
                netns=netns)
            _ip("link", "set", link, "up", netns=netns)

    # -- processes

    def command(self, member: str, args: Sequence[str]) -> list[str]:
        """``args`` prefixed to run in ``member``'s namespace (``ip netns exec``)."""
        netns = self.namespace(member)
        return list(args) if netns is None else ["ip", "netns", "exec", netns, *args]

    def popen(self, member: str, args: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``args`` in ``member``'s namespace; killed at teardown if still running.

        ``ip netns exec`` execs the command in place, so the process returned
        is the command itself. Keyword arguments go to ``subprocess.Popen``.
        """
        proc = subprocess.Popen(self.command(member, args), **kwargs)
        self._state.popens.append(proc)
        return proc

    def run(self, member: str, args: Sequence[str], *, timeout: float,
            **kwargs) -> subprocess.CompletedProcess:
        """Run ``args`` in ``member``'s namespace to completion (``subprocess.run``).

        Raises:
            subprocess.TimeoutExpired: it ran past ``timeout`` seconds (and was killed).
        """
        return subprocess.run(self.command(member, args), timeout=timeout, **kwargs)

    def processes(self) -> list[psutil.Process]:
        """Every process living in one of this network's namespaces.

        Teardown kills all of them, and reaps those that are children of this
        process: a ``Popen`` made without :meth:`popen` then reads exit status 0.
        """
        return _processes_in(self._state.namespaces)

    # -- faults

    def link_down(self, member: str) -> None:
        """Take ``member``'s switch port down: its link loses carrier."""
        self._switch_port(member, "down")

    def link_up(self, member: str) -> None:
        """Undo :meth:`link_down`."""
        self._switch_port(member, "up")

    def partition(self, member: str) -> None:
        """Unplug ``member`` from the switch; both ends stay up, packets are lost silently."""
        self._switch_port(member, "nomaster")

    def heal(self, member: str) -> None:
        """Undo :meth:`partition`."""
        self._switch_port(member, "master", "br0")

    def _switch_port(self, member: str, *change: str) -> None:
        _ip("link", "set", _SWITCH_PORT.format(self._index(member)), *change,
            netns=self._state.namespaces[0])

    def shape(self, member: str, rate: int, *, burst: int | None = None,
              latency: float = 0.05) -> None:
        """Limit ``member``'s link to ``rate`` bits/s each way (``tc`` token bucket filter).

        Args:
            member: whose link.
            rate: bits per second, e.g. ``10**9`` for 1 Gbit/s.
            burst: bucket size in bytes; default 10 ms at ``rate``, at least 16 KiB.
            latency: seconds a packet may wait in the queue before it is dropped.
        """
        if not isinstance(rate, int) or rate <= 0:
            raise ValueError(f"rate must be a positive number of bits per second, got {rate!r}")
        burst = burst if burst is not None else max(rate // 8 // 100, 16384)
        spec = ["root", "tbf", "rate", f"{rate}bit", "burst", str(burst),
                "latency", f"{max(1, round(latency * 1e6))}us"]
        for netns, link in self._both_ends(member):
            _tc("qdisc", "replace", "dev", link, *spec, netns=netns)

    def unshape(self, member: str) -> None:
        """Undo :meth:`shape`."""
        for netns, link in self._both_ends(member):
            _tc("qdisc", "del", "dev", link, "root", netns=netns, check=False)

    def _both_ends(self, member: str) -> list[tuple[str | None, str]]:
        return [self._link(member),
                (self._state.namespaces[0], _SWITCH_PORT.format(self._index(member)))]

    # -- teardown

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Kill every process in the network, delete its links and namespaces. Idempotent.

        Raises:
            RuntimeError: something of the network's is still there afterwards.
        """
        if not self._finalizer.alive:
            return
        self._finalizer()
        remaining = leftovers(self.prefix)
        if remaining:
            raise RuntimeError(f"network {self.prefix} left behind: {', '.join(remaining)}")

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.nodes)} nodes"
        return f"<Network {self.prefix} {self.subnet} {state}>"
