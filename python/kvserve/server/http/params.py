"""The one place a request body becomes SamplingParams (and what else the engine takes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from kvserve.sampling_params import SamplingParams
from kvserve.server.http.errors import APIError, bad_request
from kvserve.server.http.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    JsonObjectResponseFormat,
    JsonSchemaResponseFormat,
)
from kvserve.structured_output import StructuredOutput

# fields named the same on both sides, copied when the client set them
_SAME_NAME = (
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class EngineInput:
    """The arguments of one AsyncEngine.generate call."""

    prompt: str | None
    prompt_token_ids: list[int] | None
    messages: list[dict[str, str]] | None
    params: SamplingParams
    cache_salt: str | None


def to_engine_input(req: ChatCompletionRequest | CompletionRequest) -> EngineInput:
    kwargs: dict[str, Any] = {k: getattr(req, k) for k in _SAME_NAME if getattr(req, k) is not None}
    if isinstance(req.stop, list):
        for i, s in enumerate(req.stop):
            if not s:
                raise bad_request(f"stop[{i}]: must not be empty", f"stop[{i}]")
    if req.stop == "":
        raise bad_request("stop: must not be empty", "stop")
    if req.stop:
        kwargs["stop"] = req.stop
    prompt: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    if isinstance(req, ChatCompletionRequest):
        both = req.max_tokens is not None and req.max_completion_tokens is not None
        if both and req.max_tokens != req.max_completion_tokens:
            raise bad_request(
                "max_completion_tokens: differs from max_tokens; give one of them",
                "max_completion_tokens",
            )
        # None: up to the model's length limit, as OpenAI's chat does
        kwargs["max_tokens"] = req.max_completion_tokens or req.max_tokens
        if req.logprobs:
            kwargs["logprobs"] = req.top_logprobs or 0
        elif req.top_logprobs is not None:
            raise bad_request("top_logprobs: needs logprobs: true", "top_logprobs")
        messages = engine_messages(req.messages)
    else:
        kwargs["max_tokens"] = req.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        if req.logprobs is not None:
            kwargs["logprobs"] = req.logprobs
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise bad_request(
                    f"prompt: one prompt per request; got a batch of {len(p)}", "prompt"
                )
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise bad_request("prompt: must not be empty", "prompt")
            prompt = p
        else:
            token_ids = [int(t) for t in cast("list[int]", p)]  # a str is handled above
            if not token_ids:
                raise bad_request("prompt: must not be empty", "prompt")
    fmt = req.response_format
    if isinstance(fmt, JsonObjectResponseFormat):
        kwargs["structured"] = StructuredOutput(json_object=True)
    elif isinstance(fmt, JsonSchemaResponseFormat):
        if not fmt.json_schema.schema_:
            raise bad_request(
                "response_format.json_schema.schema: must be a non-empty JSON schema",
                "response_format",
            )
        kwargs["structured"] = StructuredOutput(json_schema=fmt.json_schema.schema_)
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        raise sampling_error(exc) from None
    return EngineInput(prompt, token_ids, messages, params, req.cache_salt)


def engine_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The chat template's {role, content} dicts; text parts are joined."""
    return [
        {
            "role": m.role,
            "content": m.content
            if isinstance(m.content, str)
            else "".join(part.text for part in m.content),
        }
        for m in messages
    ]


def sampling_error(exc: Exception) -> APIError:
    """SamplingParams names a field "SamplingParams.top_p ..."; the body calls it "top_p"."""
    text = str(exc).removeprefix("SamplingParams.")
    param = text.split(" ", 1)[0].rstrip(":")
    if param.split(".", 1)[0] == "structured":  # the body's name for the spec
        return bad_request(text, "response_format")
    return bad_request(text, param if param.isidentifier() else None)
