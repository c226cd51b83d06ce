"""kvserve.v1 on the router: Generate goes to the replica the policy ranks first; a
replica that fails before the first token is replaced by the next (never after: no text is
ever sent twice); Tokenize and ModelInfo come from the fleet; GetLoad sums the fleet."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from kvserve.router.metrics import RouterMetrics
from kvserve.router.policy import Candidate, Router
from kvserve.router.replicas import FleetModel, Replica, ReplicaSet
from kvserve.sampling_params import SamplingParams
from kvserve.server.proto import pb
from kvserve.server.proto.decode import BadRequest

log = logging.getLogger(__name__)

# Failures before the first token that another replica may not have.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
UNKNOWN_RETRY_AFTER_S = 1
DEFAULT_MAX_TOKENS = SamplingParams().max_tokens or 0  # what a replica applies when unset
REPLICA_HEADER = "kvserve-replica"  # initial metadata of a routed Generate stream


@dataclass
class RouterState:
    draining: bool = False
    live: set[int] = field(default_factory=set)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


class _Retry(Exception):
    def __init__(self, exc: grpc.aio.AioRpcError) -> None:
        super().__init__(exc.details())
        self.exc = exc


def _retry_after(metadata: Any) -> int | None:
    for key, value in metadata or ():
        if key == "retry-after":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RouterServicer:
    def __init__(
        self,
        replicas: ReplicaSet,
        index: Any,
        router: Router,
        metrics: RouterMetrics,
        fleet: FleetModel,
        state: RouterState,
    ) -> None:
        self.replicas = replicas
        self.index = index
        self.router = router
        self.metrics = metrics
        self.fleet = fleet
        self.state = state
        self._next_call = 0
        self._next_stream = 0

    # ---- helpers --------------------------------------------------------------------------

    def _admitting(self) -> list[Replica]:
        threshold = self.replicas.upstream.kv_usage_threshold
        return [r for r in self.replicas.all() if r.admits(threshold)]

    def _reachable(self) -> list[Replica]:
        return [r for r in self.replicas.all() if r.connected and not r.refused]

    def fleet_retry_after(self) -> int:
        waits = [
            r.load.retry_after_s
            for r in self._reachable()
            if r.load is not None and r.load.retry_after_s > 0
        ]
        return max(1, math.ceil(min(waits))) if waits else UNKNOWN_RETRY_AFTER_S

    async def _at_capacity(self, context: Any, retry_after: int | None = None) -> NoReturn:
        if not self._reachable():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no replica is reachable")
        self.metrics.at_capacity.inc()
        wait = retry_after if retry_after is not None else self.fleet_retry_after()
        context.set_trailing_metadata((("retry-after", str(wait)),))
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "at capacity: no replica of the fleet can take a request now",
        )
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def _md(self) -> tuple[tuple[str, str], ...]:
        return self.replicas.upstream.metadata()

    async def _prompt_ids(
        self, request: pb.GenerateRequest, via: Replica, context: Any
    ) -> list[int]:
        which = request.WhichOneof("input")
        if which == "prompt_token_ids":
            return list(request.prompt_token_ids.ids)
        if which == "messages":
            tok = pb.TokenizeRequest(messages=request.messages)
        else:
            tok = pb.TokenizeRequest(text=request.prompt)
        start = time.perf_counter()
        try:
            resp = await via.stub.Tokenize(
                tok, timeout=self.replicas.upstream.rpc_timeout_s, metadata=self._md()
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                await context.abort(exc.code(), exc.details() or "invalid request")
            raise _Retry(exc) from exc
        self.metrics.tokenize.observe(time.perf_counter() - start)
        return list(resp.token_ids)

    # ---- kvserve.v1 -----------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest | BadRequest, context: Any) -> None:
        if isinstance(request, BadRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return
        if self.state.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "router is shutting down")
        live = self._admitting()
        if not live:
            await self._at_capacity(context)
        ticket = self._next_call
        self._next_call += 1
        self.state.live.add(ticket)
        self.state.idle.clear()
        try:
            await self._route(request, context, live)
        finally:
            self.state.live.discard(ticket)
            if not self.state.live:
                self.state.idle.set()

    async def _route(self, request: pb.GenerateRequest, context: Any, live: list[Replica]) -> None:
        block_size = self.fleet.info.block_size if self.fleet.info else 0
        # The index needs the prompt's tokens; the nearest replica tokenizes. Every policy
        # does, so the overlap metrics exist for all and they compare at equal cost.
        via = min(live, key=lambda r: r.rtt_s)
        try:
            ids = await self._prompt_ids(request, via, context)
        except _Retry as retry:
            self.metrics.retries.labels(via.name, via.region, retry.exc.code().name).inc()
            ids = []
        start = time.perf_counter()
        salt = request.cache_salt if request.HasField("cache_salt") else None
        overlaps, _ = (
            self.index.match_prompt_tiers(ids, block_size, salt)
            if ids and block_size
            else ({}, 0)
        )
        # (GPU tokens, tokens only in the host tier) of each replica's cached prefix
        cached = {n: (g * block_size, (a - g) * block_size) for n, (g, a) in overlaps.items()}
        cands = [
            Candidate(
                name=r.name,
                rtt_s=r.rtt_s,
                prefill_tokens_per_s=r.load.prefill_tokens_per_s if r.load else 0.0,
                decode_step_s=r.load.decode_step_s if r.load else 0.0,
                waiting_prompt_tokens=r.load.waiting_prompt_tokens if r.load else 0,
                pending_prompt_tokens=r.pending_prompt_tokens,
                in_flight=max(r.in_flight, r.load.in_flight if r.load else 0),
                cached_tokens=cached.get(r.name, (0, 0))[0],
                host_cached_tokens=cached.get(r.name, (0, 0))[1],
                prefix_hit_rate=r.load.prefix_hit_rate if r.load else 0.0,
                block_size=block_size,
                num_gpu_blocks=r.load.num_gpu_blocks if r.load else 0,
                num_used_gpu_blocks=r.load.num_used_gpu_blocks if r.load else 0,
                running=r.load.running if r.load else 0,
                decode_steps_left=tuple(r.decodes_left.values()),
            )
            for r in live
        ]
        ranked = self.router.rank(cands, len(ids))
        self.metrics.decision.observe(time.perf_counter() - start)
        refused_wait: list[int] = []
        last: grpc.aio.AioRpcError | None = None
        for cand in ranked:
            r = self.replicas.replicas.get(cand.name)
            if r is None or not r.admits(self.replicas.upstream.kv_usage_threshold):
                continue
            log.debug(
                "route %s -> %s (%s): predicted cached %d of %d prompt tokens",
                request.request_id or "-",
                r.name,
                r.region or "-",
                cand.cached_tokens,
                len(ids),
            )
            try:
                predicted = cand.cached_tokens + cand.host_cached_tokens
                await self._stream(r, request, context, len(ids), predicted)
                return
            except _Retry as retry:
                last = retry.exc
                self.metrics.retries.labels(r.name, r.region, last.code().name).inc()
                if last.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    wait = _retry_after(last.trailing_metadata())
                    refused_wait.append(wait if wait is not None else UNKNOWN_RETRY_AFTER_S)
                log.info(
                    "replica %s failed before the first token (%s); trying the next",
                    r.name,
                    last.code().name,
                )
        if refused_wait and last is not None and last.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            await self._at_capacity(context, min(refused_wait))
        detail = f": {last.code().name} {last.details()}" if last is not None else ""
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"no replica could serve it{detail}")

    async def _stream(
        self,
        r: Replica,
        request: pb.GenerateRequest,
        context: Any,
        prompt_tokens: int,
        predicted_cached: int,
    ) -> None:
        """Relay one upstream stream. _Retry when it fails before its first message."""
        remaining = context.time_remaining()
        call = r.stub.Generate(request, timeout=remaining, metadata=self._md())
        r.in_flight += 1
        # the queue it joins there: what it will compute, not what it will find cached
        queued = max(prompt_tokens - predicted_cached, 1)
        r.pending_prompt_tokens += queued
        ticket = self._next_stream
        self._next_stream += 1
        sampling = request.sampling
        budget = sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        pending = True
        sent = 0
        done = False
        try:
            try:
                msg = await call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() in RETRYABLE:
                    raise _Retry(exc) from exc
                wait = _retry_after(exc.trailing_metadata())
                if wait is not None:
                    context.set_trailing_metadata((("retry-after", str(wait)),))
                await context.abort(exc.code(), exc.details() or exc.code().name)
            if msg is grpc.aio.EOF:
                raise _Retry(
                    grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE, None, None, "stream ended before any message"
                    )
                )
            r.pending_prompt_tokens -= queued
            pending = False
            r.decodes_left[ticket] = budget  # decoding there now: it holds blocks and a seat
            labels = (r.name, r.region)
            # which replica serves it: for operators and tests; sent before any text
            await context.send_initial_metadata(((REPLICA_HEADER, r.name),))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.prompt_tokens.labels(*labels).inc(prompt_tokens)
            while True:
                await context.write(msg)
                sent += len(msg.token_ids)
                r.decodes_left[ticket] = max(r.decodes_left[ticket] - len(msg.token_ids), 0)
                self.metrics.tokens.labels(*labels).inc(len(msg.token_ids))
                if msg.finished:
                    r.predicted_cached_tokens += predicted_cached
                    r.reported_cached_tokens += msg.usage.cached_prompt_tokens
                    done = True
                    return
                try:
                    msg = await call.read()
                except grpc.aio.AioRpcError as exc:
                    self.metrics.cut.labels(*labels).inc()
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"stream from replica {r.name} cut after {sent} tokens: "
                        f"{exc.code().name} {exc.details() or ''}".rstrip(),
                    )
                if msg is grpc.aio.EOF:
                    self.metrics.cut.labels(*labels).inc()
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"stream from replica {r.name} ended unfinished",
                    )
        finally:
            if not done:
                call.cancel()  # client cancel or deadline: the replica frees the blocks
            r.in_flight -= 1
            r.decodes_left.pop(ticket, None)
            if pending:
                r.pending_prompt_tokens -= queued

    async def Tokenize(self, request: pb.TokenizeRequest | BadRequest, context: Any) -> Any:
        if isinstance(request, BadRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        last: grpc.aio.AioRpcError | None = None
        for r in sorted(self._reachable(), key=lambda r: r.rtt_s):
            try:
                return await r.stub.Tokenize(
                    request, timeout=context.time_remaining(), metadata=self._md()
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    await context.abort(exc.code(), exc.details() or exc.code().name)
                last = exc
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "no replica is reachable" + (f": {last.details()}" if last else ""),
        )

    async def StreamKvEvents(self, request: Any, context: Any) -> Any:
        """A router caches nothing: subscribe to the replicas themselves."""
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "a router has no KV cache; subscribe to its replicas"
        )
        yield  # pragma: no cover -- an async generator, as the stream handler must be

    async def ModelInfo(self, request: Any, context: Any) -> pb.ModelInfoResponse:
        fleet_info = self.fleet.info
        if fleet_info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no replica has answered yet")
            raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
        info = pb.ModelInfoResponse()
        info.CopyFrom(fleet_info)
        info.device = "fleet"
        return info

    async def GetLoad(self, request: Any, context: Any) -> pb.GetLoadResponse:
        """Fleet totals over connected replicas; each replica's figures in `metrics` as
        '<replica>/<field>'."""
        out = pb.GetLoadResponse(in_flight=len(self.state.live))
        threshold = self.replicas.upstream.kv_usage_threshold
        used = total = 0
        for r in self.replicas.all():
            admits = r.admits(threshold)
            out.metrics[f"{r.name}/up"] = 1.0 if r.connected and not r.refused else 0.0
            out.metrics[f"{r.name}/admitting"] = 1.0 if admits else 0.0
            out.metrics[f"{r.name}/rtt_s"] = r.rtt_s
            out.metrics[f"{r.name}/predicted_cached_tokens"] = float(r.predicted_cached_tokens)
            out.metrics[f"{r.name}/reported_cached_tokens"] = float(r.reported_cached_tokens)
            if r.name in self.index.replicas():
                out.metrics[f"{r.name}/indexed_blocks"] = float(self.index.replica_stats(r.name)[0])
            if r.load is None or not r.connected:
                continue
            load = r.load
            for name in (
                "kv_usage",
                "running",
                "waiting",
                "prefill_tokens_per_s",
                "decode_step_s",
                "waiting_prompt_tokens",
                "prefix_hit_rate",
            ):
                out.metrics[f"{r.name}/{name}"] = float(getattr(load, name))
            out.running += load.running
            out.waiting += load.waiting
            out.swapped += load.swapped
            out.tokens_last_step += load.tokens_last_step
            out.num_gpu_blocks += load.num_gpu_blocks
            out.num_used_gpu_blocks += load.num_used_gpu_blocks
            out.num_cached_gpu_blocks += load.num_cached_gpu_blocks
            out.waiting_prompt_tokens += load.waiting_prompt_tokens
            out.prefill_tokens_per_s += load.prefill_tokens_per_s
            used += load.num_used_gpu_blocks
            total += load.num_gpu_blocks
            out.admitting = out.admitting or admits
        out.kv_usage = used / total if total else 0.0
        out.admitting = out.admitting and not self.state.draining
        out.retry_after_s = float(self.fleet_retry_after())
        return out
