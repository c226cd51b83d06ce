"""`kvserve-router`: the fleet router binary (same as `kvserve route`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from kvserve.router.config import RouterConfig, add_router_args
from kvserve.server.config import ServerConfigError, check_ports_free


def run(args: argparse.Namespace) -> int:
    """Route until SIGTERM/SIGINT; 0 after a clean drain, 2 for a bad option."""
    try:
        cfg = RouterConfig.from_args(args)
    except (ServerConfigError, ValueError) as exc:
        print(f"kvserve route: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kvserve").setLevel(cfg.log_level)
    try:
        check_ports_free(cfg.front)
        from kvserve.router.app import serve

        return asyncio.run(serve(cfg))
    except OSError as exc:
        logging.getLogger("kvserve.router").error("%s", exc)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvserve-router",
        description="Route kvserve.v1 requests over a fleet of kvserve replicas.",
    )
    add_router_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
