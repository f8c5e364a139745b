"""Tunables, in one place.

Every constant here can be overridden by an environment variable of the same
name prefixed with ``FUTUREPOOL_`` (``FUTUREPOOL_HEARTBEAT_INTERVAL=0.2``), read
once at import. Durations are seconds. Tests patch the module attributes
directly; code must therefore read them as ``config.NAME`` at use time, never
copy them into a default argument.
"""

from __future__ import annotations

import os
import tempfile


def _env(name: str, default, kind=None):
    raw = os.environ.get("FUTUREPOOL_" + name)
    if raw is None:
        return default
    kind = kind or type(default)
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"FUTUREPOOL_{name} must be a {kind.__name__}, got {raw!r}") from None


#: Directory under which each executor makes its private (0700) run directory
#: holding its ``ipc://`` sockets. Tests point this at a per-worker folder so
#: that a leak check only sees its own run directories.
TMPDIR: str = _env("TMPDIR", tempfile.gettempdir(), str)

#: Tasks a worker may hold beyond the one it runs, for functions whose run
#: time is not known yet. Once the owner has measured a function, the queue
#: depth adapts so that about QUEUED_WORK_TARGET seconds of work wait at a
#: worker (never more than MAX_QUEUE_DEPTH tasks).
INITIAL_QUEUE_DEPTH: int = _env("INITIAL_QUEUE_DEPTH", 1)
MAX_QUEUE_DEPTH: int = _env("MAX_QUEUE_DEPTH", 64)
QUEUED_WORK_TARGET: float = _env("QUEUED_WORK_TARGET", 0.002)

#: How often the node checks its workers and the driver, and the I/O thread
#: wakes at the latest.
HEARTBEAT_INTERVAL: float = _env("HEARTBEAT_INTERVAL", 0.5)

#: After a worker is reported dead, results it sent before dying may still be
#: in flight on its socket; its running task is failed only after this grace.
DEATH_GRACE: float = _env("DEATH_GRACE", 0.05)

#: A task past its timeout, or stopped with ``Future.stop()``, is first
#: interrupted by an exception raised inside it; if it has not ended this
#: many seconds later, its worker is killed (SIGKILL) and replaced.
INTERRUPT_GRACE: float = _env("INTERRUPT_GRACE", 0.5)

#: While a task with a ``memory_limit`` runs, its node reads its worker's
#: resident memory this often (the worker itself looks every 10 ms), to kill
#: it past the limit even while C code holds the worker's GIL.
MEMORY_CHECK_INTERVAL: float = _env("MEMORY_CHECK_INTERVAL", 0.02)

#: A worker that cannot start (initializer fails, import error) is restarted
#: with exponential back-off; after this many consecutive failures the pool is
#: declared broken instead of respawning forever (cpython#87472).
MAX_START_FAILURES: int = _env("MAX_START_FAILURES", 3)

#: Seconds given to workers and the node to exit on shutdown before SIGKILL.
SHUTDOWN_TIMEOUT: float = _env("SHUTDOWN_TIMEOUT", 5.0)

#: Seconds the driver waits for its node to start before giving up.
START_TIMEOUT: float = _env("START_TIMEOUT", 60.0)

#: Without tqdm, ``progress=True`` prints a line on a terminal's stderr at
#: most this often (``futurepool.progress``), and one at the end.
PROGRESS_INTERVAL: float = _env("PROGRESS_INTERVAL", 1.0)

# --- the object store (store/segments.py) -------------------------------------

#: Values (and pickle-5 buffers) at least this many bytes are stored in shared
#: memory and passed by location; smaller ones travel inside messages. Measured
#: (an array sent to a task that returns it): storing costs a fixed ~0.2 ms, so
#: inline wins up to 128 KiB (0.19 vs 0.40 ms), they meet at 256 KiB (0.46 vs
#: 0.43), and the store wins from there (1 MiB: 1.6 vs 0.5 ms; 4 MiB: 8.2 vs 1.0).
INLINE_THRESHOLD: int = _env("INLINE_THRESHOLD", 256 * 1024)

#: Where segments live (a tmpfs), and the name prefix of every one of them.
#: Tests give each run its own prefix so that leak checks see only their own.
SHM_DIR: str = _env("SHM_DIR", "/dev/shm", str)
SHM_PREFIX: str = _env("SHM_PREFIX", "fp_", str)

#: Bytes of SHM_DIR the stores of one executor may fill before new values
#: spill to SPILL_DIR. 0: STORE_FRACTION of the free space seen at start.
STORE_CAPACITY: int = _env("STORE_CAPACITY", 0)
STORE_FRACTION: float = _env("STORE_FRACTION", 0.5)

