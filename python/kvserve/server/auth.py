"""Bearer-token auth: every call but the health service needs `authorization: Bearer KEY`.

Health stays open so load balancers and probers need no secret; reflection and the
kvserve.v1 methods are behind the key.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _denied(on_reject: Callable[[], None]) -> Callable[..., Awaitable[Any]]:
    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        on_reject()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    return deny


def _denied_stream(on_reject: Callable[[], None]) -> Callable[..., Any]:
    deny = _denied(on_reject)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await deny(request, context)

    return deny_stream


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str, on_reject: Callable[[], None] = lambda: None) -> None:
        if not api_key:
            raise ValueError("api_key: must not be empty")
        self._expected = f"Bearer {api_key}".encode()
        self._on_reject = on_reject

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                # constant time: the comparison must not leak how much of the key matched
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method or ""
        if method.startswith(OPEN_PREFIXES) or self._authorized(handler_call_details):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: let grpc answer UNIMPLEMENTED
        # same arity as the real handler so the client sees a clean status, not a protocol error
        kinds = (handler.request_streaming, handler.response_streaming)
        deny = _denied(self._on_reject)
        if kinds == (False, False):
            return grpc.unary_unary_rpc_method_handler(deny)
        if kinds == (False, True):
            return grpc.unary_stream_rpc_method_handler(_denied_stream(self._on_reject))
        if kinds == (True, False):
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.stream_stream_rpc_method_handler(_denied_stream(self._on_reject))
