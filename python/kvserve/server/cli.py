"""The `kvserve serve` subcommand."""

from __future__ import annotations

import argparse
from typing import Any

from kvserve.server.main import add_serve_args, run


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve a model over gRPC and the OpenAI HTTP API",
        description="Serve a model over gRPC (kvserve.v1 + health + reflection) and the "
        "OpenAI-compatible HTTP API, with Prometheus metrics. Same as the kvserve-server "
        "command.",
    )
    add_serve_args(parser)
    parser.set_defaults(func=run)
