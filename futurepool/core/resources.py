"""Resources and memory limits per task (issue 12, points 4 and 5).

What a node offers (``cpu``, ``mem`` and whatever it declares, ``gpu=2``),
what a task asks for (``options(resources={"gpu": 1})``), and where it
fits; and the memory a task's worker may use (``options(memory_limit=)``).

::

    caller's thread            owner I/O thread (core.owner)          worker / node
    ───────────────            ─────────────────────────────          ─────────────
    options(resources=) ─ normalize (TypeError / ValueError)
    submit ─ Placement.check: fits this host, or the
             executor listens? else UnsatisfiableResourcesError
                               _dispatch ─ Round: what each node's
                                 queued and running tasks hold,
                                 counted from the workers' inflight
                                 queues ─ the least loaded worker of a
                                 node with room; GPU indices ─ TASKS ─► CUDA_VISIBLE_DEVICES
                                                                        set while it runs
                                                                     ─► TaskLimits: RSS
                                                                        every 10 ms (watchdog
                                                                        thread; the node too)

Holding: a task holds its request on its node from the moment it is sent to
a worker (queued there or running) until it leaves that worker's queue,
whatever the reason: it settled, its worker or node died, it was handed
back or requeued. The owner's workers' ``inflight`` queues are the truth for
all of these, so each dispatch pass counts from them (:class:`Round`)
instead of keeping a ledger that every exit path would have to release.
Tasks that ask for nothing hold nothing. A request that fits nowhere now
stays in the ready queue while tasks behind it are placed (no reservation:
a large request may wait while smaller ones keep fitting).

Threads: :class:`Placement` and :class:`Round` belong to the owner's I/O
thread, except :meth:`Placement.check`, which user threads call (it only
reads, and adds to a set of requests known to fit); the parsers are pure.
:class:`TaskLimits` lives in a worker (its main thread writes, the watchdog
reads); :func:`rss_of` is the node's.
"""

from __future__ import annotations

import logging
import math
import os
import re

from ..errors import UnsatisfiableResourcesError, _describe

LOGGER = logging.getLogger("futurepool")

#: Byte units a size may carry: decimal (``MB``, ``M``) and binary (``MiB``, ``Mi``).
_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgtp", start=1):
    _UNITS[_letter] = _UNITS[_letter + "b"] = 1000 ** _power
    _UNITS[_letter + "i"] = _UNITS[_letter + "ib"] = 1024 ** _power
_SIZE = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([a-zA-Z]*)\s*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
#: Requests are checked with this slack: 0.1 + 0.2 tasks of 0.3 fit.
_EPSILON = 1e-9


# -- parsing (user threads) ------------------------------------------------------------


def _parse_size(text: str, what: str) -> float:
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{what} must be a number, optionally with a byte unit (512MB, 2GiB),"
                         f" got {text!r}")
    value = float(match.group(1)) * _UNITS[unit]
    return int(value) if unit else value


def _quantity(name: str, value, what: str):
    """``value`` as a non-negative finite number (int where whole)."""
    if isinstance(value, str):
        value = _parse_size(value, what)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number or a size like '64GB', got {value!r}")
    if value != value or value in (math.inf, -math.inf):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    if value == int(value):
        value = int(value)
    if name == "gpu" and not isinstance(value, int):
        raise ValueError(f"{what} must be a whole number of GPUs, got {value!r}")
    return value


def normalize(resources, what: str = "resources") -> dict | None:
    """A validated copy of a resources dict (zero quantities dropped), or None.

    Raises:
        TypeError: not a dict, a name that is not a string, a quantity that
            is not a number or a size string.
        ValueError: a bad name, a negative, non-finite or unparsable quantity,
            a fraction of a GPU.
    """
    if resources is None:
        return None
    if not isinstance(resources, dict):
        raise TypeError(f"{what} must be a dict like {{'gpu': 1}}, got {resources!r}")
    clean = {}
    for name, value in resources.items():
        if not isinstance(name, str):
            raise TypeError(f"{what} names must be strings, got {name!r}")
        if not _NAME.match(name):
            raise ValueError(f"{what} names must be identifiers like 'gpu', got {name!r}")
        quantity = _quantity(name, value, f"{what}[{name!r}]")
        if quantity:
            clean[name] = quantity
    return clean