#: Directory for values that do not fit in shared memory (on disk).
SPILL_DIR: str = _env("SPILL_DIR", TMPDIR, str)

#: Freed segments each writing process keeps mapped for reuse (writing into
#: pages already mapped is several times faster than into fresh ones).
STORE_POOL_BYTES: int = _env("STORE_POOL_BYTES", 1 << 30)

# --- the cluster (protocol/security.py) ---------------------------------------

#: The cluster's secret: one file, written by ``futurepool keygen`` (mode 0600)
#: and copied to every host; head and nodes derive their CURVE keys from it.
KEY_FILE: str = _env(
    "KEY_FILE", os.path.join(os.path.expanduser("~"), ".config", "futurepool", "cluster.key"), str)

#: A peer that fails the CURVE handshake is logged at most once per this many
#: seconds per address; the refusals in between are counted and summarised.
REFUSAL_LOG_INTERVAL: float = _env("REFUSAL_LOG_INTERVAL", 60.0)

#: A remote node (or the head, seen from a node) silent for this long is dead.
#: Both sides send a heartbeat every HEARTBEAT_INTERVAL.
NODE_TIMEOUT: float = _env("NODE_TIMEOUT", 5.0)

#: Over TCP, a message not acknowledged this long after it was sent goes
#: again (then after twice as long...; ``protocol.channel``). TCP itself does
#: not lose data: this is for what a broken, re-dialled connection drops.
RESEND_AFTER: float = _env("RESEND_AFTER", 1.0)

#: An executor created while this is set (``tcp://HOST:PORT``) listens there for
#: remote nodes, as if created with ``listen=``: unchanged programs scale out.
LISTEN: str = _env("LISTEN", "", str)

#: Workers a listening head runs itself when the program does not say
#: (``max_workers=None``); -1: one per CPU, 0: a head that runs no task.
LOCAL_WORKERS: int = _env("LOCAL_WORKERS", -1)

#: Seconds a remote node waits for the head's answer to JOIN before it retries,
#: and the longest back-off between attempts to reach a head.
JOIN_TIMEOUT: float = _env("JOIN_TIMEOUT", 10.0)
RECONNECT_MAX_INTERVAL: float = _env("RECONNECT_MAX_INTERVAL", 5.0)

# --- objects across hosts (store/transfer.py) ----------------------------------

#: Times a lost stored result (its only copy was on a node that was lost) may be
#: rebuilt by re-running the task that made it, per result (``core.lineage``);
#: 0: never (a lost result raises ObjectLostError). ``Executor(max_reconstructions=)``
#: overrides it per executor.
MAX_RECONSTRUCTIONS: int = _env("MAX_RECONSTRUCTIONS", 3)

#: A pull asks for pieces in chunks of this many bytes, up to TRANSFER_WINDOW of
#: them in flight, TRANSFER_RUN consecutive ones per request (the holder sends
#: a run's chunks back to back: one wake-up of its thread per run, not per chunk).
#: Chunk size, measured with bench_cluster.py's objects scenario (200 MB made
#: on node B, summed on C, returned to the driver; veth between namespaces,
#: CURVE, 2 loaded cores; GB/s = 400 MB moved / seconds, median of 2), one
#: chunk per request: chunk x window 256K x4 0.25, 1M x4 0.33, 4M x4 0.33, 8M x4
#: 0.32, 1M x2 0.34, 1M x8 0.27, 4M x2 0.30, 4M x8 0.30 (+-5..26%): below 1 MiB
#: the per-chunk round trips cost; above, nothing is gained and a lost source
#: wastes more. Window and run, measured interleaved on one warm 200 MB pull
#: between two namespaces (median of 10 each, as a share of the CURVE floor
#: measured between them): 4x1 0.79-0.82, 16x1 0.78, 8x4 0.79, 16x2 0.83,
#: 16x4 0.87-0.94, 16x8 0.87, 24x8 0.88, 32x16 0.89.
TRANSFER_CHUNK: int = _env("TRANSFER_CHUNK", 1 << 20)
TRANSFER_WINDOW: int = _env("TRANSFER_WINDOW", 16)
TRANSFER_RUN: int = _env("TRANSFER_RUN", 4)

#: A pull that receives nothing for this long gives up on its source and tries
#: the next copy (then fails with ObjectLostError naming every attempt).
TRANSFER_TIMEOUT: float = _env("TRANSFER_TIMEOUT", 10.0)

#: Where a remote node's transfer endpoint listens (other nodes pull from it
#: directly): "" = the address of the interface that reaches the head, port
#: chosen by the system; "none" = nowhere (its objects are relayed by the head).
TRANSFER_ADDRESS: str = _env("TRANSFER_ADDRESS", "", str)
