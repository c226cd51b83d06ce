"""SamplingParams: vLLM's names and meanings; invalid values raise ValueError naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvserve.structured_output import StructuredOutput

# Below this a temperature is greedy (vLLM's rule): dividing logits by it would overflow
# float32 (or, for subnormals, divide by zero) and turn the distribution into NaN.
GREEDY_BELOW = 1e-5
# Above this every distribution is uniform to float32 precision; larger values would become
# inf in float32 and make inf / inf = NaN of masked logits.
HOTTEST = 1e30


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) means greedy
    top_k: int = 0  # 0 or -1: no limit
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's length limit
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None  # the output must match a schema/regex/grammar
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_list = [self.stop]
        else:
            self.stop_list = list(self.stop or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def sampling_temperature(self) -> float:
        """The divisor the sampler uses for a non-greedy row, kept inside float32's range."""
        return min(max(float(self.temperature), GREEDY_BELOW), HOTTEST)

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def validate(self, vocab_size: int | None = None) -> None:
        _check(self.n == 1, "n", "must be 1 (parallel sampling is not supported)", self.n)
        _number(self.temperature, "temperature", ">= 0", lambda v: v >= 0)
        _integer(self.top_k, "top_k", "0 (off), -1 (off) or >= 1", lambda v: v >= 0)
        _number(self.top_p, "top_p", "in (0, 1]", lambda v: 0 < v <= 1)
        _number(self.min_p, "min_p", "in [0, 1]", lambda v: 0 <= v <= 1)
        _number(self.repetition_penalty, "repetition_penalty", "> 0", lambda v: v > 0)
        _number(self.presence_penalty, "presence_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2)
        _number(self.frequency_penalty, "frequency_penalty", "in [-2, 2]",
                lambda v: -2 <= v <= 2)
        if self.seed is not None:
            _integer(self.seed, "seed", "an integer in [0, 2**63)", lambda v: 0 <= v < 2**63)
        if self.max_tokens is not None:
            _integer(self.max_tokens, "max_tokens", ">= 1", lambda v: v >= 1)
        # Against max_tokens (the request's, or what max_model_len leaves) the core checks it.
        _integer(self.min_tokens, "min_tokens", ">= 0", lambda v: v >= 0)
        for s in self.stop_list:
            _check(isinstance(s, str) and s != "", "stop", "must hold non-empty strings", s)
        for t in self.stop_token_ids or []:
            ok = isinstance(t, int) and t >= 0 and (vocab_size is None or t < vocab_size)
            _check(ok, "stop_token_ids", f"must hold token ids in [0, {vocab_size or 'vocab'})", t)
        if self.logprobs is not None:
            _integer(self.logprobs, "logprobs", "in [0, 20]", lambda v: 0 <= v <= 20)
        if self.structured is not None:
            _check(isinstance(self.structured, StructuredOutput), "structured",
                   "must be a StructuredOutput", self.structured)
            self.structured.validate()
            # The grammar decides where the output ends; holding back eos could leave no token.
            _check(self.min_tokens == 0, "min_tokens", "must be 0 with structured output",
                   self.min_tokens)


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} {rule}; got {value!r}")


def _number(value: object, name: str, rng: str, ok) -> None:
    valid = (isinstance(value, (int, float)) and not isinstance(value, bool)
             and math.isfinite(value))
    _check(valid and ok(value), name, f"must be {rng}", value)


def _integer(value: object, name: str, rng: str, ok) -> None:
    valid = isinstance(value, int) and not isinstance(value, bool)
    _check(valid and ok(value), name, f"must be {rng}", value)
