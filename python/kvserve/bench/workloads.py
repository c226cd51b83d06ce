"""Request shapes for the load generator.

Prompts are token ids drawn from the model's ordinary vocabulary, so the load is the same
whatever the tokenizer, and a multi-turn conversation's next prompt extends the previous
prompt and answer token for token (which is what lets the prefix cache hit it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

WORKLOADS = ("synthetic", "multiturn", "shared-prefix", "prefill-heavy", "decode-heavy")


@dataclass
class RequestSpec:
    """One request to send. ``turns_left`` > 0 means a follow-up turn comes after it."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    conversation: int = -1
    turn: int = 0
    turns_left: int = 0


@dataclass
class Workload:
    """Draws request specs; `follow_up` builds the next turn of a conversation."""

    name: str
    vocab_size: int
    max_model_len: int
    seed: int = 0
    think_time_s: float = 1.0
    turns: int = 4
    system_prompts: int = 4  # shared-prefix: how many long system prompts users share
    system_prompt_len: int = 0  # shared-prefix: their length (0: half the context)
    rng: np.random.Generator = field(init=False)
    _fresh: itertools.count = field(init=False)
    _systems: list[list[int]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"workload: {self.name!r} is not one of {', '.join(WORKLOADS)}")
        if self.vocab_size < 256:
            raise ValueError(f"vocab_size: {self.vocab_size} is too small (need >= 256)")
        if self.system_prompts < 1:
            raise ValueError(f"system_prompts: must be >= 1, got {self.system_prompts}")
        self.rng = np.random.default_rng(self.seed)
        self._fresh = itertools.count(1_000_000)  # conversation ids for fresh starts
        if self.name == "shared-prefix":
            n = self.system_prompt_len or self.max_model_len // 2
            n = max(1, min(n, self.max_model_len * 3 // 4 - 64))
            self._systems = [self._tokens(n) for _ in range(self.system_prompts)]

    def _tokens(self, n: int) -> list[int]:
        # Stay clear of the low ids, where tokenizers keep their special tokens.
        low = min(128, self.vocab_size // 4)
        return self.rng.integers(low, self.vocab_size, size=n).tolist()

    def _lengths(self) -> tuple[int, int]:
        """(prompt tokens, output tokens) for one new request."""
        r = self.rng
        if self.name == "prefill-heavy":  # summarise a long document
            prompt, out = int(r.integers(1024, 3072)), int(r.integers(16, 96))
        elif self.name == "decode-heavy":  # write a long answer
            prompt, out = int(r.integers(16, 96)), int(r.integers(384, 1024))
        else:  # chat-like: log-normal prompts, shorter answers
            prompt = int(np.clip(r.lognormal(mean=5.0, sigma=0.8), 8, 2048))
            out = int(np.clip(r.lognormal(mean=4.6, sigma=0.6), 8, 512))
        return self._fit(prompt, out)

    def _fit(self, prompt: int, out: int) -> tuple[int, int]:
        # Keep prompt + output within the model's context, whatever its size.
        prompt = max(1, min(prompt, self.max_model_len * 3 // 4))
        out = max(1, min(out, self.max_model_len - prompt - 1))
        return prompt, out

    def new_request(self, index: int) -> RequestSpec:
        if self.name == "shared-prefix":
            return self._shared_prefix_request(index)
        prompt, out = self._lengths()
        turns_left = self.turns - 1 if self.name == "multiturn" else 0
        return RequestSpec(
            request_id=f"bench-{index}",
            prompt_token_ids=self._tokens(prompt),
            max_tokens=out,
            conversation=index,
            turn=0,
            turns_left=turns_left,
        )

    def _shared_prefix_request(self, index: int) -> RequestSpec:
        """One of a few long system prompts (users of the same app), then a unique question."""
        system = self._systems[int(self.rng.integers(len(self._systems)))]
        question = self._tokens(int(self.rng.integers(16, 64)))
        out = int(np.clip(self.rng.lognormal(mean=3.5, sigma=0.5), 4, 128))
        prompt, out = self._fit(len(system) + len(question), out)
        return RequestSpec(
            request_id=f"bench-{index}",
            prompt_token_ids=(system + question)[:prompt],
            max_tokens=out,
            conversation=index,
        )

    def follow_up(self, spec: RequestSpec, output_token_ids: list[int]) -> RequestSpec | None:
        """The conversation's next turn: previous prompt + answer + a new user message."""
        if spec.turns_left <= 0:
            return None
        user = int(self.rng.integers(8, 64))
        history = spec.prompt_token_ids + output_token_ids
        room = self.max_model_len - len(history) - user - 2
        if room < 1:
            # The conversation has filled the context: the user starts a new one, which
            # takes this conversation's remaining turns so the request count holds.
            fresh = self.new_request(next(self._fresh))
            fresh.turns_left = spec.turns_left - 1
            return fresh
        out = int(min(np.clip(self.rng.lognormal(4.6, 0.6), 8, 512), room))
        return RequestSpec(
            request_id=f"bench-{spec.conversation}-t{spec.turn + 1}",
            prompt_token_ids=history + self._tokens(user),
            max_tokens=out,
            conversation=spec.conversation,
            turn=spec.turn + 1,
            turns_left=spec.turns_left - 1,
        )

    def think_time(self) -> float:
        return float(self.rng.exponential(self.think_time_s))


def poisson_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Arrival times (s) of n requests at `rate` per second; rate <= 0 means all at once."""
    if rate <= 0 or not np.isfinite(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps) - gaps[0]
