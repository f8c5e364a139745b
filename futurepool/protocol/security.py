"""Keys and CURVE: the cluster's secret, the keypairs derived from it, socket options.

The model (``FAULTS.md`` §1b)::

    key file (0600, 32 random bytes)                       same file on every host
            │ HKDF-SHA256, one label per role
            ├──────────────► head keypair ── CURVE server; its ZAP handler
            │                                admits exactly the node key
            └──────────────► node keypair ── CURVE client; pins the head's
                                             public key as its server key

Why derive instead of generating keypairs and exchanging public keys:

* **One file to distribute.** A new host needs the key file and the head's
  address, nothing else; there is no list of public keys to keep in sync.
* **The node pins the head.** The node computes the head's public key from
  the secret and gives it to libzmq as the server key, so a rogue head (which
  would feed the node pickles) fails the handshake like a stranger does.
* **The head admits only the node key.** Its ZAP handler accepts exactly one
  client key, derived from the same secret; everything else is refused before
  a single application frame is read.

Holding the file is holding the cluster: whoever has it can run code as the
cluster's user on every host (the threat model). Hence the ssh-style refusal
of key files other users can read. Per-node keypairs in an allow-list
(Ironhouse) would add revocation without changing the wire; not built.

Who refuses what, and where it shows:

* a peer without the secret derives a different head key: the head cannot
  decrypt its CURVE HELLO and libzmq closes the connection *before* ZAP is
  asked. Only the socket monitor sees it (:meth:`.zap.Authenticator.watch`);
* a peer that knows the head's public key but not the node's secret key
  reaches ZAP and gets status 400 (:meth:`.zap.Authenticator.handle`);
* a plain ZeroMQ peer (NULL mechanism) or raw bytes fail the ZMTP greeting,
  again seen by the monitor only.

Nothing here owns a socket: the helpers set options on sockets the caller
made. The ZAP handler that admits the node key, the socket monitors that
see the other refusals, and the client's view of its handshakes are in
:mod:`futurepool.protocol.zap` (imports point from there to here).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import secrets
import stat
from typing import NamedTuple

import zmq
from zmq.utils import z85

from .. import config
from ..errors import FuturePoolError

__all__ = [
    "KEY_BYTES",
    "ZAP_DOMAIN",
    "ClusterKeys",
    "KeyFileError",
    "Role",
    "SecurityError",
    "admitted_keys",
    "check_curve",
    "create_key_file",
    "derive_keypairs",
    "hkdf",
    "key_file_path",
    "key_fingerprint",
    "literal_key_warning",
    "load_keys",
    "load_secret",
    "make_curve_client",
    "make_curve_server",
    "parse_secret",
]

LOGGER = logging.getLogger("futurepool")

#: Bytes of the cluster secret (256 bits).
KEY_BYTES = 32

#: The ZAP domain of every CURVE server socket futurepool binds.
ZAP_DOMAIN = b"futurepool"

# HKDF inputs. The salt is constant: the secret is already uniformly random,
# so the salt only separates this use of it from any other (RFC 5869 §3.1).
# Changing a label changes every key, so they carry a version.
_HKDF_SALT = b"futurepool cluster key v1"
_HEAD_INFO = b"futurepool v1 head CURVE secret key"
_NODE_INFO = b"futurepool v1 node CURVE secret key"
_FINGERPRINT_INFO = b"futurepool v1 key fingerprint"

# A key file is small; anything bigger is not one (and is not read whole).
_MAX_KEY_FILE_BYTES = 4096


class SecurityError(FuturePoolError):
    """A key, a key file or CURVE itself cannot be used."""


class KeyFileError(SecurityError):
    """A key file is missing, too permissive, malformed, or already exists.

    Attributes:
        path: the key file.
        mode: its permission bits when they were the problem, else ``None``.
    """

    def __init__(self, message: str, path: str | None = None, mode: int | None = None):
        super().__init__(message)
        self.path = path
        self.mode = mode

    def __reduce__(self):
        return type(self), (str(self), self.path, self.mode)


# --- key files ---------------------------------------------------------------------


def key_file_path(path: str | os.PathLike | None = None) -> str:
    """The key file to use: ``path`` if given, else ``config.KEY_FILE``, ``~`` expanded."""
    return os.path.abspath(os.path.expanduser(os.fspath(path or config.KEY_FILE)))


def create_key_file(path: str | os.PathLike | None = None, *, force: bool = False) -> str:
    """Write a new random cluster secret to a file only its owner can read.

    The parent directory is created (mode 0700) if missing. The file appears
    whole or not at all: the secret is written and synced to a temporary file
    of mode 0600 in the same directory, which is then linked to ``path``
    (failing if it exists) or, with ``force``, renamed over it.

    Args:
        path: where to write; default ``config.KEY_FILE``.
        force: replace an existing file. Hosts holding the old key will no
            longer be admitted.

    Returns:
        The absolute path written.

    Raises:
        KeyFileError: ``path`` exists and ``force`` is false.
        OSError: the directory or file could not be written.

    .. versionadded:: 0.2
    """
    path = key_file_path(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    if not force and os.path.lexists(path):
        raise _exists_error(path)
    text = ("# futurepool cluster key: copy to every host of the cluster, mode 0600.\n"
            "# Whoever holds it can run code on all of them.\n"
            f"{secrets.token_bytes(KEY_BYTES).hex()}\n")
    temporary = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken bits away; add none
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # atomic, and fails if path exists
            except FileExistsError:
                raise _exists_error(path) from None
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
    return path


def _exists_error(path: str) -> KeyFileError:
    return KeyFileError(
        f"Key file {path} already exists; not replacing it. Pass --force to write a new key"
        " (hosts holding the old one will no longer be admitted), or --key-file for another"
        " path.", path)


def load_secret(path: str | os.PathLike | None = None) -> bytes:
    """Read the cluster secret from a key file, refusing one other users can access.

    Like ssh with a private key, a file with any group or other permission
    bit set is refused: anyone who can read it can run code on every host of
    the cluster, and anyone who can write it can substitute a key they know.
    The mode is checked on the open file (no race with a ``chmod``); symbolic
    links are followed (Kubernetes mounts secrets through them).

    Args:
        path: the key file; default ``config.KEY_FILE``.

    Returns:
        The secret, :data:`KEY_BYTES` bytes.

    Raises:
        KeyFileError: the file is missing, unreadable, not a regular file,
            too permissive (message names the path, its mode and the fix),
            or does not hold a key.
    """
    path = key_file_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(
            f"No cluster key file at {path}. Create one with `futurepool keygen` on the head"
            " and copy it to every host (mode 0600), or point --key-file /"
            " FUTUREPOOL_KEY_FILE at the copy you have.", path) from None
    except OSError as exc:
        raise KeyFileError(f"Cannot open key file {path}: {exc.strerror}.", path) from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise KeyFileError(f"Key file {path} is not a regular file.", path)
        mode = stat.S_IMODE(status.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"Key file {path} has mode {mode:04o}: users other than its owner can access"
                " it, and whoever can read it can run code on every host of the cluster."
                f" Refusing to use it. Fix: chmod 600 {path}", path, mode)
        data = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"Key file {path} is not a futurepool key: it is larger than"
                           f" {_MAX_KEY_FILE_BYTES} bytes.", path)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"Key file {path} is not a futurepool key: it is not ASCII text"
                           " (expected the file `futurepool keygen` writes).", path) from None
    return parse_secret(text, source=f"key file {path}")


def parse_secret(text: str, *, source: str = "the key") -> bytes:
    """Decode a secret: one line of 64 hexadecimal digits; ``#`` comments and blanks ignored.

    The error never repeats the text, which may be (nearly) a real key.

    Raises:
        KeyFileError: ``text`` does not hold exactly one well-formed key.
    """
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    expected = (f"expected one line of {2 * KEY_BYTES} hexadecimal digits, as"
                " `futurepool keygen` writes")
    if len(lines) != 1:
        found = "nothing" if not lines else f"{len(lines)} lines"
        raise KeyFileError(f"{source.capitalize()} is not a futurepool key: {expected};"
                           f" found {found}.")
    line = lines[0]
    if len(line) != 2 * KEY_BYTES or any(c not in "0123456789abcdefABCDEF" for c in line):
        raise KeyFileError(f"{source.capitalize()} is not a futurepool key: {expected};"
                           f" found {len(line)} characters"
                           f"{'' if line.isalnum() else ' including punctuation or spaces'}.")
    return bytes.fromhex(line)


def literal_key_warning(option: str = "--key") -> str:
    """The warning to print when a key is given on the command line.

    A command line is readable by every user of the host (``ps``,
    ``/proc/PID/cmdline``) and often lands in shell history.
    """
    return (f"futurepool: warning: a key given with {option} is visible to every user of this"
            " host (ps, /proc) and may be kept in your shell history; prefer --key-file or"
            " FUTUREPOOL_KEY_FILE with a file of mode 0600.")


# --- key derivation ----------------------------------------------------------------


def hkdf(ikm: bytes, *, salt: bytes = b"", info: bytes = b"", length: int = 32) -> bytes:
    """HKDF with HMAC-SHA256 (RFC 5869): extract a key from ``ikm``, expand it to ``length``.

    Args:
        ikm: input keying material.
        salt: optional; empty means a string of zeros of the hash length.
        info: context label; different labels give independent keys.
        length: bytes of output, at most 255 * 32.
    """
    if not 0 < length <= 255 * hashlib.sha256().digest_size:
        raise ValueError(f"length must be between 1 and 8160, got {length}")
    prk = hmac.new(salt or bytes(hashlib.sha256().digest_size), ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


class Role(enum.Enum):
    """Who holds a keypair: the head (driver) or a node (`futurepool worker`)."""

    HEAD = "head"
    NODE = "node"


class ClusterKeys(NamedTuple):
    """The CURVE keypairs of one cluster, Z85-encoded as pyzmq takes them."""

    head_public: bytes
    head_secret: bytes
    node_public: bytes
    node_secret: bytes

    def pair(self, role: Role) -> tuple[bytes, bytes]:
        """``(public, secret)`` of ``role``."""
        if role is Role.HEAD:
            return self.head_public, self.head_secret
        return self.node_public, self.node_secret

    def __repr__(self) -> str:  # never print secret keys
        return (f"ClusterKeys(head_public={self.head_public!r},"
                f" node_public={self.node_public!r}, ...)")


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
    if len(secret) != KEY_BYTES:
        raise ValueError(f"secret must be {KEY_BYTES} bytes, got {len(secret)}")


def derive_keypairs(secret: bytes) -> ClusterKeys:
    """Derive the head's and the nodes' CURVE keypairs from the cluster secret.

    Each secret key is 32 bytes of HKDF output under its own label (any 32
    bytes are a valid Curve25519 secret key: the scalar is clamped when
    used); the public key is computed from it by libzmq.

    Returns:
        ``ClusterKeys(head_public, head_secret, node_public, node_secret)``,
        each 40 bytes of Z85. The same secret always gives the same keys.
    """
    _check_secret(secret)
    check_curve()
    keys = []
    for info in (_HEAD_INFO, _NODE_INFO):
        secret_key = z85.encode(hkdf(bytes(secret), salt=_HKDF_SALT, info=info, length=32))
        keys += [zmq.curve_public(secret_key), secret_key]
    return ClusterKeys(*keys)


def load_keys(path: str | os.PathLike | None = None) -> ClusterKeys:
    """:func:`derive_keypairs` of :func:`load_secret` of ``path``."""
    return derive_keypairs(load_secret(path))


def key_fingerprint(secret: bytes) -> str:
    """A short public name for a secret (16 hex digits), to compare keys across hosts.

    It is derived under its own label, so it reveals nothing of the keys.
    """
    _check_secret(secret)
    return hkdf(bytes(secret), salt=_HKDF_SALT, info=_FINGERPRINT_INFO, length=8).hex()


# --- sockets ----------------------------------------------------------------------------


def check_curve() -> None:
    """Raise :class:`SecurityError` unless libzmq supports CURVE (then TCP is refused)."""
    if not zmq.has("curve"):
        raise SecurityError(
            f"This libzmq ({zmq.zmq_version()}) was built without CURVE security, so"
            " futurepool refuses to use TCP. Install a pyzmq wheel (they bundle libzmq with"
            " CURVE) or rebuild libzmq with libsodium.")


def _check_unused(sock: zmq.Socket) -> None:
    # libzmq copies a socket's options when it binds or connects: options set
    # afterwards would not apply to that endpoint.
    if sock.getsockopt(zmq.LAST_ENDPOINT):
        raise ValueError("configure CURVE before the socket binds or connects")


def make_curve_server(sock: zmq.Socket, keys: ClusterKeys, *, role: Role = Role.HEAD) -> bool:
    """Make ``sock`` a CURVE server with ``role``'s keypair, authenticated through ZAP.

    Call before ``bind``, with a :class:`.zap.Authenticator` bound on the
    socket's context (without one, libzmq would admit any client that knows
    the server's public key). Where libzmq supports ``ZAP_ENFORCE_DOMAIN``
    it is set, so that a missing handler refuses clients instead.

    Returns:
        Whether ``ZAP_ENFORCE_DOMAIN`` is in effect.
    """
    check_curve()
    _check_unused(sock)
    public, secret = keys.pair(role)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (AttributeError, zmq.ZMQError):  # a libzmq without the draft option
        return False
    return True


def make_curve_client(sock: zmq.Socket, keys: ClusterKeys, *, role: Role = Role.NODE,
                      server: Role = Role.HEAD) -> None:
    """Make ``sock`` a CURVE client with ``role``'s keypair, pinning ``server``'s public key.

    Call before ``connect``. A server without the matching secret key
    (a stranger, or a head with another key file) fails the handshake.
    """
    check_curve()
    _check_unused(sock)
    public, secret = keys.pair(role)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = keys.pair(server)[0]


def admitted_keys(keys: ClusterKeys, role: Role = Role.HEAD) -> list[bytes]:
    """The client keys a server of ``role`` admits: nodes by the head; nodes and head by a node."""
    return [keys.node_public] if role is Role.HEAD else [keys.node_public, keys.head_public]
