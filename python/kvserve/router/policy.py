"""Which replica gets a request. Pure functions of the replicas' load views and the
prompt's cached-prefix overlap per replica, so tests drive them with plain numbers.

`kv` predicts each admitting replica's time to first token and picks the lowest:
    rtt + (queued prompt tokens + prompt tokens not cached there) / prefill rate
        + decode step time
The queue is the larger of what the replica reported and what this router sent it that
has not streamed yet (so a burst between load polls does not pile onto one replica); the
decode step time grows with the decodes running there, so a replica busy with long
generations is charged for the step the new prompt has to join. Prompt tokens a replica
holds only in its host tier count at HOST_HIT_COST of a recompute each.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

POLICIES = ("kv", "round-robin", "least-load", "random")
DEFAULT_PREFILL_TOKENS_PER_S = 5000.0  # before any replica has measured its own
# A token's KV loaded over the host link, as a fraction of recomputing it. Pinned PCIe gen5
# moves an 8k-token Llama-3-8B prefix about 13x faster than prefill recomputes it (17x at
# 32k; issue 18's H200 figures), so 1/13..1/17; rounded up because the link also carries
# offloads and a load waits its turn. The replica itself picks load or recompute per
# request, so a host hit never costs more than a miss there.
HOST_HIT_COST = 0.1


@dataclass(frozen=True)
class Candidate:
    name: str
    rtt_s: float
    prefill_tokens_per_s: float  # 0: not measured yet
    decode_step_s: float
    waiting_prompt_tokens: int  # reported by the replica
    pending_prompt_tokens: int  # sent by this router, no token back yet
    in_flight: int  # the larger of reported and router-side open streams
    cached_tokens: int  # leading prompt tokens the index says it holds on the GPU
    host_cached_tokens: int = 0  # further prompt tokens it holds only in its host tier


def predicted_ttft(c: Candidate, prompt_tokens: int, fallback_rate: float) -> float:
    rate = c.prefill_tokens_per_s or fallback_rate
    queue = max(c.waiting_prompt_tokens, c.pending_prompt_tokens)
    host = min(c.host_cached_tokens, max(prompt_tokens - c.cached_tokens - 1, 0))
    uncached = max(prompt_tokens - c.cached_tokens - host, 1)  # the last token is computed
    return c.rtt_s + (queue + uncached + HOST_HIT_COST * host) / rate + c.decode_step_s


def fallback_rate(cands: Sequence[Candidate]) -> float:
    rates = [c.prefill_tokens_per_s for c in cands if c.prefill_tokens_per_s > 0]
    return sum(rates) / len(rates) if rates else DEFAULT_PREFILL_TOKENS_PER_S


@dataclass
class Router:
    """Orders candidates best first; the service tries them in that order."""

    policy: str = "kv"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"--policy: {self.policy!r} is not one of {', '.join(POLICIES)}")
        self._rng = random.Random(self.seed)
        self._next = 0

    def rank(self, cands: Sequence[Candidate], prompt_tokens: int) -> list[Candidate]:
        if not cands:
            return []
        if self.policy == "kv":
            rate = fallback_rate(cands)
            return sorted(cands, key=lambda c: (predicted_ttft(c, prompt_tokens, rate), c.name))
        if self.policy == "least-load":
            return sorted(cands, key=lambda c: (c.in_flight, c.pending_prompt_tokens, c.name))
        ordered = sorted(cands, key=lambda c: c.name)
        if self.policy == "random":
            self._rng.shuffle(ordered)
            return ordered
        start = self._next % len(ordered)
        self._next += 1
        return ordered[start:] + ordered[:start]
