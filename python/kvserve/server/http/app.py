"""The FastAPI app: OpenAI routes plus health, metrics, load and (de)tokenize.

Generation goes through AsyncEngine.generate exactly as the gRPC servicer does: admission
and bad input surface at the first output, before anything streams; every way a request
ends (finish, disconnect, error, shutdown) passes through `_Request.close`, which aborts
it in the engine unless it finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve import __version__
from kvserve._core import AtCapacityError, RequestTooLargeError
from kvserve.server import convert
from kvserve.server.http import responses, sse
from kvserve.server.http.errors import APIError, bad_request, from_validation
from kvserve.server.http.params import (
    EngineInput,
    engine_messages,
    sampling_error,
    to_engine_input,
)
from kvserve.server.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from kvserve.server.metrics import RequestTimer, ServerMetrics
from kvserve.server.retry import RetryAfterEstimator
from kvserve.server.servicer import ServerState
from kvserve.tokenizer import Tokenizer

log = logging.getLogger("kvserve.server.http")
T = TypeVar("T")

# engine messages start with the field they blame; the body names some differently
_ENGINE_FIELDS = {"prompt_token_ids": "prompt"}


@dataclass
class HttpContext:
    """What the routes share with the gRPC server: engine, drain state, metrics, retry."""

    engine: Any
    state: ServerState
    metrics: ServerMetrics
    retry: RetryAfterEstimator
    served_model_name: str | None = None
    model_name: str = field(init=False)

    def __post_init__(self) -> None:
        self.model_name = self.served_model_name or str(self.engine.model_info.get("model", ""))

    def reject(self, err: APIError, reason: str) -> APIError:
        self.metrics.rejected.labels(reason).inc()
        return err

    async def load(self) -> dict[str, Any]:
        # the engine takes its core lock: never wait for it on the event loop
        return dict(await asyncio.to_thread(self.engine.load))

    async def at_capacity(self, exc: Exception, reason: str) -> APIError:
        # from counters read without the core lock, as on gRPC: refusals stay cheap in a burst
        ahead = self.engine.num_unfinished()
        message = str(exc) if str(exc).startswith("at capacity") else f"at capacity: {exc}"
        err = APIError(
            429, message, code=reason, headers={"Retry-After": str(self.retry.seconds(ahead))}
        )
        return self.reject(err, reason)


def engine_error(exc: Exception) -> APIError:
    text = str(exc)
    if text.startswith("SamplingParams."):
        return sampling_error(exc)
    head = text.split(":", 1)[0].split("[", 1)[0]
    param = _ENGINE_FIELDS.get(head, head) if head.isidentifier() else None
    return bad_request(text, param)


class _Request:
    """One generation's bookkeeping: live set, metrics, and its end in the engine."""

    def __init__(self, ctx: HttpContext, request_id: str) -> None:
        self.ctx, self.id = ctx, request_id
        self.timer = RequestTimer(ctx.metrics)
        self.stream: Any = None
        self.finished = self.admitted = self.closed = False
        self.reason = "cancelled"
        ctx.state.add(request_id)

    async def start(self, inp: EngineInput) -> Any:
        """The first output; admission and bad input raise here as APIErrors."""
        self.stream = self.ctx.engine.generate(
            inp.prompt,
            inp.params,
            request_id=self.id,
            prompt_token_ids=inp.prompt_token_ids,
            messages=inp.messages,
            cache_salt=inp.cache_salt,
        )
        try:
            first = await anext(self.stream)
        except AtCapacityError as exc:
            raise await self.ctx.at_capacity(exc, "at_capacity") from None
        except RequestTooLargeError as exc:
            # larger than this replica's whole KV pool: "at capacity here", as on gRPC
            raise await self.ctx.at_capacity(exc, "too_large") from None
        except ValueError as exc:  # incl. the core's InvalidRequestError
            raise self.ctx.reject(engine_error(exc), "invalid_argument") from None
        self.admitted = True
        return first

    def sent(self, out: Any) -> None:
        self.timer.tokens_sent(len(out.token_ids or ()))
        if out.finished:
            self.finished = out.finish_reason != "error"
            self.reason = out.finish_reason or "stop"

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.finished:
            self.ctx.engine.abort(self.id)  # disconnect, error, shutdown: free its blocks now
        if self.stream is not None:
            with contextlib.suppress(Exception):
                await self.stream.aclose()
        self.ctx.state.remove(self.id)
        if self.admitted:
            self.timer.done(self.reason)
            self.ctx.retry.finished()


