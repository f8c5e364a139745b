"""Cluster benchmark: futurepool through a remote node vs its local node, Dask and Ray.

Run from the repository root, as root (it builds network namespaces):

    python3 benchmarks/bench_cluster.py --ray-python /path/to/venv/bin/python
    python3 benchmarks/bench_cluster.py --quick --repeat 1
    python3 benchmarks/bench_cluster.py --impl local,remote --scenario latency

Hosts are network namespaces on one switch (futurepool.testing.netns): the
head in one, the node in another, joined by veth links through a bridge.
This process moves into the head's namespace, so the futurepool head and the
local executor run here, and the Dask and Ray clients run beside it; every
remote node, Dask worker and Ray worker node runs in the node's namespace.
Every cell starts its system from nothing and stops it afterwards; at the
end the namespaces are removed with whatever still runs in them.

``--ray-python`` names an interpreter that can import ray (default: this
one); Ray and its client run under it. Dask runs under this interpreter.
Without root or namespaces the script says why and exits with status 2.
See benchmarks/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import io
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import _harness  # noqa: E402 - the script's own folder is sys.path[0]

_harness.use_this_checkout()

import _tasks  # noqa: E402
from _cluster_hosts import DRIVER, STOP_GRACE, LinkProbe, Processes, helper, inside  # noqa: E402
from _harness import Skip, Suite, Target, _fmt  # noqa: E402
from _helpers import JsonLines  # noqa: E402

from futurepool.testing import wait_until  # noqa: E402

#: The node every system's remote side runs on.
NODE = "node1"
#: The second node of the objects scenario (B makes the array on NODE, C sums it here).
NODE_C = "node2"
#: Bytes of the objects scenario's array (--quick: OBJECT_BYTES_QUICK).
OBJECT_BYTES = 200_000_000
OBJECT_BYTES_QUICK = 20_000_000
#: The broadcast scenario (issue 10, (b)): the maker, then the nodes its value goes to.
BROADCAST_NODES = ("node1", "node2", "node3", "node4")
#: Bytes of its value (--quick: OBJECT_BYTES_QUICK), and every link's rate (bits/s).
BROADCAST_BYTES = 100_000_000
BROADCAST_RATE = 10**9
#: Delivering it to 3 nodes may take at most this many times delivering it to 1.
BROADCAST_RATIO = 1.5
#: Objects across hosts must reach this share of the CURVE floor (issue 10, (a)).
FLOOR_SHARE = 0.8
#: Bytes of each Ray node's object store; in the objects and broadcast scenarios
#: (whose values would not fit: Ray would spill them to disk) RAY_STORE_OBJECTS.
RAY_STORE = 100 * 1024 * 1024
RAY_STORE_OBJECTS = 1024 * 1024 * 1024
#: Link round trips the remote latency may add to the local one (issue 9).
LINK_ROUND_TRIPS = 3
#: Throughput futurepool's remote node must reach, relative to Ray's and Dask's.
VERSUS_OTHERS = 10.0
#: Seconds between polls while a node joins.
POLL = 0.005


@dataclasses.dataclass
class Context:
    """What every cell needs: the network, the key, a private folder, Ray's interpreter."""

    net: object  # futurepool.testing.netns.Network
    key_file: str
    tmp: str
    ray_python: str
    ports: int = 20000  # the next port a Dask scheduler or Ray head listens on

    @property
    def head(self) -> str:
        return self.net.address("head")

    @property
    def node(self) -> str:
        return self.net.address(NODE)

    def port(self) -> int:
        """A port not used by an earlier cell (whose sockets may linger in TIME_WAIT)."""
        self.ports += 1
        return self.ports


#: Set by main() once the network exists; loaders and cells read it.
CONTEXT: Context | None = None


# --- the systems under test ----------------------------------------------------------------
#
# One object per cell. ready(cell) brings it up with its workers and warms it;
# throughput / latency / join measure; close(failed) stops everything it started.


class ExecutorSystem:
    """What futurepool's local and remote systems share: bench_executor.py's loops."""

    executor = None

    def warm(self, cell) -> None:
        for f in [self.executor.submit(_tasks.noop) for _ in range(cell.workers)]:
            f.result(timeout=cell.left())

    def throughput(self, cell, n: int) -> float:
        return _harness.submit_all(self.executor, _tasks.noop, n, cell)

    def latency(self, cell, n: int) -> tuple[float, dict]:
        return _harness.round_trips(self.executor, _tasks.noop, n, cell)

    def close_executor(self, failed: bool) -> None:
        if self.executor is not None:
            _harness.close_executor(self.executor, failed)


