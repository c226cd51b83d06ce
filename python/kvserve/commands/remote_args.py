"""The `--server` flags of `kvserve generate`, apart from the client so that parsing them
imports no grpc."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvserve.server.config import API_KEY_ENV


def add_remote_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("remote server")
    g.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=None,
        help="stream from a running kvserve server instead of loading the model",
    )
    g.add_argument("--api-key", default=None, help=f"bearer token (default: ${API_KEY_ENV})")
    g.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    g.add_argument(
        "--tls-ca", type=Path, default=None, help="PEM root certificate to trust (implies --tls)"
    )
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
