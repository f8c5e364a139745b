"""Exactly-once messages over a link that may lose, repeat or delay them.

ZeroMQ over TCP loses what was queued on a connection that breaks (it
reconnects, but the old pipe's messages are gone), and our own resends
and reconnects can deliver a message twice. One :class:`Channel` per peer
and direction pair fixes both, at the cost of two header fields::

    sender                                   receiver
    stamp(): seq = n, kept in `unacked`  ──►  receive(seq): the next one? -> handle it
                                              early? -> hold it until the gap fills
                                              seen before? -> drop it (a duplicate)
    accept(ack): forget seq <= ack      ◄──  every header it sends carries
                                              ack = all of ours up to here arrived
    due(): overdue and unacknowledged
           -> the same message again, with back-off

Acknowledgements ride on the traffic that flows anyway (TASKS one way,
RESULTS the other, heartbeats); a bare ``ACK`` goes only when there is
nothing to carry it. Messages with ``seq`` 0 are outside the scheme
(heartbeats, acks, the join handshake): losing one costs nothing.

Order is kept: a message that overtakes a lost one waits for it, because
a worker's output is a byte stream (tasks and results would not mind).
A channel is bookkeeping only: it never touches a socket, and its user
serialises access to it.
"""

from __future__ import annotations

from ..protocol.framing import pack_header
from .messages import MessageType

#: Back-off cap, in multiples of ``resend_after``: however old, an unacknowledged
#: message goes again at least this often.
MAX_BACKOFF = 4


class Channel:
    __slots__ = ("resend_after", "sent", "unacked", "received", "ahead", "told",
                 "duplicates", "resent")

    def __init__(self, resend_after: float):
        self.resend_after = resend_after
        self.sent = 0  # the last sequence number given out
        # seq -> [kind, count, ident, body, due, interval], oldest first.
        self.unacked: dict[int, list] = {}
        self.received = 0  # every message of the peer up to this number arrived
        self.ahead: dict[int, object] = {}  # arrived early (one before them was lost): held
        self.told = 0  # the `received` we last sent the peer
        self.duplicates = 0
        self.resent = 0

    # -- sending -----------------------------------------------------------------

    def stamp(self, kind: MessageType, count: int, ident: int, body, now: float) -> bytes:
        """The header of a new message; the message is kept until acknowledged."""
        self.sent += 1
        self.unacked[self.sent] = [kind, count, ident, body, now + self.resend_after,
                                   self.resend_after]
        self.told = self.received
        return pack_header(kind, count, ident, self.sent, self.received)

    def plain(self, kind: MessageType, count: int = 0, ident: int = 0) -> bytes:
        """The header of a message outside the scheme (a heartbeat, an ack)."""
        self.told = self.received
        return pack_header(kind, count, ident, 0, self.received)

    @property
    def ack_pending(self) -> bool:
        """Whether the peer has not heard of everything that arrived."""
        return self.told != self.received

    def due(self, now: float) -> list[tuple[bytes, object]]:
        """``(header, body)`` of every overdue message, to send again (with back-off)."""
        again = []
        for seq, entry in self.unacked.items():
            kind, count, ident, body, when, interval = entry
            if when > now:
                continue
            interval = min(interval * 2, MAX_BACKOFF * self.resend_after)
            entry[4], entry[5] = now + interval, interval
            again.append((pack_header(kind, count, ident, seq, self.received), body))
        if again:
            self.told = self.received
            self.resent += len(again)
        return again

    def rewind(self, now: float) -> list[tuple[bytes, object]]:
        """The connection was dialled again: what it may have lost, to send now."""
        for entry in self.unacked.values():
            entry[4], entry[5] = now, self.resend_after / 2
        return self.due(now)

    # -- receiving ---------------------------------------------------------------

    def receive(self, seq: int, ack: int, message) -> list:
        """Take a header's ``seq`` and ``ack``: the messages to handle now, in order.

        ``[message]`` as a rule; more when it fills a gap (the held ones follow);
        none for a duplicate, or for an early one (held until the gap fills).
        """
        if ack:
            unacked = self.unacked
            while unacked:
                oldest = next(iter(unacked))
                if oldest > ack:
                    break
                del unacked[oldest]
        if not seq:
            return [message]
        if seq <= self.received or seq in self.ahead:
            self.duplicates += 1
            self.told = -1  # our ack was lost: it should go again (ack_pending)
            return []
        if seq != self.received + 1:
            self.ahead[seq] = message
            return []
        self.received = seq
        ready = [message]
        ahead = self.ahead
        while ahead and self.received + 1 in ahead:
            self.received += 1
            ready.append(ahead.pop(self.received))
        return ready
