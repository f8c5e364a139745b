"""``futurepool status``: ask a head what its cluster is doing, and print it.

:func:`snapshot` is the head's side (its owner's state, read on the owner's
I/O thread); the rest is the command's.

A head answers STATUS on its listening port to any peer that passes its
CURVE handshake, so the client needs the cluster's key file, like a node.
Heads on this host are found through the ``head`` file each one writes in
its run directory (the address), so that ``futurepool status`` with no
address shows them all.
"""

from __future__ import annotations

import glob
import json
import os
import time
import weakref

import zmq

from .. import config
from ..protocol import security
from ..protocol.framing import decode_header, pack_header
from ..protocol.messages import MessageType
from ..store import segments, serialize

#: The file in a listening head's run directory that holds its address.
HEAD_FILE = "head"

#: A rate is measured over at least this many seconds (save the first, since start).
RATE_MIN_WINDOW = 1.0

#: Per owner, the marks :func:`rate` measures from: ``(base, pending)``, each a
#: ``(time.monotonic(), owner.completed)``. An entry is read and written only on
#: its owner's I/O thread; weak, so that it goes with the owner.
_rate_marks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def snapshot(owner) -> dict:
    """What a head answers STATUS with: nodes, slots, tasks, store use (owner's I/O thread)."""
    def busy(link):
        return sum(1 for slot in owner.scheduler.workers.values()
                   if slot.link is link and slot.inflight)

    local = {"host": owner.local_workers.host, "address": "local", "workers": owner.requested,
             "busy": busy(owner.local_workers),
             "store_bytes": segments.bytes_used(owner.store.settings)}
    nodes = [{"host": node.host, "address": node.address, "workers": node.workers,
              "busy": busy(node), "store_bytes": 0, "leaving": node.leaving,
              "joined_at": node.joined_at}
             for node in (owner.head.nodes.values() if owner.head is not None else ())]
    running = sum(len(slot.inflight) for slot in owner.scheduler.workers.values())
    directory = owner.objects  # copies between hosts (core.directory)
    return {"address": owner.head.address if owner.head is not None else None,
            "pid": os.getpid(), "started_at": owner.started_at, "nodes": [local, *nodes],
            "tasks": {"pending": len(owner.tasks) - running, "sent": running,
                      "done": owner.completed},
            "counts": {"submitted": owner.submitted, "failed": owner.failed},
            "objects": {"pulls": directory.pull_count, "pulled_bytes": directory.pulled_bytes,
                        "evicted_copies": directory.evicted_copies,
                        "evicted_bytes": directory.evicted_bytes},
            "rate": rate(owner)}


def rate(owner, now: float | None = None) -> dict:
    """Tasks done per second since the previous STATUS (since start, for the first).

    The owner counts finished tasks (``completed``) but keeps no history, so
    the rate is measured between questions: ``watch futurepool status`` shows
    the current rate, a single call the average since the head started. Two
    marks per owner: ``base``, where the rate is measured from, and
    ``pending``, the first question since; ``pending`` becomes the base once
    it is RATE_MIN_WINDOW old, so that questions in quick succession never
    give a rate over a few milliseconds.
    """
    now = time.monotonic() if now is None else now
    marks = _rate_marks.get(owner)
    if marks is None:
        marks = ((now - max(0.0, time.time() - owner.started_at), 0), None)
    base, pending = marks
    if pending is not None and now - pending[0] >= RATE_MIN_WINDOW:
        base, pending = pending, None
    _rate_marks[owner] = (base, pending or (now, owner.completed))
    window = now - base[0]
    per_second = (owner.completed - base[1]) / window if window > 0 else 0.0
    return {"per_second": round(per_second, 3), "window": round(window, 3)}


def local_heads() -> list[str]:
    """Addresses of the listening heads of this host whose driver is alive."""
    base = config.TMPDIR if len(config.TMPDIR) < 60 else "/tmp"
    found = []
    for path in sorted(glob.glob(os.path.join(base, "futurepool-*", HEAD_FILE))):
        pid = os.path.basename(os.path.dirname(path)).split("-")[1]
        if pid.isdigit() and segments.pid_alive(int(pid)):
            try:
                with open(path) as file:
                    found.append(file.read().strip())
            except OSError:
                continue
    return found


def query(address: str, keys, timeout: float = 5.0) -> dict:
    """The head's status dict; raises TimeoutError if it does not answer in time."""
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        security.make_curve_client(sock, keys)
        sock.connect(address)
        sock.send_multipart([pack_header(MessageType.STATUS)])
        if not sock.poll(timeout * 1000):
            raise TimeoutError(f"no answer from {address} within {timeout:g} s (not a"
                               " futurepool head, or a different key file)")
        frames = sock.recv_multipart()
        kind = decode_header(frames[0]).kind
        if kind != MessageType.STATUS:
            raise TimeoutError(f"{address} answered {kind.name}, not STATUS")
        return serialize.loads(frames[1])
    finally:
        sock.close(linger=0)
        ctx.term()


def render(status: dict) -> str:
    age = time.time() - status["started_at"]
    tasks = status["tasks"]
    rate = status.get("rate")  # absent from the answers of heads before it
    throughput = f", {rate['per_second']:.1f} tasks/s over the last {rate['window']:.1f} s" \
        if rate else ""
    counts = status.get("counts")  # absent from the answers of heads before it
    totals = f", {counts['submitted']} submitted, {counts['failed']} failed" if counts else ""
    lines = [f"head {status['address']} (pid {status['pid']}), up {age:.0f} s;"
             f" tasks: {tasks['pending']} pending, {tasks['sent']} at workers,"
             f" {tasks['done']} done{totals}{throughput}",
             f"  {'host':<20} {'address':<22} {'workers':>7} {'busy':>5} {'store':>10}"]
    for node in status["nodes"]:
        state = " (leaving)" if node.get("leaving") else ""
        lines.append(f"  {node['host']:<20} {node['address']:<22} {node['workers']:>7}"
                     f" {node['busy']:>5} {_size(node['store_bytes']):>10}{state}")
    objects = status.get("objects")  # absent from the answers of heads before it
    if objects and (objects["pulls"] or objects["evicted_copies"]):
        lines.append(f"  copies between hosts: {objects['pulls']} pulled"
                     f" ({_size(objects['pulled_bytes'])}), {objects['evicted_copies']} dropped"
                     f" to make room ({_size(objects['evicted_bytes'])})")
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def main(connect: str | None, key_file: str | None, as_json: bool, log=print) -> int:
    try:
        keys = security.load_keys(key_file)
    except security.SecurityError as exc:
        log(f"futurepool status: {exc}")
        return 1
    addresses = [connect] if connect else local_heads()
    if not addresses:
        log("futurepool status: no listening head on this host (give --connect tcp://HOST:PORT)")
        return 1
    code = 0
    for address in addresses:
        try:
            status = query(address, keys)
        except TimeoutError as exc:
            log(f"futurepool status: {exc}")
            code = 1
            continue
        print(json.dumps(status) if as_json else render(status), flush=True)
    return code
