"""OpenAI response bodies and stream chunks from the engine's outputs (plain dicts)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

TokenText = Callable[[int], str]


@dataclass
class Completion:
    """One request's output as it accumulates: what the final body and usage need."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Mapping[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, out: Any) -> None:
        self.text += out.text or ""
        self.token_ids.extend(int(t) for t in out.token_ids or ())
        self.logprobs.extend(out.logprobs or ())
        if out.finished:
            self.finish_reason = out.finish_reason
            self.prompt_tokens = int(out.num_prompt_tokens)
            self.completion_tokens = int(out.num_completion_tokens)
            self.cached_tokens = int(out.num_cached_prompt_tokens)

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def _sorted_top(entry: Mapping[int, float]) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])


def chat_logprobs(
    token_ids: list[int], logprobs: list[Mapping[int, float]], top_n: int, text: TokenText
) -> dict[str, Any]:
    """choices[].logprobs of chat: the sampled token and its top_n alternatives."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        s = text(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        row = item(token_id, float(entry.get(token_id, float("-inf"))))
        row["top_logprobs"] = [item(t, float(v)) for t, v in _sorted_top(entry)[:top_n]]
        content.append(row)
    return {"content": content}


def completion_logprobs(
    token_ids: list[int],
    logprobs: list[Mapping[int, float]],
    top_n: int,
    text: TokenText,
    offset: int = 0,
) -> dict[str, Any]:
    """choices[].logprobs of the legacy completions API (parallel lists)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        s = text(token_id)
        tokens.append(s)
        token_lps.append(float(entry.get(token_id, float("-inf"))))
        tops.append({text(t): float(v) for t, v in _sorted_top(entry)[:top_n]})
        offsets.append(offset)
        offset += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _response(
    c: Completion,
    obj: str,
    content: dict[str, Any],
    logprobs: dict[str, Any] | None,
    finish_reason: str | None,
    token_ids: list[int] | None,
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """The envelope every body and chunk shares: one choice holding `content`."""
    choice: dict[str, Any] = {
        "index": 0,
        **content,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {
        "id": c.id,
        "object": obj,
        "created": c.created,
        "model": c.model,
        "choices": [choice],
        "usage": usage,
    }


def chat_body(c: Completion, logprobs: dict[str, Any] | None, with_ids: bool) -> dict[str, Any]:
    message = {"message": {"role": "assistant", "content": c.text}}
    return _response(c, "chat.completion", message, logprobs, c.finish_reason,
                     c.token_ids if with_ids else None, c.usage())


def completion_body(
    c: Completion, logprobs: dict[str, Any] | None, with_ids: bool
) -> dict[str, Any]:
    return _response(c, "text_completion", {"text": c.text}, logprobs, c.finish_reason,
                     c.token_ids if with_ids else None, c.usage())


def chat_chunk(
    c: Completion,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    return _response(c, "chat.completion.chunk", {"delta": delta}, logprobs, finish_reason,
                     token_ids, None)


def completion_chunk(
    c: Completion,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    return _response(c, "text_completion", {"text": text}, logprobs, finish_reason, token_ids,
                     None)


def usage_chunk(c: Completion, chat: bool) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, usage."""
    return {
        "id": c.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": c.created,
        "model": c.model,
        "choices": [],
        "usage": c.usage(),
    }
