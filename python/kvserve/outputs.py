"""What the engine hands back: per-step deltas (streaming) and whole completions (LLM)."""

from __future__ import annotations

from dataclasses import dataclass, field

Logprobs = dict[int, float]  # token id -> log probability


@dataclass
class RequestOutput:
    """A request's output. From the engine's step loop it is a delta (new text, new ids);
    LLM.generate returns it accumulated. The count fields are filled on the final item."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprobs] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_token_ids: list[int] | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    error: str | None = None  # set when finish_reason == "error"

    def merge(self, delta: RequestOutput) -> None:
        """Fold a later delta into this accumulated output."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finished:
            self.finished, self.finish_reason, self.error = True, delta.finish_reason, delta.error
            self.num_prompt_tokens = delta.num_prompt_tokens
            self.num_completion_tokens = delta.num_completion_tokens
            self.num_cached_prompt_tokens = delta.num_cached_prompt_tokens


@dataclass
class StepStats:
    """One engine step, for listeners (metrics, load reporting)."""

    num_seqs: int
    num_tokens: int
    num_prefill_tokens: int
    num_decodes: int
    duration_s: float
    flops_estimate: float  # matmuls + attention
    bytes_estimate: float  # weights read + KV read and written
