"""Helper processes of ``bench_cluster.py``: a TCP echo server, and Dask and Ray drivers.

``python _cluster_driver.py echo HOST`` binds a TCP port on HOST, prints it,
and echoes what the one connection it accepts sends, until that closes.

``python _cluster_driver.py floor-recv HOST NBYTES [LAND]`` and ``python _cluster_driver.py
floor-send tcp://HOST:PORT SERVER_KEY NBYTES CHUNK`` measure the floor of object
transfers: pyzmq PUSH -> PULL over TCP with CURVE, NBYTES in chunks of CHUNK
bytes. The receiver prints ``{"port", "key"}`` (its CURVE public key), then
``{"seconds": ...}`` from the sender's first frame to the last byte. LAND
``drop`` (the default) drops each chunk (the memory malloc hands libzmq for
the next one is the same: warm); ``fresh`` writes them into a new file in
/dev/shm with ``pwrite``, as a store receiving a value for the first time must
(removed at the end).

``python _cluster_driver.py dask tcp://HOST:PORT`` and ``python
_cluster_driver.py ray HOST:PORT NODE_IP`` connect a client (a
``distributed.Client``; ``ray.init(address=...)``) to a cluster that
``bench_cluster.py`` started, print ``{"hello": VERSION}``, then answer one
JSON command per line of stdin with one JSON line on stdout:

=========================================  ======================================
command                                    answer
=========================================  ======================================
``{"op": "ready", "workers": N}``          once N worker slots joined and ran one
                                           no-op each, submitted together
``{"op": "throughput", "n": N}``           ``{"value": tasks/s}``: N no-ops
                                           submitted, then all results fetched
``{"op": "latency", "n": N}``              ``{"value": µs, "p90": µs}``: median of N
                                           sequential submit -> result
``{"op": "queue"}``                        submits one no-op that no node can run yet
``{"op": "collect"}``                      ``{"at": time.monotonic()}`` when it is done
``{"op": "objects", "nbytes": N,           ``{"seconds": s, "warm": s}``: issue 10 (a),
"maker": B, "user": C}``                   see :func:`_objects`
``{"op": "broadcast", "nbytes": N,         ``{"n1": s, "n2": s, "n3": s}``: issue 10
"maker": M, "users": [U1, U2, U3]}``       (b), see :func:`_broadcast`
``{"op": "close"}``                        closes the client and exits
=========================================  ======================================

Every command carries ``"timeout"`` (seconds), which bounds its waits; a
failure answers ``{"error": "..."}``. ``time.monotonic()`` is the system's
CLOCK_MONOTONIC, so the benchmark compares it with its own. ``objects`` and
``broadcast`` pin each task to a node by its name (B, C, M, U...: the
namespaces' names): Dask by ``workers=[name]`` (every worker is started with
``--name``), Ray by a custom resource of that name (``ray start --resources``).
The script runs under whichever interpreter has the system installed (Ray's
may be a venv of its own) and imports nothing of futurepool; ``_tasks`` (the
tasks, by reference), ``_harness`` and ``_helpers`` (the loop that answers
commands) come from ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import _tasks
from _harness import latency_stats
from _helpers import serve

#: Seconds the echo server waits for its connection, and for each message.
ECHO_TIMEOUT = 60.0
#: Seconds between polls of the cluster's worker count.
POLL_INTERVAL = 0.05
#: Bytes of the array that takes the objects and broadcast paths once before the timed ones.
WARM_BYTES = 2 << 20
#: Seconds for the frees of a timed array to reach every node before the next one.
SETTLE = 0.5


def echo(host: str) -> int:
    with socket.create_server((host, 0)) as server:
        server.settimeout(ECHO_TIMEOUT)
        print(json.dumps({"port": server.getsockname()[1]}), flush=True)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(ECHO_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(64):
                conn.sendall(data)
    return 0


def floor_recv(host: str, nbytes: int, land: str = "drop") -> int:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    public, secret = zmq.curve_keypair()
    sock.curve_server, sock.curve_secretkey, sock.curve_publickey = True, secret, public
    port = sock.bind_to_random_port(f"tcp://{host}")
    path = f"/dev/shm/fp_bench_floor_{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600) if land == "fresh" else -1
    try:
        print(json.dumps({"port": port, "key": public.decode()}), flush=True)
        if not sock.poll(ECHO_TIMEOUT * 1000):
            return 1
        sock.recv()  # the start frame
        t0 = time.perf_counter()
        received = 0
        while received < nbytes:
            buffer = sock.recv(copy=False).buffer
            if fd >= 0:
                os.pwrite(fd, buffer, received)
            received += len(buffer)
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    finally:
        if fd >= 0:
            os.close(fd)
            os.unlink(path)
        sock.close(linger=0)
        ctx.term()
    return 0


def floor_send(address: str, key: str, nbytes: int, chunk: int) -> int:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    public, secret = zmq.curve_keypair()
    sock.curve_secretkey, sock.curve_publickey = secret, public
    sock.curve_serverkey = key.encode()
    sock.connect(address)
    data = memoryview(bytearray(b"x" * chunk))
    sock.send(b"start")
    sent = 0
    while sent < nbytes:
        n = min(chunk, nbytes - sent)
        sock.send(data[:n], copy=False)
        sent += n
    sock.close(linger=int(ECHO_TIMEOUT * 1000))
    ctx.term()
    return 0


class DaskDriver:
    def __init__(self, address: str, timeout: float):
        import distributed

        self.distributed = distributed
        self.client = distributed.Client(address, timeout=timeout)
        self.version = f"distributed {distributed.__version__}"
        self.queued = None

    def submit(self):
        # pure=False: identical calls must be separate tasks, not one cached key.
        return self.client.submit(_tasks.noop, pure=False)

    def ready(self, workers: int, timeout: float) -> None:
        self.client.wait_for_workers(n_workers=workers, timeout=timeout)
        self.client.gather([self.submit() for _ in range(workers)])

    def throughput(self, n: int, timeout: float) -> float:
        t0 = time.perf_counter()
        futures = [self.submit() for _ in range(n)]
        self.distributed.wait(futures, timeout=timeout)
        self.client.gather(futures)
        return n / (time.perf_counter() - t0)

    def one(self, timeout: float) -> None:
        self.submit().result(timeout=timeout)

    def queue(self) -> None:
        self.queued = self.submit()

    def collect(self, timeout: float) -> None:
        self.queued.result(timeout=timeout)

    def run_on(self, node: str, fn, *args):
        """``fn(*args)`` on the worker named ``node``; its future (arguments may be futures)."""
        return self.client.submit(fn, *args, workers=[node], pure=False)

    def wait(self, futures: list, timeout: float) -> None:
        self.distributed.wait(futures, timeout=timeout)

    def get(self, futures: list, deadline: float) -> list:
        return [f.result(timeout=max(0.001, deadline - time.monotonic())) for f in futures]

    def close(self) -> None:
        self.client.close(timeout=5)


class RayDriver:
    def __init__(self, address: str, node_ip: str):
        import ray

        self.ray = ray
        ray.init(address=address, _node_ip_address=node_ip, log_to_driver=False,
                 configure_logging=False)
        self.remote = ray.remote(_tasks.noop)
        self.version = f"ray {ray.__version__}"
        self.queued = None
        self.remotes = {}

    def ready(self, workers: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.ray.cluster_resources().get("CPU", 0) < workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {workers} CPUs joined within {timeout:g} s")
            time.sleep(POLL_INTERVAL)
        self.ray.get([self.remote.remote() for _ in range(workers)], timeout=timeout)

    def throughput(self, n: int, timeout: float) -> float:
        t0 = time.perf_counter()
        refs = [self.remote.remote() for _ in range(n)]
        self.ray.get(refs, timeout=timeout)
        return n / (time.perf_counter() - t0)

    def one(self, timeout: float) -> None:
        self.ray.get(self.remote.remote(), timeout=timeout)

    def queue(self) -> None:
        self.queued = self.remote.remote()

    def collect(self, timeout: float) -> None:
        self.ray.get(self.queued, timeout=timeout)

    def run_on(self, node: str, fn, *args):
        """``fn(*args)`` on the node with resource ``node``; its ObjectRef (as are arguments)."""
        remote = self.remotes.get(fn) or self.remotes.setdefault(fn, self.ray.remote(fn))
        return remote.options(resources={node: 1}).remote(*args)

    def wait(self, refs: list, timeout: float) -> None:
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if len(ready) < len(refs):
            raise TimeoutError(f"{len(refs) - len(ready)} of {len(refs)} tasks not done"
                               f" within {timeout:.0f} s")

    def get(self, refs: list, deadline: float) -> list:
        return self.ray.get(refs, timeout=max(0.001, deadline - time.monotonic()))

    def close(self) -> None:
        self.ray.shutdown()


def _ready(driver, command: dict, timeout: float) -> None:
    driver.ready(command["workers"], timeout)


def _throughput(driver, command: dict, timeout: float) -> dict:
    return {"value": driver.throughput(command["n"], timeout)}


def _latency(driver, command: dict, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    samples = []
    for _ in range(command["n"]):
        t0 = time.perf_counter()
        driver.one(max(0.001, deadline - time.monotonic()))
        samples.append(time.perf_counter() - t0)
    value, extras = latency_stats(samples)
    return {"value": value, **extras}


def _queue(driver, command: dict, timeout: float) -> None:
    driver.queue()


def _collect(driver, command: dict, timeout: float) -> dict:
    driver.collect(timeout)
    return {"at": time.monotonic()}


def _objects(driver, command: dict, timeout: float) -> dict:
    """Issue 10 (a), as bench_cluster.py's ObjectsSystem.objects: two arrays of
    ``nbytes`` (and a WARM_BYTES one) made on B; the warm one summed on C and
    returned, untimed; then each array the same way, timed from submit to the
    result here. Seconds for the first array and for the second (``warm``)."""
    deadline = time.monotonic() + timeout
    maker, user, nbytes = command["maker"], command["user"], command["nbytes"]
    warm = driver.run_on(maker, _tasks.make_array, WARM_BYTES)
    made = [driver.run_on(maker, _tasks.make_array, nbytes) for _ in range(2)]
    driver.wait([warm, *made], deadline - time.monotonic())
    driver.get([driver.run_on(user, _tasks.sum_and_return, warm)], deadline)
    times = []
    for _ in range(2):
        array = made.pop(0)
        t0 = time.perf_counter()
        [(total, result)] = driver.get([driver.run_on(user, _tasks.sum_and_return, array)],
                                       deadline)
        times.append(time.perf_counter() - t0)
        if total != nbytes // 8 or result.nbytes != nbytes:
            raise RuntimeError(f"wrong result: sum {total}, {result.nbytes} bytes")
        del array, result
        time.sleep(SETTLE)
    return {"seconds": times[0], "warm": times[1]}


def _broadcast(driver, command: dict, timeout: float) -> dict:
    """Issue 10 (b), as bench_cluster.py's ObjectsSystem.broadcast: three arrays of
    ``nbytes`` (and a WARM_BYTES one) made on M; the warm one summed on every user,
    untimed; then one array each summed on 1, 2 and 3 users at once, timed from
    submit to the last result. Seconds for each number of users."""
    deadline = time.monotonic() + timeout
    maker, users, nbytes = command["maker"], command["users"], command["nbytes"]
    warm = driver.run_on(maker, _tasks.make_array, WARM_BYTES)
    made = [driver.run_on(maker, _tasks.make_array, nbytes) for _ in range(3)]
    driver.wait([warm, *made], deadline - time.monotonic())
    driver.get([driver.run_on(user, _tasks.total, warm) for user in users], deadline)
    times = {}
    for receivers in (1, 2, 3):
        array = made.pop(0)
        t0 = time.perf_counter()
        totals = driver.get([driver.run_on(user, _tasks.total, array)
                             for user in users[:receivers]], deadline)
        times[f"n{receivers}"] = time.perf_counter() - t0
        if totals != [nbytes // 8] * receivers:
            raise RuntimeError(f"wrong result: {totals}")
        del array
        time.sleep(SETTLE)
    return times


#: The commands besides "close" (see the table above).
OPS = {"ready": _ready, "throughput": _throughput, "latency": _latency, "queue": _queue,
       "collect": _collect, "objects": _objects, "broadcast": _broadcast}


def main(argv: list[str]) -> int:
    role = argv[0]
    if role == "echo":
        return echo(argv[1])
    if role == "floor-recv":
        return floor_recv(argv[1], int(argv[2]), *argv[3:4])
    if role == "floor-send":
        return floor_send(argv[1], argv[2], int(argv[3]), int(argv[4]))
    if role == "dask":
        return serve(DaskDriver(argv[1], float(argv[2]) if len(argv) > 2 else 60.0), OPS)
    if role == "ray":
        return serve(RayDriver(argv[1], argv[2]), OPS)
    print(f"unknown role {role!r}: echo, dask or ray", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