class LocalSystem(ExecutorSystem):
    """``futurepool.Executor(workers)`` in the head's namespace."""

    @staticmethod
    def describe(ctx: Context, workers: int) -> str:
        return f"{_harness.load_futurepool(workers)[1]}; in the head's namespace"

    def __init__(self, ctx: Context, workers: int):
        self.workers = workers

    def ready(self, cell) -> None:
        self.executor = _futurepool().Executor(self.workers)
        self.warm(cell)

    def join(self, cell) -> tuple[float, dict]:
        t0 = time.monotonic()
        self.executor = _futurepool().Executor(self.workers)
        self.executor.submit(_tasks.noop).result(timeout=cell.left())
        return time.monotonic() - t0, {}

    def close(self, failed: bool) -> None:
        self.close_executor(failed)


class RemoteSystem(ExecutorSystem):
    """A head that runs no task (``Executor(0, listen=...)``) here, and
    ``futurepool worker --connect ... --once`` in the node's namespace."""

    def __init__(self, ctx: Context, workers: int):
        self.ctx, self.workers = ctx, workers
        self.procs = Processes(ctx, "futurepool")
        self.node = None

    @staticmethod
    def describe(ctx: Context, workers: int) -> str:
        return (f"Executor(0, listen=tcp://{ctx.head}:0) here; `futurepool worker --connect ..."
                f" --workers {workers} --once` in {NODE} ({ctx.node}); CurveZMQ; issue 10's"
                " scenarios: --workers 1 in each of their nodes")

    def start_head(self) -> None:
        # Executor prints where it listens and the join command: not for every cell.
        with contextlib.redirect_stderr(io.StringIO()):
            self.executor = _futurepool().Executor(
                0, listen=f"tcp://{self.ctx.head}:0", key_file=self.ctx.key_file)

    def start_node(self) -> float:
        t0 = time.monotonic()
        self.node = self.procs.start(NODE, "worker", [
            sys.executable, "-m", "futurepool", "worker", "--connect", self.executor.address,
            "--key-file", self.ctx.key_file, "--workers", str(self.workers), "--once"])
        return t0

    def ready(self, cell) -> None:
        self.start_head()
        self.start_node()
        if not wait_until(lambda: self.executor._max_workers >= self.workers
                          or self.node.poll() is not None, cell.left()):
            raise TimeoutError(f"the node did not join within {cell.timeout:g} s")
        self.procs.check(self.node, "worker")
        self.warm(cell)

    def join(self, cell) -> tuple[float, dict]:
        self.start_head()
        future = self.executor.submit(_tasks.noop)  # queued: no worker anywhere yet
        t0 = self.start_node()
        joined = None
        while True:
            try:
                future.result(timeout=POLL)
                break
            except cf.TimeoutError:
                if joined is None and self.executor._max_workers > 0:
                    joined = time.monotonic()
                self.procs.check(self.node, "worker")
                cell.left()
        done = time.monotonic()
        return done - t0, {"joined": (joined or done) - t0}

    def close(self, failed: bool) -> None:
        try:
            self.close_executor(failed)
            if self.node is not None:  # --once: it leaves when the head goes
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.node.wait(STOP_GRACE)
        finally:
            self.procs.stop()


class DriverSystem:
    """A system driven by a ``_cluster_driver.py`` client in the head's namespace."""

    name = ""

    def __init__(self, ctx: Context, workers: int):
        self.ctx, self.workers = ctx, workers
        self.procs = Processes(ctx, self.name)
        self.driver: JsonLines | None = None
        self.node = None

    def ready(self, cell) -> None:
        self.start_head(cell)
        self.start_node(cell)
        self.driver.call("ready", cell.left(), workers=self.workers)

    def throughput(self, cell, n: int) -> float:
        return self.driver.call("throughput", cell.left(), n=n)["value"]

    def latency(self, cell, n: int) -> tuple[float, dict]:
        answer = self.driver.call("latency", cell.left(), n=n)
        return answer["value"], {"p90": answer["p90"]}

    def join(self, cell) -> tuple[float, dict]:
        self.start_head(cell)
        self.driver.call("queue", cell.left())
        t0 = self.start_node(cell)
        return self.driver.call("collect", cell.left())["at"] - t0, {}

    def start_nodes(self, cell, members) -> None:
        """The head, and one node of ``self.workers`` slots in each of ``members``, joined."""
        self.start_head(cell)
        for member in members:
            self.start_node(cell, member)
        self.driver.call("ready", cell.left(), workers=self.workers * len(members))

    def objects(self, cell, nbytes: int) -> tuple[float, dict]:
        """ObjectsSystem.objects, with every task pinned: made on B, summed on C."""
        self.start_nodes(cell, (NODE, NODE_C))
        answer = self.driver.call("objects", cell.left(), nbytes=nbytes, maker=NODE,
                                  user=NODE_C)
        return answer["seconds"], {"warm": 2 * nbytes / answer["warm"] / 1e9}

    def broadcast(self, cell, nbytes: int) -> tuple[float, dict]:
        """ObjectsSystem.broadcast, with every task pinned: made on node1, summed on
        node2, node2..3, node2..4 (each task depends on the value's future / ObjectRef)."""
        self.start_nodes(cell, BROADCAST_NODES)
        times = self.driver.call("broadcast", cell.left(), nbytes=nbytes,
                                 maker=BROADCAST_NODES[0], users=BROADCAST_NODES[1:])
        return times["n3"] / times["n1"], {k: times[k] for k in ("n1", "n2", "n3")}

    def close(self, failed: bool) -> None:
        try:
            if self.driver is not None and self.driver.proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.driver.call("close", STOP_GRACE)
        finally:
            self.procs.stop()


