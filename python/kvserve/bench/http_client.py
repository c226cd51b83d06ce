"""`kvserve bench --server http://HOST:PORT`: the load goes to the OpenAI-compatible HTTP
front (/v1/completions, streamed), as an OpenAI client would send it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from kvserve.bench.driver import StreamEvent
from kvserve.bench.workloads import RequestSpec


class HttpClient:
    def __init__(self, server: str, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # no connection cap: the driver decides how many requests are in flight
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.http = httpx.AsyncClient(
            base_url=server.rstrip("/"), headers=headers, limits=limits, timeout=None
        )
        self._model: str | None = None

    async def _card(self) -> dict:
        r = await self.http.get("/v1/models")
        r.raise_for_status()
        card = r.json()["data"][0]
        self._model = str(card["id"])
        return dict(card)

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        if self._model is None:
            await self._card()
        body = {
            "model": self._model,
            "prompt": spec.prompt_token_ids,
            "max_tokens": spec.max_tokens,
            "temperature": 0,
            # the workload, not the model, decides how long each answer is
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        async with self.http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
            finish = None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk["choices"]:
                    choice = chunk["choices"][0]
                    finish = choice["finish_reason"] or finish
                    if choice.get("token_ids"):
                        yield StreamEvent(token_ids=choice["token_ids"])
                if chunk.get("usage"):  # the last chunk: usage, after the finish reason
                    cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
                    yield StreamEvent(
                        [], finished=True, finish_reason=finish, cached_prompt_tokens=int(cached)
                    )

    async def load(self) -> dict[str, float]:
        r = await self.http.get("/load")
        r.raise_for_status()
        reply = r.json()
        load = {k: float(v) for k, v in reply.pop("metrics").items()}
        load.update({k: float(v) for k, v in reply.items() if isinstance(v, (int, float))})
        return load

    async def limits(self) -> tuple[int, int]:
        card = await self._card()
        return int(card["vocab_size"]), int(card["max_model_len"])

    async def close(self) -> None:
        await self.http.aclose()