class _EngineStream(StreamingResponse):
    """A stream whose request is closed however the response ends, even unstarted."""

    def __init__(self, body: AsyncIterator[bytes], run: _Request) -> None:
        super().__init__(body, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        self._run = run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._run.close()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; cancelled (APIError 499) as soon as the client goes away, so a
    request waiting in the queue or generating for nobody is aborted at once."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise APIError(499, "client disconnected", code="client_disconnected")
    return task.result()


def build_app(ctx: HttpContext) -> FastAPI:
    app = FastAPI(
        title="kvserve",
        version=__version__,
        description="OpenAI-compatible API of a kvserve server",
    )
    tokenizer: Tokenizer = ctx.engine.tokenizer

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return ctx.reject(from_validation(exc.errors()), "invalid_argument").response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal error; see the server log", code="internal_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    def check_serving(model: str | None) -> None:
        if ctx.state.draining:
            raise ctx.reject(APIError(503, "server is shutting down", code="draining"), "draining")
        if model is not None and model != ctx.model_name:
            raise APIError(
                404,
                f"model: {model!r} is not served here (serving {ctx.model_name!r})",
                param="model",
                code="model_not_found",
            )

    def model_card() -> dict[str, Any]:
        info = ctx.engine.model_info
        return {
            "id": ctx.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "kvserve",
            "max_model_len": int(info.get("max_model_len", 0)),
            "vocab_size": int(ctx.engine.tokenizer.vocab_size),
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        if ctx.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        check_serving(model)
        return model_card()

    @app.get("/metrics")
    async def metrics() -> Response:
        body = await asyncio.to_thread(generate_latest, ctx.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/load")
    async def load() -> dict[str, Any]:
        resp = convert.to_load(await ctx.load(), in_flight=len(ctx.state.live))
        resp.admitting = resp.admitting and not ctx.state.draining
        out: dict[str, Any] = {
            f.name: getattr(resp, f.name) for f in resp.DESCRIPTOR.fields if f.name != "metrics"
        }
        out["metrics"] = dict(resp.metrics)
        return out

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_serving(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("prompt: give exactly one of prompt or messages", "prompt")

        messages = engine_messages(body.messages) if body.messages is not None else None
        try:
            # the engine's worker threads, as for generation: the event loop stays free
            ids = await ctx.engine.tokenize(body.prompt, messages, body.add_special_tokens)
        except ValueError as exc:
            raise engine_error(exc) from None
        info = ctx.engine.model_info
        return {
            "tokens": ids,
            "count": len(ids),
            "max_model_len": int(info.get("max_model_len", 0)),
        }

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_serving(body.model)
        vocab = tokenizer.vocab_size
        for i, t in enumerate(body.tokens):
            if t >= vocab:
                raise bad_request(f"tokens[{i}]: token id {t} outside [0, {vocab})", f"tokens[{i}]")
        text = await asyncio.to_thread(tokenizer.decode, body.tokens, False)
        return {"prompt": text}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await generate(body, request, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await generate(body, request, chat=False)

    async def generate(
        body: ChatCompletionRequest | CompletionRequest, request: Request, chat: bool
    ) -> Any:
        check_serving(body.model)
        try:
            inp = to_engine_input(body)
        except APIError as err:
            raise ctx.reject(err, "invalid_argument") from None
        prefix = "chatcmpl-" if chat else "cmpl-"
        run = _Request(ctx, prefix + uuid.uuid4().hex)
        try:
            first = await _unless_disconnected(request, run.start(inp))
        except BaseException:
            await run.close()
            raise
        top_n = inp.params.logprobs or 0
        want_logprobs = inp.params.logprobs is not None
        acc = responses.Completion(run.id, ctx.model_name)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = _stream_events(
                run,
                first,
                acc,
                chat,
                want_logprobs,
                top_n,
                usage,
                body.return_token_ids,
                token_text,
            )
            return _EngineStream(events, run)
        try:
            await _unless_disconnected(request, _collect(run, first, acc))
        finally:
            await run.close()
        lp = None
        if want_logprobs:
            make = responses.chat_logprobs if chat else responses.completion_logprobs
            lp = make(acc.token_ids, acc.logprobs, top_n, token_text)
        if chat:
            return responses.chat_body(acc, lp, body.return_token_ids)
        return responses.completion_body(acc, lp, body.return_token_ids)

    return app


async def _collect(run: _Request, first: Any, acc: responses.Completion) -> None:
    """The whole answer."""
    out = first
    while True:
        run.sent(out)
        acc.add(out)
        if out.finished:
            break
        out = await anext(run.stream)
    if acc.finish_reason == "error":
        raise _generation_failed()


async def _stream_events(
    run: _Request,
    first: Any,
    acc: responses.Completion,
    chat: bool,
    want_logprobs: bool,
    top_n: int,
    include_usage: bool,
    with_ids: bool,
    token_text: responses.TokenText,
) -> AsyncIterator[bytes]:
    def delta_chunk(out: Any, offset: int) -> dict[str, Any]:
        ids = [int(t) for t in out.token_ids or ()]
        tid = ids if with_ids else None
        lp = None
        if chat:
            if want_logprobs:
                lp = responses.chat_logprobs(ids, out.logprobs or [], top_n, token_text)
            return responses.chat_chunk(acc, {"content": out.text}, None, lp, tid)
        if want_logprobs:
            lp = responses.completion_logprobs(ids, out.logprobs or [], top_n, token_text, offset)
        return responses.completion_chunk(acc, out.text, None, lp, tid)

    if chat:
        yield sse.event(responses.chat_chunk(acc, {"role": "assistant", "content": ""}))
    out, offset = first, 0
    try:
        while True:
            run.sent(out)
            acc.add(out)
            if out.finish_reason == "error":
                raise RuntimeError(out.error or "the engine failed this request")
            if out.token_ids or out.text:
                yield sse.event(delta_chunk(out, offset))
                offset += len(out.text or "")
            if out.finished:
                break
            out = await anext(run.stream)
    except Exception:  # the status line is long gone: the error travels as an event
        log.exception("request %s failed while streaming", run.id)
        yield sse.event(_generation_failed().body())
        yield sse.DONE
        return
    if chat:
        yield sse.event(responses.chat_chunk(acc, {}, acc.finish_reason))
    else:
        yield sse.event(responses.completion_chunk(acc, "", acc.finish_reason))
    if include_usage:
        yield sse.event(responses.usage_chunk(acc, chat))
    yield sse.DONE


def _generation_failed() -> APIError:
    return APIError(500, "generation failed; see the server log", code="generation_error")