class DaskSystem(DriverSystem):
    """``dask scheduler`` here, ``dask worker --nworkers N --nthreads 1`` on the node."""

    name = "dask"

    @staticmethod
    def describe(ctx: Context, workers: int) -> str:
        try:
            import distributed
        except ImportError:
            raise Skip("distributed is not installed (pip install distributed)") from None
        return (f"distributed {distributed.__version__}: scheduler here, `dask worker"
                f" --nworkers {workers} --nthreads 1` in {NODE}, Client here; plain TCP"
                " (Dask's default); issue 10's: --nworkers 1 --name NODE in each node")

    def start_head(self, cell) -> None:
        self.address = f"tcp://{self.ctx.head}:{self.ctx.port()}"
        host, port = self.address[6:].rsplit(":", 1)
        self.procs.start("head", "scheduler", [
            sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", host,
            "--port", port, "--no-dashboard"])
        # The client retries until the scheduler listens.
        self.driver = helper(self.procs, "head", "client", sys.executable, "dask",
                              self.address, str(cell.left()))
        self.driver.read(cell.left())

    def start_node(self, cell, member: str = NODE) -> float:
        """``dask worker`` in ``member``, named after it (tasks pin to it by ``workers=``)."""
        t0 = time.monotonic()
        self.node = self.procs.start(member, f"worker-{member}", [
            sys.executable, "-m", "distributed.cli.dask_worker", self.address,
            "--host", self.ctx.net.address(member), "--name", member,
            "--nworkers", str(self.workers), "--nthreads", "1",
            "--no-dashboard", "--local-directory", self.procs.dir])
        return t0


