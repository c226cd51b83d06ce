"""Server options (everything but the engine's) and their command-line flags."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass
from pathlib import Path

from kvserve import env

API_KEY_ENV = env.API_KEY
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9400
DEFAULT_HTTP_PORT = 8000
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class ServerConfigError(ValueError):
    """A bad server option; the message names the flag."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (logged)
    metrics_host: str | None = None  # None: same as host
    metrics_port: int = DEFAULT_METRICS_PORT  # 0: any free port, -1: no metrics endpoint
    http_port: int = DEFAULT_HTTP_PORT  # OpenAI-compatible HTTP; 0: any free port, -1: off
    served_model_name: str | None = None  # the HTTP "model" name; None: the model's own name
    api_key: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_period_s: float = 30.0
    ridge_point: float | None = None  # None: from the device name

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ServerConfigError(f"--port: must be in 0..65535, got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ServerConfigError(
                f"--metrics-port: must be in -1..65535 (-1 = off), got {self.metrics_port}"
            )
        if not -1 <= self.http_port <= 65535:
            raise ServerConfigError(
                f"--http-port: must be in -1..65535 (-1 = off), got {self.http_port}"
            )
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ServerConfigError("--served-model-name: must not be blank")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ServerConfigError("--tls-cert and --tls-key: give both or neither")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path is not None and not path.is_file():  # fail before the model loads
                raise ServerConfigError(f"{flag}: no such file: {path}")
        if self.max_message_bytes < 1024:
            raise ServerConfigError(
                f"--max-message-bytes: must be at least 1024, got {self.max_message_bytes}"
            )
        if self.grace_period_s < 0:
            raise ServerConfigError(f"--grace-period: must be >= 0, got {self.grace_period_s}")
        if self.api_key is not None and not self.api_key.strip():
            raise ServerConfigError(f"--api-key / {API_KEY_ENV}: must not be blank")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def read_tls(self) -> tuple[bytes, bytes]:
        """(private key, certificate chain) PEM bytes."""
        out = []
        for flag, path in (("--tls-key", self.tls_key), ("--tls-cert", self.tls_cert)):
            assert path is not None
            try:
                out.append(path.read_bytes())
            except OSError as exc:
                raise ServerConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from exc
        return out[0], out[1]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        return cls(
            host=args.host,
            port=args.port,
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port,
            http_port=args.http_port,
            served_model_name=args.served_model_name,
            api_key=args.api_key if args.api_key is not None else env.api_key(),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            max_message_bytes=args.max_message_bytes,
            grace_period_s=args.grace_period,
            ridge_point=args.ridge_point,
        )


def check_ports_free(cfg: ServerConfig) -> None:
    """Fail in a second, not after a model load of minutes, when a port is taken.

    A probe bind (SO_REUSEADDR, as grpc binds) then released; the real bind still checks.
    """
    probes = [("--port", cfg.host, cfg.port)]
    if cfg.http_port > 0:
        probes.append(("--http-port", cfg.host, cfg.http_port))
    if cfg.metrics_port > 0:
        probes.append(("--metrics-port", cfg.metrics_host or cfg.host, cfg.metrics_port))
    for flag, host, port in probes:
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host.strip("[]"), port))
            except OSError as exc:
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                raise OSError(f"{flag}: cannot listen on {where}: {exc.strerror}") from exc


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 or :: to widen)",
    )
    g.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"gRPC port (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    g.add_argument(
        "--http-port",
        type=int,
        default=DEFAULT_HTTP_PORT,
        help=f"OpenAI-compatible HTTP port on --host (default {DEFAULT_HTTP_PORT}; "
        "0 picks a free one; -1 turns it off)",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the model name HTTP clients send and /v1/models lists (default: the model's "
        "own name, e.g. SmolLM2-135M-Instruct.Q4_1)",
    )
    g.add_argument(
        "--metrics-host", default=None, help="address of the Prometheus endpoint (default: --host)"
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus /metrics port (default {DEFAULT_METRICS_PORT}; "
        "0 picks a free one; -1 turns it off)",
    )
    g.add_argument(
        "--api-key",
        default=None,
        help=f"require 'authorization: Bearer KEY' on every call but health "
        f"(default: ${API_KEY_ENV}; prefer the variable, argv is visible to ps)",
    )
    g.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain")
    g.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help=f"largest request or response (default {DEFAULT_MAX_MESSAGE_BYTES})",
    )
    g.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="seconds in-flight streams get to finish after SIGTERM (default 30)",
    )
    g.add_argument(
        "--ridge-point",
        type=float,
        default=None,
        help="device FLOP per byte for the metrics (default: from the GPU's name)",
    )
