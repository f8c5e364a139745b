"""Message types and the fixed binary header.

Every message is a header frame followed by body frames. The header is a
fixed ``struct`` layout, validated before anything else is read::

    magic  b"fp"   2 bytes
    version        1 byte   (PROTOCOL_VERSION)
    type           1 byte   (MessageType)
    count          4 bytes  (items in a batch, or a flag word)
    ident          8 bytes  (task id, worker id, ... depending on the type)
    seq            4 bytes  (over TCP: this message's number on its link, 0: none)
    ack            4 bytes  (over TCP: every message of the peer up to this one arrived)

``seq`` and ``ack`` make a lossy link exactly-once (``protocol.channel``):
between the head and a remote node or worker, messages that must arrive
are numbered, kept until acknowledged, sent again when overdue, and
dropped as duplicates when they arrive twice. On one host (ipc sockets
and pipes, which do not lose messages) both are 0.

Bodies are bytes that only ``core`` decodes (with ``store.serialize``): the
wire layer never unpickles. Batches keep the per-message cost off the hot
path: one ``TASKS`` message carries every task dispatched to a worker in one
round of the owner's loop, one ``RESULTS`` message every result a worker had
ready.

Body layouts (pickled tuples of builtins; user data is inside as bytes):

=============  =========================  =====================================
type           direction                  body
=============  =========================  =====================================
READY          worker -> owner            (worker_id, pid, tasks_left)
TASKS          owner -> worker            [(task_id, attempt, fn_id, fn_bytes,
                                           args_bytes, ((object_id, value),..),
                                           timeout seconds or 0.0)]
RESULTS        worker -> owner            [(task_id, attempt, status, payload,
                                           run_seconds[, patches])]: patches, an
                                          encoded value: what the task changed in
                                          mirrors of the driver's shared memory
                                          (store.shared), written back first
INIT_FAILED    worker -> owner            exception bytes (serialize.dumps_exception)
START_FAILED   worker -> owner            exception bytes: importing the main script
                                          (spawn semantics) failed
OUTPUT         remote worker -> owner     raw bytes it wrote; count: 1 stdout, 2 stderr
STOP           owner -> worker            empty
INTERRUPT      owner -> worker            (task_id, attempt): stop it if running, drop it
                                          if queued (Future.stop; ident: the worker id,
                                          which routes it to a remote worker)
FREE           owner -> worker            [Location tuple, ...] of pieces it wrote
NODE_CONFIG    driver -> node (pipe)      dict of start-up settings
WORKER_EXITED  node -> driver (pipe)      (worker_id, pid, exitcode, signal_name,
                                           running task_id, attempt, why it was
                                           being interrupted: processes.INTERRUPT_*)
WORKER_STARTED node -> driver (pipe)      (worker_id, pid), right after the fork
NODE_STOP      driver -> node (pipe)      empty; ident: the signal to stop with (0: none)
NODE_SCALE     driver -> node (pipe)      empty; ident: how many workers to keep
JOIN           remote node -> head (tcp)  {versions, host, workers, pid}
WELCOME        head -> remote node        dict of session settings (node_index, ...)
REFUSED        head -> remote node        utf-8 text: why (a version mismatch...)
HEARTBEAT      both ways (tcp)            empty
LEAVE          remote node -> head        empty: draining, send no more tasks
BYE            head -> remote node        empty: the session is over
STATUS         client <-> head (tcp)      request: empty; answer: dict (futurepool status)
ACK            both ways (tcp)            empty: carries only ``ack`` (nothing to send
                                          it along with)
PULL           head -> remote node        [(pull_id, name, nbytes, spilled, sources)]:
                                          copy these stored pieces into this node's store;
                                          sources: ((node index or -1 for the head,
                                          transfer address or "", name there, spilled,
                                          primary name), ...), tried in order; a host
                                          still pulling the piece serves it by its
                                          primary name (pipelined broadcast)
PULLED         remote node -> head        [(pull_id, Location tuple or None, why not, or from which
                                          source: "source N: ...")]
DROP           head -> remote node        [Location tuple, ...]: copies (or pieces whose
                                          writer is gone) to remove from its store
SUBMIT         owner worker -> head       [(local_id, fn_id, fn_bytes or b"", fn_name,
                                           args, ((object_id, value), ..), (timeout,
                                           max_retries, resources, memory_limit))]: tasks a task
                                          submitted (core.nested, core.relay)
OUTCOMES       head -> owner worker       [(local_id, status, payload)]: how they ended
CANCEL         owner worker -> head       [local_id, ...]: cancel or stop (count 1)
WAITING        worker -> head             [local_id, ...]: its task is blocked on these;
                                          run them here (ident: the worker id)
RESUMED        worker -> head             empty: the blocked task goes on
RETURN         worker -> head             [(task_id, attempt), ...] it will not run
LEND           head -> worker             like TASKS, for a blocked worker to run inline
GET            borrower -> head -> owner  [(owner_or_borrower_id, local_id), ...]: send
                                          the value when it is done
VALUE          owner -> head -> borrower  [(borrower_or_owner_id, local_id, status,
                                           payload)]
RELEASE        borrower -> head -> owner  [(owner_or_borrower_id, local_id), ...]
OWNER_DIED     head -> borrower           [owner worker id, ...]
=============  =========================  =====================================

Object transfers (``store.transfer``) have their own sockets: each node's
transfer endpoint (a CURVE ROUTER, when it has an address) and the head's
(which also relays for nodes nobody can dial). Bodies there are never
pickled: a fixed ``struct`` and a name, or raw bytes.

=================  =====================  ========================================
type               direction              frames after the header
=================  =====================  ========================================
CHUNK_REQUEST      puller -> holder       CHUNK_BODY (source, offset, length,
                                          nbytes, chunk) + the piece's name
                                          (utf-8); ident: the transfer, count:
                                          the first chunk of the run asked for
CHUNK              holder -> puller       one chunk's bytes (ident: as asked;
                                          count: the chunk's index)
CHUNK_ERROR        holder -> puller       utf-8 text: why it cannot be served
TRANSFER_HELLO     node -> head endpoint  b"<node index>": this connection is that
                                          node's, for the head to ask it for chunks
=================  =====================  ========================================

Over TCP, each remote worker has its own connection to the head (the node
keeps only the control messages); a worker's header ident is its worker id,
and the head routes to the connection that last introduced itself for it.
"""