def parse_spec(text: str) -> dict:
    """``futurepool worker --resources gpu=2,mem=64GB`` as a dict.

    Raises:
        ValueError: naming the part that does not parse.
    """
    offer: dict = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip():
            raise ValueError(f"--resources takes NAME=QUANTITY pairs separated by commas"
                             f" (gpu=2,mem=64GB), got {part.strip()!r}")
        if name in offer:
            raise ValueError(f"--resources names {name!r} twice")
        if not _NAME.match(name):
            raise ValueError(f"--resources names must be identifiers like 'gpu', got {name!r}")
        try:
            offer[name] = _quantity(name, value.strip(), f"--resources {name}")
        except TypeError as exc:  # cannot happen for a string; as a ValueError all the same
            raise ValueError(str(exc)) from None
    return offer


def parse_bytes(value, what: str = "memory_limit") -> int | None:
    """A memory size in bytes (an int, or a string like ``'512MB'``), or None.

    Raises:
        TypeError: neither an int nor a string.
        ValueError: not positive, or a string that does not parse.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = _parse_size(value, what)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of bytes or a size like '512MB', got"
                        f" {value!r}")
    if value != value or value in (math.inf, -math.inf) or value < 1:
        raise ValueError(f"{what} must be a positive, finite number of bytes, got {value!r}")
    return int(value)


#: ``cpu=8, gpu=2, mem=64.0GB``: quantities as a user would write them.
describe = _describe


# -- what this host offers -----------------------------------------------------------


def detect() -> dict:
    """This host's CPUs (those this process may use) and memory (physical, or its cgroup's)."""
    if hasattr(os, "process_cpu_count"):
        cpus = os.process_cpu_count() or 1
    else:
        try:
            cpus = len(os.sched_getaffinity(0)) or 1
        except AttributeError:  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        import psutil

        memory = psutil.virtual_memory().total
    limit = _cgroup_memory_limit()
    if limit:
        memory = min(memory, limit)
    return {"cpu": cpus, "mem": memory}


def _cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2, else v1), if it sets one."""
    try:
        with open("/proc/self/cgroup") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if controllers == "":
            candidates = [f"/sys/fs/cgroup{path}/memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"]
        else:
            continue
        for candidate in candidates:
            try:
                with open(candidate) as file:
                    text = file.read().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 1 << 60:  # "max", or v1's "no limit"
                return int(text)
    return None


def node_offer(declared: dict | None) -> dict:
    """What a node offers: detected CPUs and memory, then what it declares (which wins)."""
    return {**detect(), **(declared or {})}


# -- placement (the owner's I/O thread; check() also in user threads) ------------------------


def fits(request, offer: dict, held: dict | None = None) -> bool:
    """Whether ``request`` (name, quantity pairs) fits ``offer`` beside what is ``held``."""
    held = held or {}
    return all(held.get(name, 0) + quantity <= offer.get(name, 0) + _EPSILON
               for name, quantity in request)


class Placement:
    """Where tasks that ask for resources may go: one per owner.

    ``local`` is this host's offer (detected, plus ``Executor(resources=)``);
    each remote node's is set on its link (``link.resources``) when it joins.
    """

    def __init__(self, declared: dict | None, listening: bool, local_workers: bool = True):
        self.declared = declared
        self.listening = listening
        self.local_workers = local_workers  # False: a head that runs no task itself
        self._local: dict | None = None
        self.fit_here: set = set()  # requests this host can run (check's shortcut)
        self.last_gpus: dict[int, tuple] = {}  # worker id -> the GPUs it had last
        self.warned: set = set()  # requests said to fit no joined node (logged once)

    @property
    def local(self) -> dict:
        if self._local is None:
            self._local = node_offer(self.declared)
        return self._local

    def offer(self, link) -> dict:
        offer = getattr(link, "resources", None)
        if offer is None and not link.remote:
            offer = link.resources = self.local
        return offer or {}

    def check(self, request) -> None:
        """In the caller's thread: raise if no node can ever run ``request``.

        The rule: an executor that does not listen for remote nodes has only
        this host, whose offer never changes, so a request it cannot fit
        fails now. One that listens may yet be joined by a node that fits:
        the task waits (and the owner logs that no joined node fits it).
        """
        if self.listening or request in self.fit_here:
            return
        if fits(request, self.local):
            self.fit_here.add(request)
            return
        offers = {f"this host ({os.uname().nodename})": dict(self.local)}
        raise UnsatisfiableResourcesError(dict(request), offers, listening=False)

    def round(self, scheduler) -> Round:
        return Round(self, scheduler)


