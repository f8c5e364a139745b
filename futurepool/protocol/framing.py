"""Between messages and frames: the only module that packs or parses headers.

Two transports carry the same messages:

* zmq multipart messages: ``[header, body]``;
* byte pipes (driver <-> its local node): ``u32 length | header | body``.

``decode`` validates magic, version, type and sizes before returning the
body, still as bytes. Anything malformed raises :class:`ProtocolError`; the
I/O loops log and drop it.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from ..errors import ProtocolError
from .messages import (
    _KNOWN_TYPES,
    HEADER,
    MAGIC,
    MAX_PIPE_FRAME,
    PROTOCOL_VERSION,
    MessageType,
)

_LENGTH = struct.Struct("<I")
_HANDSHAKE = frozenset({MessageType.JOIN, MessageType.REFUSED})
_HEADER_SIZE = HEADER.size


class Header(NamedTuple):
    kind: MessageType
    count: int
    ident: int
    seq: int
    ack: int


def pack_header(kind: MessageType, count: int = 0, ident: int = 0, seq: int = 0,
                ack: int = 0) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, count, ident, seq, ack)


def decode_header(frame) -> Header:
    """Validate a header frame; return its fields."""
    if len(frame) != _HEADER_SIZE:
        raise ProtocolError(f"header of {len(frame)} bytes, expected {_HEADER_SIZE}")
    magic, version, kind, count, ident, seq, ack = HEADER.unpack(frame)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if kind not in _KNOWN_TYPES:
        raise ProtocolError(f"unknown message type {kind}")
    # The join handshake is read whatever the version, so that a node running
    # other code is refused with the difference (core.head.versions), not ignored.
    if version != PROTOCOL_VERSION and kind not in _HANDSHAKE:
        raise ProtocolError(f"protocol version {version}, this side speaks {PROTOCOL_VERSION}")
    return Header(MessageType(kind), count, ident, seq, ack)


# --- pipes -------------------------------------------------------------------

def write_pipe_message(fd: int, kind: MessageType, body: bytes = b"", ident: int = 0) -> None:
    """Write one framed message to a blocking pipe (short messages, rare)."""
    header = pack_header(kind, 0, ident)
    data = _LENGTH.pack(len(header) + len(body)) + header + body
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class PipeReader:
    """Incremental reader of framed messages from a non-blocking pipe."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buffer = bytearray()
        self._messages: list = []  # parsed, not yet handed out
        self.closed = False

    def next_message_is(self, kind: MessageType) -> bool:
        """Read what is available; whether the first unread message is ``kind``."""
        self._messages = self.read()  # read() hands out the buffered ones first
        return bool(self._messages) and self._messages[0][0] == kind

    def pop(self):
        return self._messages.pop(0)

    def read(self) -> list[tuple[MessageType, int, bytes]]:
        """Read what is available; return complete ``(type, ident, body)`` messages.

        Sets :attr:`closed` at end of file (the other process is gone).
        """
        try:
            while True:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    self.closed = True
                    break
                self._buffer += chunk
                if len(chunk) < (1 << 16):
                    break
        except BlockingIOError:
            pass
        except OSError:
            self.closed = True
        messages, self._messages = self._messages, []
        buf = self._buffer
        while len(buf) >= 4:
            (length,) = _LENGTH.unpack_from(buf)
            if length < _HEADER_SIZE or length > MAX_PIPE_FRAME:
                self.closed = True  # the stream is corrupt: nothing after it can be trusted
                raise ProtocolError(f"pipe frame of {length} bytes")
            if len(buf) < 4 + length:
                break
            kind, _count, ident, _seq, _ack = decode_header(bytes(buf[4:4 + _HEADER_SIZE]))
            messages.append((kind, ident, bytes(buf[4 + _HEADER_SIZE:4 + length])))
            del buf[:4 + length]
        return messages
