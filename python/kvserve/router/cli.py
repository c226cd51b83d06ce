"""The `kvserve route` subcommand."""

from __future__ import annotations

import argparse
from typing import Any

from kvserve.router.config import add_router_args


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "route",
        help="route requests over a fleet of replicas",
        description="One kvserve.v1 endpoint for a fleet of `kvserve serve` replicas: routes "
        "each request where its predicted time to first token is lowest (prefix-cache "
        "aware), fails over, and refuses at fleet capacity. Same as kvserve-router.",
    )
    add_router_args(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kvserve.router.main import run  # grpc and the router load only for `route`

    return run(args)
