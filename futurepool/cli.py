"""The ``futurepool`` command."""

from __future__ import annotations

import argparse
import os
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
        "worker", help="add this host's cores to a running executor",
        description="Join the executor listening at --connect (an Executor or Pool made with"
                    " listen=, or run with FUTUREPOOL_LISTEN set) and run its tasks on this"
                    " host's cores. Long-lived: when that head goes away, wait for the next"
                    " one. The link is CurveZMQ with keys derived from the cluster's key file;"
                    " nothing is accepted from a peer without it. SIGTERM or Ctrl-C leave"
                    " gracefully. Exit codes: 0 left, 1 refused (key, versions), 2 bad usage.")
    worker.add_argument(
        "--connect", metavar="tcp://HOST:PORT", default=os.environ.get("FUTUREPOOL_CONNECT"),
        help="the head's address (env FUTUREPOOL_CONNECT)")
    worker.add_argument(
        "--key-file", metavar="PATH",
        help="the cluster's key file, as on the head (env FUTUREPOOL_KEY_FILE, default"
             " ~/.config/futurepool/cluster.key)")
    worker.add_argument(
        "--workers", type=_positive_int, metavar="N",
        default=os.environ.get("FUTUREPOOL_WORKERS"),
        help="worker processes to run (env FUTUREPOOL_WORKERS; default: this host's CPUs)")
    worker.add_argument(
        "--resources", metavar="NAME=QTY,...", default=os.environ.get("FUTUREPOOL_RESOURCES"),
        help="what this host offers to tasks that ask for resources with"
             " options(resources=...), e.g. gpu=2,mem=64GB (env FUTUREPOOL_RESOURCES). Added to"
             " what is detected (cpu: usable CPUs, mem: memory in bytes), which a name given"
             " here replaces. Quantities are numbers, or sizes with a unit (512MB, 2GiB)")
    worker.add_argument(
        "--transfer-address", metavar="HOST", default=None,
        help="where other hosts pull this host's values from: an address of this host, or"
             " 'none' (they go through the head) (env FUTUREPOOL_TRANSFER_ADDRESS; default:"
             " the address that reaches the head, port chosen by the system)")
    worker.add_argument(
        "--once", action="store_true", default=_env_flag("FUTUREPOOL_ONCE"),
        help="exit when the head goes away instead of waiting for the next (env"
             " FUTUREPOOL_ONCE=1)")
    worker.add_argument(
        "--grace", type=float, metavar="SECONDS", default=os.environ.get("FUTUREPOOL_GRACE"),
        help="on SIGTERM, how long running tasks may take to finish before they are handed"
             " back to the head (env FUTUREPOOL_GRACE; default 5)")
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
    status = commands.add_parser(
        "status", help="show a head's nodes, workers and tasks",
        description="Ask a listening head (--connect, or every head on this host) for its"
                    " nodes (host, address, workers, busy, store use), task counts, tasks done"
                    " per second (since the previous status, or since the head started) and"
                    " age."
                    " Needs the cluster's key file, as a node does.")
    status.add_argument("--connect", metavar="tcp://HOST:PORT",
                        help="the head's address (default: every head on this host)")
    status.add_argument("--key-file", metavar="PATH",
                        help="the cluster's key file (env FUTUREPOOL_KEY_FILE)")
    status.add_argument("--json", action="store_true", help="one JSON object per head")
    args = parser.parse_args(argv)
    if args.command == "status":
        from .core import status as _status

        sys.exit(_status.main(args.connect, args.key_file, args.json,
                              log=lambda line: print(line, file=sys.stderr, flush=True)))
    if args.command == "worker":
        if not args.connect or not args.connect.startswith("tcp://"):
            worker.error("--connect tcp://HOST:PORT is required (or FUTUREPOOL_CONNECT)")
        if args.resources is not None:
            from .core.resources import parse_spec

            try:
                args.resources = parse_spec(args.resources)
            except ValueError as exc:
                worker.error(str(exc))
        sys.exit(_worker(args))
    if args.command == "keygen":
        sys.exit(_keygen(args.key_file, args.force))
    parser.print_help()
    sys.exit(0 if args.command is None else 2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _worker(args) -> int:
    from .core import remote_node
    from .executor import _default_workers

    workers = int(args.workers) if args.workers else _default_workers()
    if args.transfer_address is not None:
        from . import config

        config.TRANSFER_ADDRESS = args.transfer_address
    grace = float(args.grace) if args.grace is not None else None
    return remote_node.main(args.connect, args.key_file, workers, args.once, grace,
                            log=lambda line: print(line, file=sys.stderr, flush=True),
                            resources=args.resources)


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
