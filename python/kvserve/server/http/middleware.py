"""ASGI middleware run before any route: the bearer key, then the body size limit.

Both answer before the body is parsed: a wrong key before a byte of it is read, an
oversized body as soon as the declared length or the bytes read pass the limit.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from kvserve.server.http.errors import APIError

Scope = dict[str, Any]
ASGIApp = Callable[..., Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
OPEN_PATHS = ("/health",)  # load balancers and probers need no secret


async def _send_error(send: Callable[..., Any], err: APIError) -> None:
    resp = err.response()
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str, on_reject: Callable[[], None]) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"")
        # constant time: the comparison must not leak how much of the key matched
        if not hmac.compare_digest(got, self._expected):
            self._on_reject()
            return await _send_error(
                send,
                APIError(
                    401,
                    "missing or wrong bearer token (authorization: Bearer KEY)",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                ),
            )
        return await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"request body: larger than the limit of {self.max_bytes} bytes (--max-message-bytes)",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, self._too_large())
        # no or a small declared length: read up to the limit, then hand the body on
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_error(send, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)
