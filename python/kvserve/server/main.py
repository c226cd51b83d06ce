"""`kvserve-server`: the server binary, gRPC and HTTP (same as `kvserve serve`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from kvserve.engine_args import EngineArgs
from kvserve.server.config import (
    ServerConfig,
    ServerConfigError,
    add_server_args,
    check_ports_free,
)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser)
    add_server_args(parser)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean drain, 2 for a bad option."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = ServerConfig.from_args(args)
        engine_args = EngineArgs.from_cli_args(args)
    except (ServerConfigError, ValueError) as exc:
        print(f"kvserve serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        check_ports_free(cfg)
        from kvserve.server.app import serve  # grpc + the engine: only when serving

        return asyncio.run(serve(engine_args, cfg))
    except (OSError, ValueError) as exc:  # bad model path, port in use, unreadable TLS files
        logging.getLogger("kvserve.server").error("%s", exc)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvserve-server",
        description="Serve a model over gRPC (kvserve.v1) and the OpenAI HTTP API.",
    )
    add_serve_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
