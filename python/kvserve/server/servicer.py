"""The kvserve.v1.KvServe service on top of the AsyncEngine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from kvserve import __version__
from kvserve.errors import AtCapacityError, RequestTooLargeError
from kvserve.sampling import SamplingParams
from kvserve.server import convert
from kvserve.server.kv_events import KvEventHub
from kvserve.server.load_stats import LoadStats
from kvserve.server.metrics import RequestTimer, ServerMetrics
from kvserve.server.proto import pb
from kvserve.server.proto.decode import BadRequest
from kvserve.server.retry import RetryAfterEstimator

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """Streams in flight and whether the server is draining for shutdown."""

    draining: bool = False
    live: set[str] = field(default_factory=set)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def add(self, request_id: str) -> None:
        self.live.add(request_id)
        self.idle.clear()

    def remove(self, request_id: str) -> None:
        self.live.discard(request_id)
        if not self.live:
            self.idle.set()


class KvServeServicer:
    def __init__(
        self,
        engine: Any,
        metrics: ServerMetrics,
        state: ServerState,
        retry: RetryAfterEstimator,
        device: str = "",
        kv_events: KvEventHub | None = None,
        load_stats: LoadStats | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.state = state
        self.retry = retry
        self.device = device
        self.kv_events = kv_events
        self.load_stats = load_stats or LoadStats()

    async def _reject(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        code: grpc.StatusCode,
        message: str,
        reason: str,
    ) -> NoReturn:
        self.metrics.rejected.labels(reason).inc()
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    async def _load(self) -> dict[str, Any]:
        # the engine takes its core lock: never wait for it on the event loop
        return await asyncio.to_thread(self.engine.load)

    async def _at_capacity(
        self, context: grpc.aio.ServicerContext[Any, Any], exc: Exception, reason: str
    ) -> NoReturn:
        # from counters read without the core lock: a refusal under a burst must stay cheap
        ahead = self.engine.num_unfinished()
        context.set_trailing_metadata((("retry-after", str(self.retry.seconds(ahead))),))
        message = str(exc) if str(exc).startswith("at capacity") else f"at capacity: {exc}"
        await self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason)

    async def Generate(self, request: pb.GenerateRequest | BadRequest, context: Any) -> None:
        INVALID = grpc.StatusCode.INVALID_ARGUMENT
        if isinstance(request, BadRequest):
            await self._reject(context, INVALID, request.message, "invalid_argument")
        if self.state.draining:
            await self._reject(
                context, grpc.StatusCode.UNAVAILABLE, "server is shutting down", "draining"
            )
        try:
            req = convert.to_engine_request(request)
        except ValueError as exc:
            await self._reject(context, INVALID, str(exc), "invalid_argument")
        try:
            params = SamplingParams(**req.sampling)
        except (ValueError, TypeError) as exc:
            await self._reject(context, INVALID, convert.sampling_error(exc), "invalid_argument")
        if req.request_id in self.state.live:
            await self._reject(
                context,
                grpc.StatusCode.ALREADY_EXISTS,
                f"request_id: {req.request_id!r} is already in flight",
                "already_exists",
            )

        rid = req.request_id
        self.state.add(rid)
        timer = RequestTimer(self.metrics)
        stream = self.engine.generate(
            req.prompt,
            params,
            request_id=rid,
            prompt_token_ids=req.prompt_token_ids,
            messages=req.messages,
            cache_salt=req.cache_salt,
        )
        finished, reason, admitted = False, "cancelled", False
        try:
            try:
                out = await anext(stream)
            except AtCapacityError as exc:
                await self._at_capacity(context, exc, "at_capacity")
            except RequestTooLargeError as exc:
                # Larger than this replica's whole KV pool: for a router that is "at
                # capacity here" (another replica may be larger), not a bad request.
                await self._at_capacity(context, exc, "too_large")
            except ValueError as exc:  # incl. the core's InvalidRequestError
                message = convert.sampling_error(exc)
                await self._reject(context, INVALID, message, "invalid_argument")
            admitted = True
            while True:
                if out.finish_reason == "error":
                    # the engine failed this request (others go on): after what was streamed
                    reason = "error"
                    await context.abort(
                        grpc.StatusCode.INTERNAL, f"generation failed: {out.error or 'unknown'}"
                    )
                await context.write(convert.to_response(out))
                timer.tokens_sent(len(out.token_ids or ()))
                if out.finished:
                    finished, reason = True, out.finish_reason or "stop"
                    break
                try:
                    out = await anext(stream)
                except StopAsyncIteration:
                    raise RuntimeError("engine stream ended without a final output") from None
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            reason = "error"
            log.exception("request %s failed", rid)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        finally:
            if admitted and not finished:
                # cancel, disconnect, deadline, error: free its KV blocks now (a refused or
                # not yet queued request holds none; the engine aborts one queued late)
                self.engine.abort(rid)
            with contextlib.suppress(Exception):
                await stream.aclose()
            self.state.remove(rid)
            if admitted:
                timer.done(reason)
                self.retry.finished()

    async def Tokenize(self, request: pb.TokenizeRequest | BadRequest, context: Any) -> Any:
        INVALID = grpc.StatusCode.INVALID_ARGUMENT
        if isinstance(request, BadRequest):
            await self._reject(context, INVALID, request.message, "invalid_argument")
        try:
            text, messages = convert.tokenize_input(request)
            add_special = (
                request.add_special_tokens if request.HasField("add_special_tokens") else None
            )
            ids = await self.engine.tokenize(text, messages, add_special)
        except ValueError as exc:
            await self._reject(context, INVALID, str(exc), "invalid_argument")
        return pb.TokenizeResponse(token_ids=ids)

    async def ModelInfo(self, request: Any, context: Any) -> pb.ModelInfoResponse:
        if isinstance(request, BadRequest):  # bytes that are no message; unknown fields are fine
            await self._reject(
                context, grpc.StatusCode.INVALID_ARGUMENT, request.message, "invalid_argument"
            )
        info = self.engine.model_info
        vocab = info.get("vocab_size") or self.engine.tokenizer.vocab_size
        return pb.ModelInfoResponse(
            model=str(info.get("model", "")),
            max_model_len=int(info.get("max_model_len", 0)),
            block_size=int(info.get("block_size", 0)),
            dtype=str(info.get("dtype", "")),
            device=str(info.get("device") or self.device),
            vocab_size=int(vocab),
            kvserve_version=__version__,
            kv_cache_dtype=str(info.get("kv_cache_dtype", "")),
            kv_bytes_per_token=int(info.get("kv_bytes_per_token", 0)),
        )

    async def GetLoad(self, request: Any, context: Any) -> pb.GetLoadResponse:
        if isinstance(request, BadRequest):
            await self._reject(
                context, grpc.StatusCode.INVALID_ARGUMENT, request.message, "invalid_argument"
            )
        load = await self._load()
        resp = convert.to_load(load, in_flight=len(self.state.live))
        resp.admitting = resp.admitting and not self.state.draining
        resp.prefill_tokens_per_s, resp.decode_step_s = self.load_stats.snapshot()
        resp.waiting_prompt_tokens = int(load.get("waiting_prompt_tokens", 0))
        ahead = int(load.get("waiting", 0)) + int(load.get("running", 0))
        resp.retry_after_s = float(self.retry.seconds(ahead))
        if self.kv_events is not None:
            resp.instance_id = self.kv_events.instance_id
        return resp

    async def StreamKvEvents(self, request: Any, context: Any) -> Any:
        """The prefix cache's block hashes: a snapshot, then live events (see kv_events)."""
        if self.kv_events is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server has no KV events")
            return
        async for message in self.kv_events.subscribe():
            yield message
