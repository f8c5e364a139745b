"""Testing hooks that lose or delay chosen messages (FAULTS.md 33).

Off unless ``FUTUREPOOL_TESTING_FAULTS`` is set, to comma-separated rules:

``drop:KIND:N``
    this process loses the first N messages of type KIND it sends over TCP;
``delay:KIND:SECONDS``
    this process holds every message of type KIND that long before sending;
``version-skew``
    a joining node claims another cloudpickle version;
``delay-pull:SECONDS``
    this host's transfer endpoint starts each pull that much later (a chained
    pull's source then hears of its own pull after its downstream asks).

KIND is a :class:`~futurepool.protocol.messages.MessageType` name. The
variable is read when a link is set up, so a test can set it for the
process under test only. Nothing here runs when it is unset: senders keep
``None`` as their plan.
"""

from __future__ import annotations

import os

from ..errors import ProtocolError
from .messages import MessageType

ENV = "FUTUREPOOL_TESTING_FAULTS"


class FaultPlan:
    def __init__(self, spec: str):
        self.drops: dict[MessageType, int] = {}
        self.delays: dict[MessageType, float] = {}
        self.flags: set[str] = set()
        for rule in filter(None, (part.strip() for part in spec.split(","))):
            action, _, rest = rule.partition(":")
            if action not in ("drop", "delay"):
                self.flags.add(rule)
                continue
            name, _, amount = rest.partition(":")
            try:
                kind = MessageType[name]
                if action == "drop":
                    self.drops[kind] = int(amount)
                else:
                    self.delays[kind] = float(amount)
            except (KeyError, ValueError):
                raise ProtocolError(f"{ENV}: bad rule {rule!r}: expected drop:KIND:N or"
                                    " delay:KIND:SECONDS with KIND one of"
                                    f" {', '.join(t.name for t in MessageType)}") from None

    def drop(self, kind: MessageType) -> bool:
        """Whether to lose this message (counts it)."""
        left = self.drops.get(kind)
        if not left:
            return False
        self.drops[kind] = left - 1
        # Tests check the fault happened by this line (a worker's stderr reaches the driver).
        os.write(2, f"futurepool testing fault: lost a {kind.name} (pid {os.getpid()})\n"
                 .encode())
        return True

    def delay(self, kind: MessageType) -> float:
        return self.delays.get(kind, 0.0)


def plan() -> FaultPlan | None:
    """This process's plan, or None when no fault is asked for (always, outside tests)."""
    spec = os.environ.get(ENV)
    return FaultPlan(spec) if spec else None


def flag(name: str) -> bool:
    return name in os.environ.get(ENV, "").split(",")


def seconds(name: str) -> float:
    """The SECONDS of a ``name:SECONDS`` rule (0.0 when there is none)."""
    for rule in os.environ.get(ENV, "").split(","):
        key, _, value = rule.strip().partition(":")
        if key == name:
            try:
                return float(value)
            except ValueError:
                raise ProtocolError(f"{ENV}: bad rule {rule!r}: expected {name}:SECONDS") \
                    from None
    return 0.0