from __future__ import annotations

import enum
import struct

PROTOCOL_VERSION = 8
MAGIC = b"fp"
HEADER = struct.Struct("<2sBBIQII")

#: Upper bound of one pipe frame, a guard against a corrupt length prefix.
MAX_PIPE_FRAME = 1 << 30


class MessageType(enum.IntEnum):
    READY = 1
    TASKS = 2
    RESULTS = 3
    INIT_FAILED = 4
    STOP = 5
    FREE = 6
    START_FAILED = 7
    OUTPUT = 8
    INTERRUPT = 9
    NODE_CONFIG = 10
    WORKER_EXITED = 11
    NODE_STOP = 12
    WORKER_STARTED = 13
    NODE_SCALE = 14
    JOIN = 20
    WELCOME = 21
    REFUSED = 22
    HEARTBEAT = 23
    LEAVE = 24
    BYE = 25
    STATUS = 26
    ACK = 27
    PULL = 28
    PULLED = 29
    DROP = 30
    CHUNK_REQUEST = 40
    CHUNK = 41
    CHUNK_ERROR = 42
    TRANSFER_HELLO = 43
    SUBMIT = 50
    OUTCOMES = 51
    CANCEL = 52
    WAITING = 53
    RESUMED = 54
    RETURN = 55
    LEND = 56
    GET = 57
    VALUE = 58
    RELEASE = 59
    OWNER_DIED = 60


#: A CHUNK_REQUEST's body: source (-1: the store of whoever is asked; a node index:
#: relay to that node), offset, length, the piece's whole size, and the chunk size
#: (the length is a run of chunks, each sent as one CHUNK; 0: one chunk); the name follows.
CHUNK_BODY = struct.Struct("<qQQQQ")

_KNOWN_TYPES = frozenset(int(t) for t in MessageType)


class ResultStatus(enum.IntEnum):
    """How a task ended, as a worker reports it."""

    OK = 0               #: payload is the encoded return value (serialize.encode)
    ERROR = 1            #: payload is serialize.dumps_exception(...) of the task's exception
    ARGS_FAILED = 2      #: the arguments (or function) could not be unpickled
    MISSING_FUNCTION = 3  #: the worker's cache lost the function: send it again
    TIMED_OUT = 4        #: interrupted past its timeout; payload: what it raised, or b""
    STOPPED = 5          #: interrupted (or dropped unstarted) by Future.stop(); payload b""
    CANCELLED = 6        #: a nested task cancelled before it ran (OUTCOMES, VALUE)