class RaySystem(DriverSystem):
    """``ray start --head --num-cpus 0`` here, ``ray start --address --num-cpus N``
    on the node, with token authentication (RAY_AUTH_MODE=token)."""

    name = "ray"
    #: Bytes of each node's object store (``ray start --object-store-memory``).
    store = RAY_STORE

    @staticmethod
    def describe(ctx: Context, workers: int) -> str:
        python = ctx.ray_python
        try:
            done = subprocess.run([python, "-c", "import ray; print(ray.__version__)"],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Skip(f"cannot run {python}: {exc}") from None
        if done.returncode != 0:
            raise Skip(f"{python} cannot import ray (pass --ray-python with one that can)")
        return (f"ray {done.stdout.strip()} ({python}): `ray start --head --num-cpus 0` here,"
                f" `ray start --address --num-cpus {workers}` in {NODE}, ray.init(address=)"
                " here; RAY_AUTH_MODE=token; issue 10's: --num-cpus 1 --resources {NODE: 1000}"
                " in each node, 1 GiB stores")

    def env(self) -> dict:
        return self.procs.env(
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=os.path.join(self.ctx.tmp, "ray-token"),
            RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=self.procs.dir)

    def ray(self, *args) -> list:
        """``ray start ARGS`` under Ray's interpreter (its ``ray`` command's module)."""
        return [self.ctx.ray_python, "-m", "ray.scripts.scripts", "start",
                "--disable-usage-stats", "--object-store-memory", str(self.store), *args]

    def start_head(self, cell) -> None:
        self.address = f"{self.ctx.head}:{self.ctx.port()}"
        self.procs.run("head", "head", self.ray(
            "--head", "--node-ip-address", self.ctx.head, "--port",
            self.address.rsplit(":", 1)[1], "--num-cpus", "0", "--include-dashboard", "false",
            "--temp-dir", os.path.join(self.procs.dir, "h")), cell.left(), env=self.env())
        self.driver = helper(self.procs, "head", "client", self.ctx.ray_python, "ray",
                              self.address, self.ctx.head, env=self.env())
        self.driver.read(cell.left())

    def start_node(self, cell, member: str = NODE) -> float:
        """``ray start`` in ``member``, with a resource named after it (tasks pin to it)."""
        t0 = time.monotonic()
        # Returns once the node's daemons run; they outlive it (found by tag).
        self.node = self.procs.start(member, f"node-{member}", self.ray(
            "--address", self.address, "--node-ip-address", self.ctx.net.address(member),
            "--num-cpus", str(self.workers), "--resources", json.dumps({member: 1000}),
            "--temp-dir", os.path.join(self.procs.dir, member)), env=self.env())
        return t0

    def start_nodes(self, cell, members) -> None:
        self.store = RAY_STORE_OBJECTS  # the objects scenarios' values must fit
        super().start_nodes(cell, members)


def _futurepool():
    import futurepool

    return futurepool


class ObjectsSystem(RemoteSystem):
    """Issue 10: nodes that join one at a time with one worker each. (a): B
    (``node1``) and C (``node2``); (b): node1 and BROADCAST_NODES[1:]."""

    def __init__(self, ctx: Context, workers: int):
        super().__init__(ctx, 1)
        self.nodes = []

    def start_worker(self, member: str, cell) -> None:
        node = self.procs.start(member, f"worker-{member}", [
            sys.executable, "-m", "futurepool", "worker", "--connect", self.executor.address,
            "--key-file", self.ctx.key_file, "--workers", "1", "--once"])
        self.nodes.append(node)
        slots = len(self.nodes)
        if not wait_until(lambda: self.executor._max_workers >= slots
                          or node.poll() is not None, cell.left()):
            raise TimeoutError(f"{member} did not join within {cell.timeout:g} s")
        self.procs.check(node, f"worker-{member}")

    def objects(self, cell, nbytes: int) -> tuple[float, dict]:
        """An array made on B, summed by a task on C (B's only worker is kept busy,
        so the task goes to C, which pulls the array from B), and returned to the
        driver (which pulls C's result into the head's store)."""
        self.start_head()
        self.start_worker(NODE, cell)
        warm = self.executor.submit(_tasks.make_array, 2 << 20)
        made = [self.executor.submit(_tasks.make_array, nbytes) for _ in range(2)]
        cf.wait(made, timeout=cell.left())
        busy = self.executor.submit(_tasks.hold, 3600)
        self.start_worker(NODE_C, cell)
        # Warm: the same path with 2 MB (imports, connections, handshakes); the
        # 200 MB still land in fresh pages on C and on the head (as the floor_fresh
        # row's do; the "warm" run below lands in the segments the first one freed).
        self.executor.submit(_tasks.sum_and_return, warm).result(timeout=cell.left())
        times = []
        for _ in range(2):  # the second time, into segments the first one freed
            t0 = time.perf_counter()
            total, array = self.executor.submit(_tasks.sum_and_return, made.pop(0)).result(
                timeout=cell.left())
            times.append(time.perf_counter() - t0)
            if total != nbytes // 8 or array.nbytes != nbytes:
                raise RuntimeError(f"wrong result: sum {total}, {array.nbytes} bytes")
            del array
            time.sleep(0.5)  # the frees reach C and the head
        busy.stop()
        return times[0], {"warm": 2 * nbytes / times[1] / 1e9}

    def broadcast(self, cell, nbytes: int) -> tuple[float, dict]:
        """One value made on node1 (whose only worker is then kept busy), needed by
        tasks on 1, 2 and 3 other nodes at once: their nodes pull it, forwarding
        the chunks that landed to one another (pipelined broadcast)."""
        self.start_head()
        self.start_worker(BROADCAST_NODES[0], cell)
        warm = self.executor.submit(_tasks.make_array, 2 << 20)
        made = [self.executor.submit(_tasks.make_array, nbytes) for _ in range(3)]
        cf.wait([warm, *made], timeout=cell.left())
        busy = self.executor.submit(_tasks.hold, 3600)  # the tasks go to the other nodes
        for member in BROADCAST_NODES[1:]:
            self.start_worker(member, cell)
        # Warm (imports, connections, handshakes): 2 MB to every receiver.
        wait_all = [self.executor.submit(_tasks.total, warm) for _ in range(3)]
        for f in wait_all:
            f.result(timeout=cell.left())
        times = {}
        for receivers in (1, 2, 3):
            array = made.pop(0)
            t0 = time.perf_counter()
            tasks = [self.executor.submit(_tasks.total, array) for _ in range(receivers)]
            totals = [f.result(timeout=cell.left()) for f in tasks]
            times[receivers] = time.perf_counter() - t0
            if totals != [nbytes // 8] * receivers:
                raise RuntimeError(f"wrong result: {totals}")
            del array, tasks
            time.sleep(0.5)  # the frees reach every node
        busy.stop()
        chained = self.executor._owner.objects.chained_pulls
        return times[3] / times[1], {"n1": times[1], "n2": times[2], "n3": times[3],
                                     "chained": chained}

    def close(self, failed: bool) -> None:
        try:
            self.close_executor(failed)
            for node in self.nodes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.wait(STOP_GRACE)
        finally:
            self.procs.stop()


def curve_floor(ctx: Context, cell, nbytes: int, chunk: int, land: str = "drop") -> float:
    """GB/s of pyzmq PUSH -> PULL with CURVE from B to C, ``nbytes`` in ``chunk``s; the
    receiver drops them (``land="drop"``) or writes them into a new /dev/shm file
    (``"fresh"``: see _cluster_driver.floor_recv)."""
    procs = Processes(ctx, "floor")
    try:
        receiver = helper(procs, NODE_C, "floor-recv", sys.executable, "floor-recv",
                          ctx.net.address(NODE_C), str(nbytes), land)
        hello = receiver.read(cell.left())
        procs.run(NODE, "floor-send", [
            sys.executable, DRIVER, "floor-send", f"tcp://{ctx.net.address(NODE_C)}:"
            f"{hello['port']}", hello["key"], str(nbytes), str(chunk)], cell.left())
        return nbytes / receiver.read(cell.left())["seconds"] / 1e9
    finally:
        procs.stop()


# --- the suite ---------------------------------------------------------------------------


class LatencyTarget(Target):
    """``remote latency <= local latency + LINK_ROUND_TRIPS link round trips``, all
    medians of this run (the link's over every latency cell): known once the run is over."""

    def text(self, scenario) -> str:
        bound = suite.latency_bound
        return self.label + (f" ={_fmt(bound, 'µs')}" if bound else "")

    def met(self, scenario, value, ratio):
        bound = suite.latency_bound
        return None if bound is None or value is None else value <= bound


class FloorTarget(Target):
    """Objects across hosts at ``FLOOR_SHARE`` x the CURVE floor, like for like: the warm
    transfer (into the segments the first one left pooled) against the floor (whose
    receiver's memory is warm too: malloc hands libzmq the same buffers), both medians
    of this run (the floor's over every cell of the scenario). The first transfer
    lands in fresh pages, which the floor never touches: it is shown beside it, with
    the floor landing in fresh pages (floor_fresh)."""

    def met(self, scenario, value, ratio):
        floor, warm = suite.floors.get(scenario.name), suite.warm.get(scenario.name)
        return None if None in (floor, warm) else warm >= self.threshold * floor


class ClusterSuite(Suite):
    """A Suite that also checks issues 9 and 10's targets, under the table and in the JSON."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latency_bound: float | None = None
        self.link_rtt: float | None = None
        self.floors: dict[str, float] = {}  # scenario -> median CURVE floor, GB/s
        self.fresh_floors: dict[str, float] = {}  # the same, landing in fresh pages
        self.warm: dict[str, float] = {}  # scenario -> the subject's median warm GB/s
        self.targets: list[dict] = []

    def _print_table(self, scenarios, impls, results) -> None:
        def median(scenario: str, impl: str, extra: str | None = None) -> float | None:
            """The median of a cell's values, or of its ``extra``; None if it failed."""
            result = results.get(scenario, {}).get(impl)
            if result is None or extra is None:
                return result.median if result else None
            samples = result.extras.get(extra)
            return statistics.median(samples) if samples and not result.error else None

        def pooled(scenario: str, extra: str) -> float | None:
            """The median of ``extra`` over every successful cell of ``scenario``."""
            found = [x for r in results.get(scenario, {}).values() if not r.error
                     for x in r.extras.get(extra, [])]
            return statistics.median(found) if found else None

        self.link_rtt = pooled("latency", "link_rtt")
        self.floors = {name: floor for name in ("objects", "objects_shaped")
                       if (floor := pooled(name, "floor")) is not None}
        self.fresh_floors = {name: floor for name in ("objects", "objects_shaped")
                             if (floor := pooled(name, "floor_fresh")) is not None}
        self.warm = {name: warm for name in ("objects", "objects_shaped")
                     if (warm := median(name, self.subject, "warm")) is not None}
        local = median("latency", "local")
        if local is not None and self.link_rtt is not None:
            self.latency_bound = local + LINK_ROUND_TRIPS * self.link_rtt
        super()._print_table(scenarios, impls, results)
        self._check_targets(median)

    def _check_targets(self, median) -> None:
        """Each target with PASS or FAIL (n/a: a number it needs is missing)."""
        self.targets = []
        print("Targets (issues 9 and 10):")
        remote, unit = median("throughput", "remote"), "tasks/s"
        for what, impl, factor in (("50% of local", "local", 0.5),
                                   (f"{VERSUS_OTHERS:g}x Ray's", "ray", VERSUS_OTHERS),
                                   (f"{VERSUS_OTHERS:g}x Dask's", "dask", VERSUS_OTHERS)):
            theirs = median("throughput", impl)
            known = None not in (remote, theirs)
            self._target(f"remote throughput >= {what}", remote,
                         factor * theirs if known else None, higher=True,
                         detail=known and f"{_fmt(remote, unit)} vs {_fmt(theirs, unit)}:"
                                          f" {remote / theirs:.2f}x")
        mine, local, bound = median("latency", "remote"), median("latency", "local"), \
            self.latency_bound
        self._target(f"remote latency <= local + {LINK_ROUND_TRIPS} link round trips", mine,
                     bound, higher=False,
                     detail=None not in (mine, bound) and
                     f"{_fmt(mine, 'µs')} vs {_fmt(local, 'µs')} + {LINK_ROUND_TRIPS}"
                     f" x {_fmt(self.link_rtt, 'µs')} = {_fmt(bound, 'µs')}")
        join = median("join", "remote")
        self._target("join to first task <= 1 s", join, 1.0, higher=False,
                     detail=join is not None and _fmt(join, "s"))
        warm, floor = self.warm.get("objects"), self.floors.get("objects")
        self._target(f"(issue 10 a) objects >= {FLOOR_SHARE:.0%} of the CURVE floor", warm,
                     None if floor is None else FLOOR_SHARE * floor, higher=True,
                     detail=None not in (warm, floor) and
                     f"warm {_fmt(warm, 'GB/s')} vs {_fmt(floor, 'GB/s')}: {warm / floor:.0%}")
        first, fresh = median("objects", "remote"), self.fresh_floors.get("objects")
        if None not in (first, floor, fresh):  # (not a target: see FloorTarget)
            print(f"  {'  first transfer, into fresh pages':48} {_fmt(first, 'GB/s')}:"
                  f" {first / floor:.0%} of the floor, {first / fresh:.0%} of it landing"
                  f" in fresh pages ({_fmt(fresh, 'GB/s')})")
        self._check_others(median)
        print(flush=True)

    def _check_others(self, median) -> None:
        """Issue 10 (c): remote at least as fast as Dask and Ray in (a), on the shaped
        links (and on plain veth), and faster in (b)."""
        others = (("dask", "Dask"), ("ray", "Ray"))
        for scenario, what in (("objects_shaped", "objects, shaped links"),
                               ("objects", "objects, unshaped")):
            mine = median(scenario, "remote")
            for impl, label in others:
                theirs = median(scenario, impl)
                self._target(f"(issue 10 c) {what} >= {label}'s", mine, theirs, higher=True,
                             detail=None not in (mine, theirs) and
                             f"{_fmt(mine, 'GB/s')} vs {_fmt(theirs, 'GB/s')}:"
                             f" {mine / theirs:.2f}x")
        n3, ratio = median("broadcast", "remote", "n3"), median("broadcast", "remote")
        for impl, label in others:
            theirs, their_ratio = median("broadcast", impl, "n3"), median("broadcast", impl)
            self._target(f"(issue 10 c) broadcast n3 time < {label}'s", n3, theirs,
                         higher=False, detail=None not in (n3, theirs) and
                         f"{_fmt(n3, 's')} vs {_fmt(theirs, 's')}: {theirs / n3:.2f}x")
            self._target(f"(issue 10 c) broadcast n3/n1 < {label}'s", ratio, their_ratio,
                         higher=False, detail=None not in (ratio, their_ratio) and
                         f"{ratio:.2f}x vs {their_ratio:.2f}x")

    def _target(self, what: str, value, bound, *, higher: bool, detail) -> None:
        met = None if value is None or bound is None else (
            value >= bound if higher else value <= bound)
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[met]
        print(f"  {what:48} {detail or 'n/a':54} {verdict}")
        self.targets.append({"target": what, "value": value, "bound": bound, "met": met})

    def _write_json(self, args, scenarios, impls, results, interrupted) -> None:
        super()._write_json(args, scenarios, impls, results, interrupted)
        with open(args.json) as f:
            out = json.load(f)
        out["targets"] = self.targets
        out["link_rtt_us"] = self.link_rtt
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


suite = ClusterSuite(
    "futurepool cluster benchmark", baseline="local", subject="remote",
    warm=lambda system, cell: system.ready(cell), close=lambda obj, failed: obj.close(failed),
)


def _loader(kind):
    def load(workers):
        return (lambda: kind(CONTEXT, workers)), kind.describe(CONTEXT, workers)

    return load


suite.implementation("local", "local", _loader(LocalSystem))
suite.implementation("remote", "remote", _loader(RemoteSystem))
suite.implementation("dask", "Dask", _loader(DaskSystem))
suite.implementation("ray", "Ray", _loader(RaySystem))


@suite.scenario("throughput", unit="tasks/s", higher_is_better=True, timeout=180,
                target=Target(0.5))
def throughput(cell):
    """10,000 no-op tasks submitted, then all waited (1,000 with --quick); tasks
    per second. Dask: client.submit(pure=False), then wait and gather; Ray:
    .remote(), then ray.get of the list."""
    system = cell.make(warm=True)
    return system.throughput(cell, cell.size(10_000, 1_000))


@suite.scenario("latency", unit="µs", higher_is_better=False, timeout=180,
                target=LatencyTarget(LINK_ROUND_TRIPS, on="link_rtt",
                                     label=f"<=local+{LINK_ROUND_TRIPS} RTT"),
                show=("p90",), rows=("link_rtt",))
def latency(cell):
    """Sequential submit(noop) -> result, 2,000 times (200 with --quick); median
    µs, p90 alongside. Row link_rtt: then, in the same cell, the median of 1,000
    (200) 1-byte TCP round trips between the head's namespace and the node's."""
    system = cell.make(warm=True)
    value, extras = system.latency(cell, cell.size(2_000, 200))
    probe = LinkProbe(CONTEXT, NODE, CONTEXT.node, cell)
    cell.made.append(probe)  # closed by the harness with the system
    extras["link_rtt"] = probe.round_trip(cell.size(1_000, 200))
    return value, extras


#: The systems of the issue-10 scenarios (one worker slot per node), by implementation.
OBJECT_SYSTEMS = {"remote": ObjectsSystem, "dask": DaskSystem, "ray": RaySystem}


def _objects_system(cell):
    """The cell's system for an issue-10 scenario; the harness closes it."""
    kind = OBJECT_SYSTEMS.get(cell.impl.name)
    if kind is None:
        raise RuntimeError("not measured for this implementation")
    system = kind(CONTEXT, 1)
    cell.made.append(system)
    return system


@contextlib.contextmanager
def _shaped(members):
    """The links of ``members`` (both ends) limited to BROADCAST_RATE each way, for the block:
    ``tc qdisc replace dev X root tbf rate 1gbit burst 1mb latency 50ms``."""
    net = CONTEXT.net
    try:
        for member in members:
            net.shape(member, BROADCAST_RATE, burst=1 << 20, latency=0.05)
        yield
    finally:
        for member in members:
            net.unshape(member)


def _objects(cell, shaped: tuple) -> tuple[float, dict]:
    """GB/s of issue 10 (a) on the cell's system, with the links of ``shaped`` shaped
    (unshaped: the floor landing in fresh pages too)."""
    from futurepool import config

    nbytes = cell.size(OBJECT_BYTES, OBJECT_BYTES_QUICK)
    system = _objects_system(cell)
    with _shaped(shaped):
        seconds, extras = system.objects(cell, nbytes)
        extras["floor"] = curve_floor(CONTEXT, cell, nbytes, config.TRANSFER_CHUNK)
        if not shaped:
            extras["floor_fresh"] = curve_floor(CONTEXT, cell, nbytes, config.TRANSFER_CHUNK,
                                                land="fresh")
    return 2 * nbytes / seconds / 1e9, {**extras, "seconds": seconds}


@suite.scenario("objects", unit="GB/s", higher_is_better=True, timeout=300,
                target=FloorTarget(FLOOR_SHARE, on="floor",
                                   label=f"warm >={FLOOR_SHARE:.0%} floor"),
                show=("seconds",), rows=("warm", "floor", "floor_fresh"))
def objects(cell):
    """Issue 10 (a): a 200 MB array (20 MB with --quick) made on node B, summed by a
    task on node C, and returned to the driver: 2 x 200 MB cross links (B -> C, C ->
    head), so GB/s = 2 x size / seconds from submit to result(). The value: the
    first such array, which lands in fresh pages on C and on the head. Row warm:
    then a second array the same way, which lands in the segments the first one's
    copies left pooled there (a long-lived cluster's steady state). Row floor: in
    the same cell, pyzmq PUSH -> PULL with CURVE from B to C, the same bytes in
    chunks of config.TRANSFER_CHUNK, dropped as they arrive (malloc hands libzmq the
    same warm memory for each); row floor_fresh: the same, written into a new
    /dev/shm file as they arrive (fresh pages, as a store receiving a value for the
    first time). The target compares like with like (FloorTarget): warm with floor;
    the first is shown beside floor and floor_fresh. Dask and Ray (issue 10 (c)): the
    same tasks, pinned to B and C (Dask workers=, Ray a custom resource per node)."""
    return _objects(cell, ())


@suite.scenario("objects_shaped", unit="GB/s", higher_is_better=True, timeout=300,
                target=FloorTarget(FLOOR_SHARE, on="floor",
                                   label=f"warm >={FLOOR_SHARE:.0%} floor"),
                show=("seconds",), rows=("warm", "floor"))
def objects_shaped(cell):
    """Issue 10 (c): objects with the links of the head, B and C shaped as in broadcast
    (1 Gbit/s each way, so at most 0.125 GB/s); the floor row is measured on them too."""
    return _objects(cell, ("head", NODE, NODE_C))


@suite.scenario("broadcast", unit="x", higher_is_better=False, timeout=300,
                target=Target(BROADCAST_RATIO, on="value", label=f"<={BROADCAST_RATIO:g}x"),
                rows=("n1", "n2", "n3", "chained"),
                units={"n1": "s", "n2": "s", "n3": "s", "chained": "pulls"})
def broadcast(cell):
    """Issue 10 (b): a 100 MB array (20 MB with --quick) made on node1 is needed at once by
    tasks on 1, 2 and 3 other nodes (node2..node4, one worker each; node1's only worker
    kept busy), every veth link shaped to 1 Gbit/s (tc tbf rate 1gbit burst 1mb latency
    50ms). Value: seconds for 3 nodes / seconds for 1 (pipelined broadcast: close to 1);
    rows n1, n2, n3 in seconds from submit to the last result; chained (futurepool):
    pulls whose first source was a node still receiving. Dask and Ray (issue 10 (c)):
    tasks pinned to each node that take the value's future / ObjectRef."""
    nbytes = cell.size(BROADCAST_BYTES, OBJECT_BYTES_QUICK)
    system = _objects_system(cell)
    with _shaped(("head", *BROADCAST_NODES)):
        return system.broadcast(cell, nbytes)


@suite.scenario("join", unit="s", higher_is_better=False, timeout=180,
                target=Target(1.0, on="value"), show=("joined",))
def join(cell):
    """Seconds from starting the node (Popen of `futurepool worker --connect`,
    `dask worker`, `ray start --address`) to the result of a no-op the head
    already had queued. local: from constructing Executor(N) to its first
    result. remote also shows when the node had joined (its workers counted)."""
    system = cell.make()
    return system.join(cell)


# --- main ---------------------------------------------------------------------------------


def _terminate(signum, frame):
    raise KeyboardInterrupt  # the harness reports partial results; teardown runs


def main(argv: list[str]) -> int:
    global CONTEXT
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--ray-python", default=sys.executable)
    own, rest = parser.parse_known_args(argv)
    if {"-h", "--help", "--list"} & set(rest):
        return suite.main(rest)
    from futurepool.testing import netns

    reason = netns.unavailable_reason()
    if reason is not None:
        print(f"bench_cluster.py needs network namespaces: {reason}.", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    tmp = tempfile.mkdtemp(prefix="fpbc-")  # short: Ray's socket paths live below it
    try:
        key_file = os.path.join(tmp, "cluster.key")
        subprocess.run([sys.executable, "-m", "futurepool", "keygen", "--key-file", key_file],
                       check=True, capture_output=True, timeout=60)
        token = os.open(os.path.join(tmp, "ray-token"), os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(token, secrets.token_hex(32).encode())
        os.close(token)
        with netns.Network(nodes=len(BROADCAST_NODES)) as net:
            CONTEXT = Context(net, key_file, tmp, own.ray_python)
            suite.header_extra.append(
                f"hosts: head {net.address('head')} (this process, namespace"
                f" {net.namespace('head')}), {NODE} {net.address(NODE)} (namespace"
                f" {net.namespace(NODE)}), veth through a bridge; --ray-python {own.ray_python}")
            with inside(net.namespace("head")):
                return suite.main(rest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
