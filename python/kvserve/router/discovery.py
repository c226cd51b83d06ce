"""Where the replicas are: `--replica HOST:PORT[@REGION]`, a replicas file re-read when it
changes (one address a line, `#` comments), and DNS names re-resolved periodically (every
address of a headless Service is a replica)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class DiscoveryError(ValueError):
    """A malformed replica address; the message names where it came from."""


@dataclass(frozen=True)
class ReplicaAddress:
    target: str  # HOST:PORT, as grpc dials it
    region: str = ""


def parse_address(text: str, where: str) -> ReplicaAddress:
    """HOST:PORT[@REGION]; IPv6 hosts in brackets."""
    spec, _, region = text.strip().partition("@")
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DiscoveryError(f"{where}: {text.strip()!r} is not HOST:PORT[@REGION]")
    return ReplicaAddress(f"{host}:{port}", region.strip())


def read_replicas_file(path: Path) -> list[ReplicaAddress]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(parse_address(line, f"--replicas-file {path}:{n}"))
    return out


@dataclass
class Discovery:
    """The union of every source; `current()` is the fleet the router should talk to."""

    static: list[ReplicaAddress] = field(default_factory=list)
    replicas_file: Path | None = None
    dns: list[ReplicaAddress] = field(default_factory=list)  # target = NAME:PORT
    _from_file: list[ReplicaAddress] = field(default_factory=list)
    _file_stamp: tuple[int, int] | None = None
    _from_dns: dict[str, list[ReplicaAddress]] = field(default_factory=dict)

    def current(self) -> dict[str, ReplicaAddress]:
        out: dict[str, ReplicaAddress] = {}
        for a in [*self.static, *self._from_file, *(a for v in self._from_dns.values() for a in v)]:
            out.setdefault(a.target, a)
        return out

    def refresh_file(self) -> bool:
        """Re-read the replicas file if it changed; True when it did. A bad file is logged
        and the last good list kept, so a half-written ConfigMap never empties the fleet."""
        if self.replicas_file is None:
            return False
        try:
            st = os.stat(self.replicas_file)
        except OSError as exc:
            log.warning("--replicas-file %s: %s", self.replicas_file, exc.strerror)
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._file_stamp:
            return False
        self._file_stamp = stamp  # a bad version is logged once, not on every poll
        try:
            self._from_file = read_replicas_file(self.replicas_file)
        except (OSError, DiscoveryError) as exc:
            log.warning("%s; keeping the previous replica list", exc)
            return False
        log.info("replicas file %s: %d replicas", self.replicas_file, len(self._from_file))
        return True

    async def refresh_dns(self) -> None:
        loop = asyncio.get_running_loop()
        for name in self.dns:
            host, _, port = name.target.rpartition(":")
            try:
                infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning(
                    "DNS %s: %s; keeping %d addresses",
                    name.target,
                    exc,
                    len(self._from_dns.get(name.target, [])),
                )
                continue
            addrs = sorted({str(info[4][0]) for info in infos})
            self._from_dns[name.target] = [
                ReplicaAddress(f"[{a}]:{port}" if ":" in a else f"{a}:{port}", name.region)
                for a in addrs
            ]
