"""The `kvserve` command. Each subcommand registers itself from its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from kvserve import __version__

# module path -> the subcommand it registers; a module that is absent is skipped.
SUBCOMMANDS = (
    "kvserve.commands.generate",
    "kvserve.server.cli",
    "kvserve.router.cli",
    "kvserve.bench.cli",
    "kvserve.sim.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvserve", description="kvserve: LLM inference with a paged KV-cache core"
    )
    parser.add_argument("--version", action="version", version=f"kvserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that part of kvserve is not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
