"""Which replica gets a request. Pure functions of the replicas' load views and the
prompt's cached-prefix overlap per replica, so tests drive them with plain numbers.

`kv` predicts each admitting replica's time to first token and picks the lowest:
    rtt + max(queue_s, kv_wait_s) + (prompt tokens not cached there) / prefill rate
        + decode step time
- queue_s: the prompt tokens queued ahead of it over the prefill rate. The replica reports
  its waiting prompt tokens before any cache lookup, so they are discounted by its prefix
  hit rate (queued tokens that will hit its cache cost little); what this router sent it
  that has not streamed yet is counted by the overlap the index predicted for each. The
  larger of the two is the queue (a burst between load polls does not pile onto one).
- kv_wait_s: KV pressure. The queue and this prompt need blocks; when the replica's free
  blocks (cached-but-free blocks count: they are evictable) cannot hold them, nothing
  starts until running decodes finish and return theirs. Decodes are taken shortest
  remaining first, each returning the replica's mean blocks per running request; the
  wait is the remaining steps of the one that frees enough, times the decode step time.
  The queue drains no faster than blocks free up, so the larger of the two counts.
- the decode step time grows with the decodes running there, so a replica busy with long
  generations is charged for the step the new prompt has to join.
- Prompt tokens a replica holds only in its host tier count at HOST_HIT_COST of a
  recompute each (they still need GPU blocks, so they count in kv_wait_s).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

POLICIES = ("kv", "round-robin", "least-load", "random")
DEFAULT_PREFILL_TOKENS_PER_S = 5000.0  # before any replica has measured its own
# Remaining length assumed for a running decode this router did not send (another router's
# stream, or one it lost track of): a typical chat answer.
UNKNOWN_DECODE_STEPS = 256

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
    waiting_prompt_tokens: int  # reported by the replica (before its cache lookup)
    pending_prompt_tokens: int  # sent by this router, no token back yet, minus predicted hits
    in_flight: int  # the larger of reported and router-side open streams
    cached_tokens: int  # leading prompt tokens the index says it holds on the GPU
    host_cached_tokens: int = 0  # further prompt tokens it holds only in its host tier
    prefix_hit_rate: float = 0.0  # reported: hit tokens / queried tokens
    block_size: int = 0  # 0: unknown (no KV-pressure term)
    num_gpu_blocks: int = 0
    num_used_gpu_blocks: int = 0  # in use by live requests
    running: int = 0  # decodes running there (reported)
    decode_steps_left: tuple[int, ...] = ()  # of the streams this router has open there


def queue_tokens(c: Candidate) -> float:
    """Prompt tokens queued ahead that the replica will have to compute."""
    hit = min(max(c.prefix_hit_rate, 0.0), 1.0)
    return max(c.waiting_prompt_tokens * (1.0 - hit), float(c.pending_prompt_tokens))


def kv_wait_s(c: Candidate, uncached_tokens: int) -> float:
    """Time until the replica has free blocks for the queue ahead and this prompt."""
    if c.block_size <= 0 or c.num_gpu_blocks <= 0:
        return 0.0
    need = math.ceil((queue_tokens(c) + uncached_tokens) / c.block_size)
    deficit = need - (c.num_gpu_blocks - c.num_used_gpu_blocks)
    if deficit <= 0:
        return 0.0
    running = max(c.running, len(c.decode_steps_left))
    if running == 0:  # no decode holds the blocks: nothing here to wait for
        return 0.0
    per_request = c.num_used_gpu_blocks / running
    left = sorted(c.decode_steps_left) + [UNKNOWN_DECODE_STEPS] * (
        running - len(c.decode_steps_left)
    )
    freed = 0.0
    for steps in left:
        freed += per_request
        if freed >= deficit:
            return steps * c.decode_step_s
    return left[-1] * c.decode_step_s  # even all of them do not free enough: the longest


def predicted_ttft(c: Candidate, prompt_tokens: int, fallback_rate: float) -> float:
    rate = c.prefill_tokens_per_s or fallback_rate
    host = min(c.host_cached_tokens, max(prompt_tokens - c.cached_tokens - 1, 0))
    uncached = max(prompt_tokens - c.cached_tokens - host, 1)  # the last token is computed
    wait = max(queue_tokens(c) / rate, kv_wait_s(c, uncached + host))
    return c.rtt_s + wait + (uncached + HOST_HIT_COST * host) / rate + c.decode_step_s


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
            key = lambda c: (predicted_ttft(c, prompt_tokens, rate), c.in_flight, c.name)  # noqa: E731
            return sorted(cands, key=key)
        if self.policy == "least-load":
            return sorted(cands, key=lambda c: (c.in_flight, c.pending_prompt_tokens, c.name))
        ordered = sorted(cands, key=lambda c: c.name)
        if self.policy == "random":
            self._rng.shuffle(ordered)
            return ordered
        start = self._next % len(ordered)
        self._next += 1
        return ordered[start:] + ordered[:start]
