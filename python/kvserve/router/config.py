"""`kvserve route` options: the front (the same flags as `kvserve serve`), the replicas and
how to reach them, and the policy."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvserve.router.discovery import DiscoveryError, ReplicaAddress, parse_address
from kvserve.router.policy import POLICIES
from kvserve.server.config import ServerConfig, ServerConfigError, add_server_args

if TYPE_CHECKING:  # replicas imports grpc: `kvserve generate` builds this parser without it
    from kvserve.router.replicas import UpstreamConfig

REPLICA_API_KEY_ENV = "KVSERVE_REPLICA_API_KEY"


@dataclass(frozen=True)
class RouterConfig:
    front: ServerConfig
    upstream: UpstreamConfig
    replicas: tuple[ReplicaAddress, ...] = ()
    replicas_file: Path | None = None
    dns: tuple[ReplicaAddress, ...] = ()
    dns_interval_s: float = 10.0
    policy: str = "kv"
    seed: int = 0
    log_level: str = "INFO"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RouterConfig:
        try:
            replicas = tuple(parse_address(a, "--replica") for a in args.replica or ())
            dns = tuple(parse_address(a, "--replicas-dns") for a in args.replicas_dns or ())
        except DiscoveryError as exc:
            raise ServerConfigError(str(exc)) from exc
        if not (replicas or dns or args.replicas_file):
            raise ServerConfigError(
                "--replica, --replicas-file or --replicas-dns: name at least one replica"
            )
        if args.replicas_file is not None and not args.replicas_file.is_file():
            raise ServerConfigError(f"--replicas-file: no such file: {args.replicas_file}")
        if not 0.0 < args.kv_usage_threshold <= 1.0:
            raise ServerConfigError(
                f"--kv-usage-threshold: must be in (0, 1], got {args.kv_usage_threshold}"
            )
        if args.poll_interval <= 0:
            raise ServerConfigError(f"--poll-interval: must be > 0, got {args.poll_interval}")
        ca = None
        if args.replica_tls_ca is not None:
            try:
                ca = args.replica_tls_ca.read_bytes()
            except OSError as exc:
                raise ServerConfigError(
                    f"--replica-tls-ca: cannot read {args.replica_tls_ca}: {exc.strerror}"
                ) from exc
        key = args.replica_api_key or os.environ.get(REPLICA_API_KEY_ENV)
        from kvserve.router.replicas import UpstreamConfig

        upstream = UpstreamConfig(
            api_key=key,
            tls_ca=ca,
            tls_server_name=args.replica_tls_server_name,
            poll_interval_s=args.poll_interval,
            kv_usage_threshold=args.kv_usage_threshold,
        )
        return cls(
            front=ServerConfig.from_args(args),
            upstream=upstream,
            replicas=replicas,
            replicas_file=args.replicas_file,
            dns=dns,
            dns_interval_s=args.dns_interval,
            policy=args.policy,
            seed=args.seed,
            log_level=args.log_level.upper(),
        )


def add_router_args(parser: argparse.ArgumentParser) -> None:
    add_server_args(parser)
    g = parser.add_argument_group("replicas")
    g.add_argument(
        "--replica",
        action="append",
        metavar="HOST:PORT[@REGION]",
        help="a replica (repeatable); REGION is a label for metrics",
    )
    g.add_argument(
        "--replicas-file",
        type=Path,
        default=None,
        help="file of HOST:PORT[@REGION] lines, re-read when it changes",
    )
    g.add_argument(
        "--replicas-dns",
        action="append",
        metavar="NAME:PORT[@REGION]",
        help="a DNS name whose addresses are all replicas, re-resolved periodically",
    )
    g.add_argument(
        "--dns-interval",
        type=float,
        default=10.0,
        help="seconds between DNS resolutions (default 10)",
    )
    g.add_argument(
        "--poll-interval",
        type=float,
        default=0.5,
        help="seconds between health/load polls of each replica (default 0.5)",
    )
    g.add_argument(
        "--replica-api-key",
        default=None,
        help=f"bearer key for the replicas (default: ${REPLICA_API_KEY_ENV})",
    )
    g.add_argument(
        "--replica-tls-ca",
        type=Path,
        default=None,
        help="PEM roots to verify replicas by (TLS towards replicas)",
    )
    g.add_argument(
        "--replica-tls-server-name",
        default=None,
        help="name to check in the replicas' certificates (default: the host)",
    )
    p = parser.add_argument_group("routing")
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="kv",
        help="kv (default: lowest predicted time to first token), round-robin, "
        "least-load or random",
    )
    p.add_argument(
        "--kv-usage-threshold",
        type=float,
        default=0.95,
        help="replicas whose KV use is above this get no new requests (default 0.95)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    p.add_argument(
        "--log-level", default="info", help="info (default), or debug to log every routing decision"
    )