class Round:
    """One dispatch pass: what each node's tasks hold, and where a request fits now."""

    def __init__(self, placement: Placement, scheduler):
        self.placement = placement
        self.scheduler = scheduler
        self.held: dict = {}   # link -> {name: quantity}
        self.gpus: dict = {}   # link -> GPU indices held
        self.offers: dict = {}  # link -> offer
        self.unfit: set = set()  # requests with nowhere to go in this pass
        for slot in scheduler.workers.values():
            link = slot.link
            if link not in self.offers:
                self.offers[link] = placement.offer(link)
                self.held[link] = {}
                self.gpus[link] = set()
            for task in slot.inflight:
                if task.resources is not None:
                    self._hold(link, task.resources, task.gpus)

    def _hold(self, link, request, gpus) -> None:
        held = self.held[link]
        for name, quantity in request:
            held[name] = held.get(name, 0) + quantity
        self.gpus[link].update(gpus)

    def pick(self, task, now: float, best):
        """The worker to send ``task`` to (its GPUs chosen), or None: it waits.

        ``best``: the worker the task would get if it asked for nothing (the
        least loaded); it is the answer when its node has room.
        """
        request = task.resources
        if request in self.unfit:
            return None
        link = best.link
        if fits(request, self.offers[link], self.held[link]):
            worker = best
        else:
            links = {link for link, offer in self.offers.items()
                     if fits(request, offer, self.held[link])}
            worker = self.scheduler.pick(task.estimate, now, links=links) if links else None
        if worker is None:
            self.unfit.add(request)  # workers only get busier in one pass
            self._warn_if_hopeless(task)
            return None
        link = worker.link
        wanted = dict(request).get("gpu", 0)
        gpus = ()
        if wanted:
            free = [i for i in range(int(self.offers[link].get("gpu", 0)))
                    if i not in self.gpus[link]]
            last = self.placement.last_gpus.get(worker.worker_id, ())
            # The GPUs this worker had before, if free: CUDA reads CUDA_VISIBLE_DEVICES
            # once per process, so a worker that keeps its devices keeps working.
            gpus = last if len(last) == wanted and set(last) <= set(free) \
                else tuple(free[:wanted])
            self.placement.last_gpus[worker.worker_id] = gpus
        task.gpus = gpus
        self._hold(link, request, gpus)
        return worker

    def _warn_if_hopeless(self, task) -> None:
        """A listening executor: say (once) that a request fits no node it has now."""
        placement, request = self.placement, task.resources
        if not placement.listening or request in placement.warned:
            return
        offers = {link.describe(): offer for link, offer in self.offers.items()}
        if placement.local_workers:  # its workers may not have said READY yet
            offers.setdefault("this host", placement.local)
        if any(fits(request, offer) for offer in offers.values()):
            return
        placement.warned.add(request)
        offers = "; ".join(f"{node}: {describe(offer)}" for node, offer in offers.items()) \
            or "no node has joined"
        LOGGER.warning("%s asks for %s, which no node offers (%s); it waits for a node that"
                       " does to join", task.describe(), describe(dict(request)), offers)


# -- memory (the worker's watchdog thread, and the node) -------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def private_rss(statm: bytes) -> int:
    """Resident bytes not backed by a file or shared memory, from ``/proc/PID/statm``.

    Pages of the object store (shared memory) and of mapped files are left
    out: killing the worker would not free them.
    """
    fields = statm.split()
    return (int(fields[1]) - int(fields[2])) * _PAGE


def rss_of(pid: int) -> int | None:
    """``private_rss`` of process ``pid``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as file:
            return private_rss(file.read())
    except (OSError, IndexError, ValueError):
        return None


class TaskLimits:
    """In a worker: the limits of the task it runs (memory, GPUs), set and undone per task."""

    def __init__(self):
        self.memory_limit = 0
        self.peak = 0
        self.task = None  # (task_id, attempt) the limit belongs to
        self.statm = -1
        # The devices this process may use: a task's GPU indices count within them.
        base = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.devices = [d.strip() for d in base.split(",")] if base else None
        self.saved_devices: str | None = None

    def begin(self, task, limits) -> None:
        """``limits``: ``(memory_limit, gpu indices)`` from the owner."""
        memory_limit, gpus = limits
        if gpus:
            self.saved_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
            devices = self.devices
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(
                devices[i] if devices is not None and i < len(devices) else str(i)
                for i in gpus)
        if memory_limit:
            if self.statm < 0:
                self.statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
            self.peak = 0
            self.task = task
            self.memory_limit = memory_limit

    def end(self, limits) -> None:
        self.memory_limit = 0
        self.task = None
        if limits[1]:
            if self.saved_devices is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = self.saved_devices
            self.saved_devices = None

    def over(self, current) -> bool:
        """From the watchdog: whether the running task's worker is past its memory limit."""
        limit = self.memory_limit
        if not limit or self.task != current:
            return False
        rss = private_rss(os.pread(self.statm, 256, 0))
        if rss > self.peak:
            self.peak = rss
        return rss > limit
