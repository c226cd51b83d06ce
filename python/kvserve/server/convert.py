"""Between kvserve.v1 messages and the engine's Python objects; field-level validation."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvserve.server.proto import pb
from kvserve.structured_output import StructuredOutput

MAX_REQUEST_ID_CHARS = 256
MAX_CACHE_SALT_CHARS = 1024

# proto field -> SamplingParams keyword; the names are the same on purpose
_OPTIONAL_SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
    "logprobs",
    "skip_special_tokens",
)

# Fields of a request the core validates (its messages start "min_tokens: ...").
_CORE_SAMPLING_FIELDS = ("max_tokens:", "min_tokens:")

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


class FieldError(ValueError):
    """A bad request field; the message starts with the field's path."""


@dataclass
class EngineRequest:
    """The arguments of one engine.generate call."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    messages: list[dict[str, str]] | None
    sampling: dict[str, Any]  # SamplingParams keywords
    cache_salt: str | None


def _messages(msgs: pb.ChatMessages, field: str) -> list[dict[str, str]]:
    if not msgs.messages:
        raise FieldError(f"{field}: must hold at least one message")
    out = []
    for i, m in enumerate(msgs.messages):
        if not m.role:
            raise FieldError(f"{field}[{i}].role: must not be empty")
        out.append({"role": m.role, "content": m.content})
    return out


def sampling_kwargs(params: pb.SamplingParams) -> dict[str, Any]:
    """Only the fields the client set, so the engine's defaults apply to the rest."""
    kwargs: dict[str, Any] = {}
    for name in _OPTIONAL_SAMPLING_FIELDS:
        if params.HasField(name):
            value = getattr(params, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise FieldError(f"sampling.{name}: must be a finite number, got {value}")
            kwargs[name] = value
    if params.stop:
        for i, s in enumerate(params.stop):
            if not s:
                raise FieldError(f"sampling.stop[{i}]: must not be empty")
        kwargs["stop"] = list(params.stop)
    if params.stop_token_ids:
        kwargs["stop_token_ids"] = list(params.stop_token_ids)
    if params.HasField("structured"):
        kwargs["structured"] = structured_output(params.structured)
    return kwargs


def structured_output(msg: pb.StructuredOutput) -> StructuredOutput:
    """Shape errors here, compile errors when the engine adds the request; both name
    "sampling.structured.<field>"."""
    which = msg.WhichOneof("kind")
    if which is None:
        raise FieldError("sampling.structured: set one of json_schema, json_object, regex, "
                         "grammar")
    if which == "json_object" and not msg.json_object:
        raise FieldError("sampling.structured.json_object: must be true when set")
    try:
        return StructuredOutput(**{which: getattr(msg, which)})
    except ValueError as exc:
        raise FieldError(sampling_error(exc)) from None


def to_engine_request(req: pb.GenerateRequest) -> EngineRequest:
    """Checks what the engine cannot know about (the wire shape); it checks the rest."""
    request_id = req.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise FieldError(f"request_id: at most {MAX_REQUEST_ID_CHARS} characters")
    if not request_id.isprintable():
        raise FieldError("request_id: must be printable text")
    prompt = token_ids = messages = None
    which = req.WhichOneof("input")
    if which is None:
        raise FieldError("input: set one of prompt, prompt_token_ids, messages")
    if which == "prompt":
        if not req.prompt:
            raise FieldError("prompt: must not be empty")
        prompt = req.prompt
    elif which == "prompt_token_ids":
        if not req.prompt_token_ids.ids:
            raise FieldError("prompt_token_ids: must not be empty")
        token_ids = list(req.prompt_token_ids.ids)
    else:
        messages = _messages(req.messages, "messages")
    cache_salt = req.cache_salt if req.HasField("cache_salt") else None
    if cache_salt is not None and len(cache_salt) > MAX_CACHE_SALT_CHARS:
        raise FieldError(f"cache_salt: at most {MAX_CACHE_SALT_CHARS} characters")
    return EngineRequest(
        request_id=request_id,
        prompt=prompt,
        prompt_token_ids=token_ids,
        messages=messages,
        sampling=sampling_kwargs(req.sampling),
        cache_salt=cache_salt,
    )


def tokenize_input(req: pb.TokenizeRequest) -> tuple[str | None, list[dict[str, str]] | None]:
    which = req.WhichOneof("input")
    if which is None:
        raise FieldError("input: set one of text, messages")
    if which == "text":
        return req.text, None
    return None, _messages(req.messages, "messages")


def finish_reason(reason: str | None) -> pb.FinishReason:
    if reason is None:
        return pb.FINISH_REASON_UNSPECIFIED
    return _FINISH_REASONS.get(reason, pb.FINISH_REASON_ABORT)


def sampling_error(exc: Exception) -> str:
    """SamplingParams names fields "SamplingParams.top_p", the core "min_tokens: ..."; the
    wire name is "sampling.top_p", "sampling.min_tokens"."""
    text, prefix = str(exc), "SamplingParams."
    if text.startswith(prefix):
        return "sampling." + text[len(prefix) :]
    return "sampling." + text if text.startswith(_CORE_SAMPLING_FIELDS) else text


def logprob_entries(
    token_ids: list[int], logprobs: list[Mapping[int, float]] | None
) -> list[pb.TokenLogprob]:
    """One TokenLogprob per new token from the engine's per-token {token id: logprob} dicts,
    which hold the sampled token and the top alternatives."""
    if not logprobs:
        return []
    out = []
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        top = sorted(entry.items(), key=lambda kv: -kv[1])
        out.append(
            pb.TokenLogprob(
                token_id=int(token_id),
                logprob=float(entry.get(token_id, float("nan"))),
                top_logprobs=[pb.TopLogprob(token_id=int(t), logprob=float(v)) for t, v in top],
            )
        )
    return out


def to_response(out: Any) -> pb.GenerateResponse:
    """One engine delta (RequestOutput) as a GenerateResponse."""
    token_ids = [int(t) for t in (out.token_ids or ())]
    resp = pb.GenerateResponse(
        request_id=out.request_id,
        text=out.text or "",
        token_ids=token_ids,
        logprobs=logprob_entries(token_ids, out.logprobs),
        finished=bool(out.finished),
    )
    if out.finished:
        resp.finish_reason = finish_reason(out.finish_reason)
        resp.usage.prompt_tokens = int(out.num_prompt_tokens)
        resp.usage.completion_tokens = int(out.num_completion_tokens)
        resp.usage.cached_prompt_tokens = int(out.num_cached_prompt_tokens)
    return resp


_LOAD_FIELDS = {
    "kv_usage": float,
    "host_kv_usage": float,
    "running": int,
    "waiting": int,
    "swapped": int,
    "tokens_last_step": int,
    "prefix_hit_rate": float,
    "admitting": bool,
    "num_gpu_blocks": int,
    "num_used_gpu_blocks": int,
    "num_cached_gpu_blocks": int,
    "kv_cache_dtype": str,
    "kv_bytes_per_token": int,
    "prefix_hits_gpu_tokens": int,
    "prefix_hits_host_tokens": int,
    "num_cached_host_blocks": int,
    "host_offloaded_bytes": int,
    "host_loaded_bytes": int,
    "host_load_decisions": int,
    "host_recompute_decisions": int,
    "host_evictions": int,
    "recomputed_tokens": int,
    "host_link_h2d_bytes_per_s": float,
    "host_link_d2h_bytes_per_s": float,
}


# the core's snapshot names -> GetLoadResponse fields
_LOAD_ALIASES = {
    "gpu_blocks_used": "num_used_gpu_blocks",
    "gpu_blocks_cached": "num_cached_gpu_blocks",
    "host_blocks_cached": "num_cached_host_blocks",
}


def to_load(load: Mapping[str, Any], in_flight: int) -> pb.GetLoadResponse:
    resp = pb.GetLoadResponse(in_flight=in_flight)
    for key, value in load.items():
        field_name = _LOAD_ALIASES.get(key, key)
        if field_name in _LOAD_FIELDS:
            setattr(resp, field_name, _LOAD_FIELDS[field_name](value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            resp.metrics[key] = float(value)
        elif isinstance(value, bool):
            resp.metrics[key] = 1.0 if value else 0.0
    return resp
