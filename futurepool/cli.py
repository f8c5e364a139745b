"""The ``futurepool`` command."""

from __future__ import annotations

import argparse
import sys

from . import __version__


class _Parser(argparse.ArgumentParser):
    """Bad usage: one line naming the problem, and exit code 2 (argparse prints two)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(
        prog="futurepool",
        description="futurepool: a drop-in ProcessPoolExecutor whose futures are values.")
    parser.add_argument("--version", action="version", version=f"futurepool {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    worker = commands.add_parser(
        "worker", help="add this host's cores to a running executor (not available yet)")
    worker.add_argument("--connect", metavar="tcp://HOST:PORT", required=True)
    keygen = commands.add_parser(
        "keygen", help="create the cluster's key file",
        description="Write a new random cluster key to a file only you can read (mode 0600)"
                    " and print its path. Copy the file to every host of the cluster; head"
                    " and workers derive their CURVE keys from it. Whoever holds it can run"
                    " code on every host.")
    keygen.add_argument(
        "--key-file", metavar="PATH",
        help="where to write the key (default: $FUTUREPOOL_KEY_FILE, else"
             " ~/.config/futurepool/cluster.key)")
    keygen.add_argument(
        "--force", action="store_true",
        help="replace an existing key file (hosts holding the old key are no longer admitted)")
    args = parser.parse_args(argv)
    if args.command == "worker":
        parser.exit(2, "futurepool worker: joining remote executors is not implemented in"
                       f" futurepool {__version__} yet; only the local pool is.\n")
    if args.command == "keygen":
        sys.exit(_keygen(args.key_file, args.force))
    parser.print_help()
    sys.exit(0 if args.command is None else 2)


def _keygen(path: str | None, force: bool) -> int:
    from .protocol.security import KeyFileError, create_key_file

    try:
        written = create_key_file(path, force=force)
    except KeyFileError as exc:
        print(f"futurepool keygen: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = exc.filename or path
        print(f"futurepool keygen: cannot write the key file {where}: {exc.strerror}.",
              file=sys.stderr)
        return 1
    print(written)
    return 0
