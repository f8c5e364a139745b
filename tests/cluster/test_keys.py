"""Key files, key derivation (HKDF, RFC 5869), CURVE socket options and `futurepool keygen`."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys

import pytest
import zmq

from futurepool import cli, config
from futurepool.protocol import security
from futurepool.protocol.security import KeyFileError

from .conftest import TIMEOUT


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- key files -----------------------------------------------------------------------


def test_created_key_file_is_private_and_loads(tmp_path):
    path = tmp_path / "new" / "dir" / "cluster.key"
    written = security.create_key_file(path)
    assert written == str(path)
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    secret = security.load_secret(path)
    assert len(secret) == security.KEY_BYTES
    assert secret.hex() in path.read_text()
    assert security.load_secret(security.create_key_file(tmp_path / "b.key")) != secret


def test_umask_cannot_widen_the_mode(tmp_path):
    old = os.umask(0)
    try:
        path = security.create_key_file(tmp_path / "k")
    finally:
        os.umask(old)
    assert mode_of(path) == 0o600


def test_existing_key_file_is_not_replaced_without_force(key_file, tmp_path):
    before = security.load_secret(key_file)
    with pytest.raises(KeyFileError, match="already exists.*--force") as caught:
        security.create_key_file(key_file)
    assert caught.value.path == key_file
    assert security.load_secret(key_file) == before
    security.create_key_file(key_file, force=True)
    assert security.load_secret(key_file) != before
    assert mode_of(key_file) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["cluster.key"], "a temporary file was left"


def test_default_path_comes_from_config(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "KEY_FILE", str(tmp_path / "from-config.key"))
    assert security.create_key_file() == str(tmp_path / "from-config.key")
    assert len(security.load_secret()) == 32
    assert security.key_file_path() == str(tmp_path / "from-config.key")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602, 0o620, 0o666, 0o710],
                         ids=oct)
def test_key_file_other_users_can_access_is_refused(key_file, mode):
    os.chmod(key_file, mode)
    with pytest.raises(KeyFileError) as caught:
        security.load_secret(key_file)
    message = str(caught.value)
    assert key_file in message
    assert f"mode {mode:04o}" in message
    assert f"chmod 600 {key_file}" in message
    assert caught.value.mode == mode
    assert caught.value.path == key_file


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700], ids=oct)
def test_owner_only_modes_are_accepted(key_file, mode):
    os.chmod(key_file, mode)
    assert len(security.load_secret(key_file)) == 32


def test_symbolic_link_to_a_private_file_is_followed(key_file, tmp_path):
    # Kubernetes mounts secrets through symbolic links (whose own mode is 0777).
    link = tmp_path / "link.key"
    link.symlink_to(key_file)
    assert security.load_secret(link) == security.load_secret(key_file)


def test_missing_key_file_says_how_to_make_one(tmp_path):
    path = tmp_path / "absent.key"
    with pytest.raises(KeyFileError, match="futurepool keygen") as caught:
        security.load_secret(path)
    assert str(path) in str(caught.value)


def test_directory_and_fifo_are_not_key_files(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        security.load_secret(folder)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):  # and does not block
        security.load_secret(fifo)


def write_private(path, data: bytes) -> str:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return str(path)


@pytest.mark.parametrize("content", [
    b"",
    b"# only a comment\n\n",
    b"ab" * 31 + b"a\n",  # 63 digits
    b"ab" * 33 + b"\n",  # 66 digits
    b"zz" * 32 + b"\n",  # not hexadecimal
    b"ab" * 32 + b"\n" + b"cd" * 32 + b"\n",  # two keys
    bytes(range(256)),  # binary
    b"a" * 5000,  # too large
], ids=["empty", "comment", "short", "long", "not-hex", "two-keys", "binary", "huge"])
def test_malformed_key_file_is_refused_without_echoing_it(tmp_path, content):
    path = write_private(tmp_path / "bad.key", content)
    with pytest.raises(KeyFileError, match="is not a futurepool key") as caught:
        security.load_secret(path)
    assert path in str(caught.value)
    for line in content.splitlines():
        if len(line) > 8:
            assert line.decode("latin-1") not in str(caught.value)


def test_key_text_may_have_comments_blanks_and_capitals(tmp_path):
    secret = bytes(range(100, 132))
    path = write_private(tmp_path / "k", b"\n# made by hand\n\n  " + secret.hex().upper().encode()
                         + b"  \n\n")
    assert security.load_secret(path) == secret
    assert security.parse_secret(secret.hex()) == secret


def test_literal_key_warning_names_the_risk_and_the_alternative():
    text = security.literal_key_warning()
    assert "--key" in text and "ps" in text and "--key-file" in text


def test_key_file_error_pickles_with_its_attributes():
    error = KeyFileError("too open", "/k", 0o644)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path, copy.mode) == ("too open", "/k", 0o644)
    assert isinstance(copy, security.SecurityError)


# --- HKDF and derived keys ---------------------------------------------------------------

# RFC 5869, Appendix A, test cases 1-3 (HMAC-SHA256).
RFC5869 = [
    (bytes([0x0B] * 22), bytes(range(0x0D)), bytes(range(0xF0, 0xFA)), 42,
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    (bytes(range(0x50)), bytes(range(0x60, 0xB0)), bytes(range(0xB0, 0x100)), 82,
     "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
     "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
     "cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    (bytes([0x0B] * 22), b"", b"", 42,
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
]


@pytest.mark.parametrize("ikm, salt, info, length, okm", RFC5869, ids=["tc1", "tc2", "tc3"])
def test_hkdf_matches_rfc5869(ikm, salt, info, length, okm):
    assert security.hkdf(ikm, salt=salt, info=info, length=length).hex() == okm


@pytest.mark.parametrize("length", [0, 255 * 32 + 1])
def test_hkdf_length_is_bounded(length):
    with pytest.raises(ValueError, match="length"):
        security.hkdf(b"x", length=length)


def test_derived_keys_are_valid_deterministic_curve_keys(secret):
    keys = security.derive_keypairs(secret)
    assert keys == security.derive_keypairs(bytes(secret))
    assert len(set(keys)) == 4
    for public, private in (keys.pair(security.Role.HEAD), keys.pair(security.Role.NODE)):
        assert len(public) == len(private) == 40
        assert zmq.curve_public(private) == public
    other = security.derive_keypairs(bytes(31) + b"\x01")
    assert not set(other) & set(keys)


def test_derived_keys_hide_secrets_in_repr(keys):
    text = repr(keys)
    assert keys.head_public.decode() in text or repr(keys.head_public) in text
    assert repr(keys.head_secret) not in text and repr(keys.node_secret) not in text


@pytest.mark.parametrize("bad, error", [("a" * 32, TypeError), (b"short", ValueError),
                                        (bytes(33), ValueError)])
def test_derive_rejects_a_bad_secret(bad, error):
    with pytest.raises(error, match="secret must be"):
        security.derive_keypairs(bad)


def test_fingerprint_is_short_stable_and_not_a_key(secret, keys):
    fingerprint = security.key_fingerprint(secret)
    assert fingerprint == security.key_fingerprint(secret)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert fingerprint != security.key_fingerprint(bytes(32))
    assert fingerprint not in secret.hex()


def test_load_keys_is_derive_of_load_secret(key_file):
    assert security.load_keys(key_file) == security.derive_keypairs(security.load_secret(key_file))


# --- socket options -----------------------------------------------------------------------


def test_curve_options_must_be_set_before_bind_or_connect(context, keys):
    server = context.socket(zmq.ROUTER)
    client = context.socket(zmq.DEALER)
    try:
        server.bind("tcp://127.0.0.1:*")
        with pytest.raises(ValueError, match="before the socket binds"):
            security.make_curve_server(server, keys)
        client.connect("tcp://127.0.0.1:9")  # nothing is sent: no handshake without a peer
        with pytest.raises(ValueError, match="before the socket binds"):
            security.make_curve_client(client, keys)
    finally:
        server.close(0)
        client.close(0)


def test_server_and_client_options(context, keys):
    server = context.socket(zmq.ROUTER)
    client = context.socket(zmq.DEALER)
    try:
        security.make_curve_server(server, keys)
        security.make_curve_client(client, keys)
        # (libzmq cannot hand the keys back through pyzmq's getsockopt; the
        # handshake tests check that they are the right ones.)
        assert server.curve_server and not client.curve_server
        assert server.zap_domain == security.ZAP_DOMAIN
    finally:
        server.close(0)
        client.close(0)


def test_admitted_keys_per_role(keys):
    assert security.admitted_keys(keys) == [keys.node_public]
    assert set(security.admitted_keys(keys, security.Role.NODE)) == {keys.node_public,
                                                                      keys.head_public}


# --- futurepool keygen ----------------------------------------------------------------------


def keygen(*args: str) -> int:
    with pytest.raises(SystemExit) as caught:
        cli.main(["keygen", *args])
    return caught.value.code


def test_keygen_writes_a_private_key_and_prints_its_path(tmp_path, capsys):
    path = tmp_path / "cfg" / "cluster.key"
    assert keygen("--key-file", str(path)) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}\n" and err == ""
    assert mode_of(path) == 0o600
    assert len(security.load_secret(path)) == 32


def test_keygen_refuses_to_overwrite_without_force(key_file, capsys):
    before = security.load_secret(key_file)
    assert keygen("--key-file", key_file) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert key_file in err and "--force" in err
    assert security.load_secret(key_file) == before
    assert keygen("--key-file", key_file, "--force") == 0
    assert security.load_secret(key_file) != before


@pytest.mark.parametrize("args", [["--bogus"], ["--key-file"], ["--force=yes"]])
def test_keygen_bad_usage_is_one_line_and_exit_2(args, capsys):
    assert keygen(*args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "error" in err


def test_keygen_reports_an_unwritable_place_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert keygen("--key-file", str(blocker / "sub" / "k")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the key file" in err


def test_keygen_command_honours_futurepool_key_file(tmp_path):
    # A real process: the variable is read when futurepool.config is imported.
    path = tmp_path / "env" / "cluster.key"
    done = subprocess.run(
        [sys.executable, "-m", "futurepool", "keygen"], capture_output=True, text=True,
        env={**os.environ, "FUTUREPOOL_KEY_FILE": str(path)}, timeout=TIMEOUT)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{path}\n", "")
    assert mode_of(path) == 0o600
