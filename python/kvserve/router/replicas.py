"""One connection per replica: a poll loop (health check, GetLoad and its round trip) and
the KV event feed. The first replica to answer sets the fleet's model; one serving a
different model or block size is refused with a log line naming it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvserve.router.discovery import ReplicaAddress
from kvserve.server.proto import pb
from kvserve.server.proto.service import SERVICE_NAME, KvServeStub

log = logging.getLogger(__name__)

RTT_ALPHA = 0.3


@dataclass(frozen=True)
class UpstreamConfig:
    """How the router talks to replicas."""

    api_key: str | None = None
    tls_ca: bytes | None = None  # PEM roots; None: plaintext
    tls_server_name: str | None = None  # override the name checked in the certificate
    poll_interval_s: float = 0.5
    rpc_timeout_s: float = 2.0
    kv_usage_threshold: float = 0.95

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def channel(self, target: str) -> grpc.aio.Channel:
        opts: list[tuple[str, object]] = [("grpc.max_receive_message_length", 64 << 20)]
        if self.tls_ca is None:
            return grpc.aio.insecure_channel(target, options=opts)
        if self.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls_server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=self.tls_ca)
        return grpc.aio.secure_channel(target, creds, options=opts)


@dataclass
class FleetModel:
    """What every replica must serve, taken from the first one that answers."""

    info: pb.ModelInfoResponse | None = None

    def check(self, name: str, info: pb.ModelInfoResponse) -> str | None:
        """None when `info` fits the fleet (adopting it if first), else why not."""
        if self.info is None:
            self.info = info
            log.info(
                "fleet model %r, block size %d (from replica %s)", info.model, info.block_size, name
            )
            return None
        if info.model != self.info.model:
            return f"model {info.model!r} != fleet model {self.info.model!r}"
        if info.block_size != self.info.block_size:
            return f"block size {info.block_size} != fleet block size {self.info.block_size}"
        if info.vocab_size != self.info.vocab_size:
            return f"vocab size {info.vocab_size} != fleet vocab size {self.info.vocab_size}"
        return None


@dataclass
class Replica:
    address: ReplicaAddress
    channel: grpc.aio.Channel
    stub: KvServeStub
    health: health_pb2_grpc.HealthStub
    connected: bool = False  # answered its last poll and its event stream is open
    serving: bool = False  # health SERVING (not draining)
    refused: str = ""  # why the router will not use it (model mismatch)
    down_reason: str = ""  # the last failure, logged once
    load: pb.GetLoadResponse | None = None
    rtt_s: float = 0.0
    instance_id: str = ""
    in_flight: int = 0  # streams this router has open to it
    pending_prompt_tokens: int = 0  # of those with no token back yet, tokens to compute
    decodes_left: dict[int, int] = field(default_factory=dict)  # per open stream: max tokens left
    # over finished streams: cached prompt tokens the index predicted, and the replica reported
    predicted_cached_tokens: int = 0
    reported_cached_tokens: int = 0
    poll_task: asyncio.Task[None] | None = None
    feed_task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.address.target

    @property
    def region(self) -> str:
        return self.address.region

    def admits(self, kv_usage_threshold: float) -> bool:
        load = self.load
        return (
            self.connected
            and self.serving
            and not self.refused
            and load is not None
            and load.admitting
            and load.kv_usage <= kv_usage_threshold
        )


class ReplicaSet:
    """The replicas the router knows, by target. `on_down(replica)` runs when one stops
    answering or its stream drops (the index forgets it at once)."""

    def __init__(
        self,
        upstream: UpstreamConfig,
        fleet: FleetModel,
        feed: Callable[[Replica], asyncio.Task[None]],
        on_down: Callable[[Replica], None],
    ) -> None:
        self.upstream = upstream
        self.fleet = fleet
        self.replicas: dict[str, Replica] = {}
        self._feed = feed
        self._on_down = on_down

    def sync(self, wanted: dict[str, ReplicaAddress]) -> None:
        for name in [n for n in self.replicas if n not in wanted]:
            self._drop(name)
        for name, addr in wanted.items():
            if name not in self.replicas:
                self._add(addr)

    def _add(self, addr: ReplicaAddress) -> None:
        channel = self.upstream.channel(addr.target)
        r = Replica(addr, channel, KvServeStub(channel), health_pb2_grpc.HealthStub(channel))
        self.replicas[r.name] = r
        r.poll_task = asyncio.ensure_future(self._poll(r))
        log.info("replica %s%s added", r.name, f" ({r.region})" if r.region else "")

    def _drop(self, name: str) -> None:
        r = self.replicas.pop(name)
        if r.poll_task is not None:
            r.poll_task.cancel()
        self.mark_down(r, "removed from the fleet")
        asyncio.ensure_future(r.channel.close())

    def mark_down(self, r: Replica, why: str) -> None:
        if r.connected or why != r.down_reason:
            log.warning("replica %s down: %s", r.name, why)
        r.down_reason = why
        r.connected = False
        self._on_down(r)
        feed = r.feed_task
        if feed is not None and not feed.done() and feed is not asyncio.current_task():
            feed.cancel()

    async def close(self) -> None:
        for name in list(self.replicas):
            self._drop(name)
        await asyncio.sleep(0)

    def all(self) -> Sequence[Replica]:
        return list(self.replicas.values())

    async def _poll(self, r: Replica) -> None:
        md = self.upstream.metadata()
        timeout = self.upstream.rpc_timeout_s
        while True:
            try:
                if r.load is None or r.refused:
                    info = await r.stub.ModelInfo(
                        pb.ModelInfoRequest(), timeout=timeout, metadata=md
                    )
                    why = self.fleet.check(r.name, info)
                    if why is not None:
                        if not r.refused:
                            log.error("refusing replica %s: %s", r.name, why)
                        r.refused = why
                        await asyncio.sleep(self.upstream.poll_interval_s * 4)
                        continue
                    r.refused = ""
                h = await r.health.Check(  # type: ignore[attr-defined]  # stubs lack aio
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout
                )
                start = time.monotonic()
                load = await r.stub.GetLoad(pb.GetLoadRequest(), timeout=timeout, metadata=md)
                rtt = time.monotonic() - start
                r.rtt_s = rtt if r.rtt_s == 0 else (1 - RTT_ALPHA) * r.rtt_s + RTT_ALPHA * rtt
                r.serving = h.status == health_pb2.HealthCheckResponse.SERVING
                r.load = load
                if load.instance_id != r.instance_id and r.instance_id:
                    log.info("replica %s restarted (instance %s)", r.name, load.instance_id)
                    self.mark_down(r, "new instance")
                r.instance_id = load.instance_id
                r.down_reason = ""
                if r.feed_task is None or r.feed_task.done():
                    r.feed_task = self._feed(r)
            except grpc.aio.AioRpcError as exc:
                r.serving = False
                self.mark_down(r, f"{exc.code().name}: {exc.details()}")
            except Exception:  # a bug here must not silently stop polling this replica
                log.exception("replica %s: poll failed", r.name)
                r.serving = False
                self.mark_down(r, "poll failed")
            await asyncio.sleep(self.upstream.poll_interval_s)
