"""Which replica a simulated request goes to.

A policy is any object with `choose(replicas, request) -> index`; `replicas` are the
simulated replicas (each exposes `num_running`, `num_waiting`, `kv_usage` and its `core`).
One that also has `attach(replicas)` is handed the fleet once, before the first arrival
(FleetRouter subscribes to the cores' KV events there). RoundRobin and LeastLoad are the
light rules; FleetRouter runs `kvserve route`'s own policies and prefix index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class RouterPolicy(Protocol):
    def choose(self, replicas: Sequence[Any], request: Any) -> int: ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, replicas: Sequence[Any], request: Any) -> int:
        i = self._next % len(replicas)
        self._next = i + 1
        return i


class LeastLoad:
    """Fewest queued + running requests; ties go to the lower KV use, then the lower index."""

    def choose(self, replicas: Sequence[Any], request: Any) -> int:
        best, best_key = 0, None
        for i, r in enumerate(replicas):
            key = (r.num_waiting + r.num_running, r.kv_usage)
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best


POLICIES: dict[str, type[RoundRobin | LeastLoad]] = {"round-robin": RoundRobin,
                                                           "least-load": LeastLoad}
ROUTER_POLICIES = ("kv", "random")  # only through the router's own code (FleetRouter)


def make_policy(name: str) -> RouterPolicy:
    if name in ROUTER_POLICIES:
        return FleetRouter(name)
    if name not in POLICIES:
        raise ValueError(f"router: {name!r} is not one of "
                         f"{', '.join([*POLICIES, *ROUTER_POLICIES])}")
    return POLICIES[name]()


class FleetRouter:
    """`kvserve route`'s own policy (kvserve.router.policy.Router, any of its policies) over
    simulated replicas, with the router's PrefixIndex fed by each core's KV events: policy
    evaluated in simulated time, deterministically, by the code that routes for real.

    Load views are what a replica would report, read at decision time: waiting prompt
    tokens, hit rate, blocks in use, running decodes and each one's steps left; prefill
    rate and decode step time come from the profile's step model. Replicas above
    `kv_usage_threshold` or with a full queue get nothing while another admits.
    """

    def __init__(self, policy: str = "kv", seed: int = 0, kv_usage_threshold: float = 0.95,
                 rtt_s: float = 0.0, event_capacity: int = 1 << 16) -> None:
        from kvserve import _core
        from kvserve.router.index_feed import IndexFeed
        from kvserve.router.policy import Router

        self.router = Router(policy, seed)
        self.index = _core.PrefixIndex()
        self._feed = IndexFeed(self.index)
        self.threshold, self.rtt_s, self._capacity = kv_usage_threshold, rtt_s, event_capacity
        self._prefill_rate = 0.0
        self._profile: Any = None
        self.resyncs = 0
        self.predicted_cached_tokens = 0  # what the index said the chosen replica holds

    def attach(self, replicas: Sequence[Any]) -> None:
        for r in replicas:
            r.core.enable_kv_events(self._capacity)
            self.index.add_replica(str(r.index))
        if replicas:
            r = replicas[0]
            self._profile = r.profile
            b = r.config.max_num_batched_tokens
            self._prefill_rate = b / r.profile.step_seconds(b, 1, b, b * (b + 1) / 2)

    def _sync(self, r: Any) -> None:
        name = str(r.index)
        resync, _, kinds, hashes = r.core.drain_kv_events()
        if resync:  # the log overflowed: start over from a snapshot, as a subscriber does
            self.resyncs += 1
            _, gpu, host = r.core.kv_snapshot()
            self.index.clear_replica(name)
            self.index.store(name, gpu)
            self.index.store_host(name, host)
        elif kinds:
            self._feed.apply(name, kinds, hashes)

    def _candidate(self, r: Any, cached_blocks: int) -> Any:
        from kvserve.router.policy import Candidate

        core = r.core
        bs = core.block_size
        used, running = core.num_used_gpu_blocks, core.num_running
        left = []
        for spec in r.live.values():
            st = core.request_stats(spec.request_id)
            if st["state"] == "running":
                left.append(max(spec.max_tokens - int(st["output_tokens"]), 0))
        decode_s = (self._profile.step_seconds(running, running, used * bs, used * bs)
                    if running else 0.0)
        waiting = core.num_waiting
        return Candidate(
            name=str(r.index), rtt_s=self.rtt_s, prefill_tokens_per_s=self._prefill_rate,
            decode_step_s=decode_s, waiting_prompt_tokens=core.waiting_prompt_tokens(),
            pending_prompt_tokens=0,  # a simulated request reaches its replica at once
            in_flight=running + waiting, cached_tokens=cached_blocks * bs,
            prefix_hit_rate=float(core.metrics().get("prefix_hit_rate", 0.0)),
            block_size=bs, num_gpu_blocks=core.num_gpu_blocks, num_used_gpu_blocks=used,
            running=running, decode_steps_left=tuple(left))

    def choose(self, replicas: Sequence[Any], request: Any) -> int:
        if self._profile is None:
            raise RuntimeError("FleetRouter: attach(replicas) first (the Simulator does)")
        for r in replicas:
            self._sync(r)
        bs = replicas[0].core.block_size
        overlaps, _ = self.index.match_prompt(request.prompt_token_ids, bs)
        admitting = [r for r in replicas
                     if r.kv_usage <= self.threshold and r.num_waiting < r.config.max_waiting]
        pool = admitting or list(replicas)  # none admits: the best one queues or refuses
        cands = [self._candidate(r, overlaps.get(str(r.index), 0)) for r in pool]
        best = self.router.rank(cands, len(request.prompt_token_ids))[0]
        self.predicted_cached_tokens += min(best.cached_tokens, len(request.prompt_token_ids))
        return int(best.name)
