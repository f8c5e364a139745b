"""The ``futurepool`` command."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="futurepool",
        description="futurepool: a drop-in ProcessPoolExecutor whose futures are values.")
    parser.add_argument("--version", action="version", version=f"futurepool {__version__}")
    commands = parser.add_subparsers(dest="command")
    worker = commands.add_parser(
        "worker", help="add this host's cores to a running executor (not available yet)")
    worker.add_argument("--connect", metavar="tcp://HOST:PORT", required=True)
    args = parser.parse_args(argv)
    if args.command == "worker":
        parser.exit(2, "futurepool worker: joining remote executors is not implemented in"
                       f" futurepool {__version__} yet; only the local pool is.\n")
    parser.print_help()
    sys.exit(0 if args.command is None else 2)
