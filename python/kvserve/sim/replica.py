"""One simulated replica: a real kvserve._core.Core whose steps take the profile's modelled
time and whose sampled tokens are synthetic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvserve.bench.workloads import RequestSpec
from kvserve.sim.profile import Profile
from kvserve.sim.sources import SYNTHETIC_TOKEN
from kvserve.sim.stats import LogHistogram
from kvserve.step_cost import attention_pairs

if TYPE_CHECKING:
    from kvserve._core import Core, Plan

_sum, _and = np.add.reduce, np.bitwise_and  # without ndarray.sum's Python wrapper
SWAP_BYTES_PER_S = 25e9  # the core's default for the swap/recompute choice, used here too


@dataclass(frozen=True)
class ReplicaConfig:
    """The core settings the real engine would use on the profiled device."""

    num_gpu_blocks: int
    num_host_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    max_waiting: int = 4096
    enable_prefix_caching: bool = True
    preemption_mode: str = "auto"

    @classmethod
    def from_engine_args(cls, args: Any, profile: Profile) -> ReplicaConfig:
        block_bytes = int(profile.cost.kv_bytes_per_token) * args.block_size
        budget = args.resolve_token_budget(profile, profile.max_model_len)
        if args.host_kv_cache_bytes:
            raise ValueError("host_kv_cache: the simulator models no host tier")
        return cls(
            num_gpu_blocks=args.num_gpu_blocks_override or profile.num_gpu_blocks(
                args.block_size, args.gpu_memory_utilization, args.kv_cache_bytes),
            num_host_blocks=args.swap_bytes // block_bytes, block_size=args.block_size,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=budget,
            max_model_len=min(args.max_model_len or profile.max_model_len,
                              profile.max_model_len),
            max_waiting=args.max_waiting, enable_prefix_caching=args.enable_prefix_caching,
            preemption_mode=args.preemption_mode)

    def make_core(self, profile: Profile) -> Core:
        from kvserve import _core

        return _core.Core(
            num_gpu_blocks=self.num_gpu_blocks, block_size=self.block_size,
            num_host_blocks=self.num_host_blocks, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len, max_waiting=self.max_waiting,
            enable_prefix_caching=self.enable_prefix_caching,
            preemption_mode=self.preemption_mode,
            kv_bytes_per_token=int(profile.cost.kv_bytes_per_token),
            flops_per_token=profile.cost.flops_per_token)


@dataclass
class FleetStats:
    """What every replica adds to, bounded by live requests (histograms, counters)."""

    ttft: LogHistogram = field(default_factory=LogHistogram)
    itl: LogHistogram = field(default_factory=LogHistogram)
    e2e: LogHistogram = field(default_factory=LogHistogram)
    sent: int = 0
    completed: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    output_tokens: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    last_finish_s: float = 0.0

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


@dataclass
class Finished:
    spec: RequestSpec
    output_tokens: int


class SimReplica:
    """Arrays indexed by handle (mod a power of two that grows when a live handle would
    collide) hold each live request's arrival and last-token time, so a step's bookkeeping
    is a few numpy operations whatever the batch."""

    def __init__(self, index: int, config: ReplicaConfig, profile: Profile,
                 stats: FleetStats) -> None:
        from kvserve import _core

        self.index, self.config, self.profile, self.stats = index, config, profile, stats
        self.core = config.make_core(profile)
        self._num_gpu_blocks = config.num_gpu_blocks
        self._refusals = ((_core.AtCapacityError, "at_capacity"),
                          (_core.RequestTooLargeError, "too_large"),
                          (_core.InvalidRequestError, "invalid"))
        self.live: dict[int, RequestSpec] = {}
        self._cap = 1024
        self._alloc(self._cap)
        self.plan: Plan | None = None
        self.busy = False
        self._steady = False
        # Replaces the modelled step time (tests replay measured steps through it).
        self.step_clock: Callable[[Plan], float] | None = None
        self._pending: tuple[np.ndarray, float] | None = None
        self._last_ctx, self._last_ns = 0.0, 0
        self._itl_add = stats.itl.add
        tokens = np.full(max(config.max_num_seqs, 1), SYNTHETIC_TOKEN, np.int64)
        self._tokens = [tokens[:n] for n in range(len(tokens) + 1)]  # one view per count
        c, st = profile.cost, profile.step_time
        self._fixed = (c.weight_bytes, c.embed_row_bytes, c.kv_bytes_per_token,
                       c.flops_per_token, c.attn_flops_per_pair, 1.0 / st.bandwidth_bytes_per_s,
                       1.0 / st.compute_flops_per_s, st.step_overhead_s, st.seq_overhead_s)
        self._has_host = config.num_host_blocks > 0
        self._swap_s_per_block = (c.kv_bytes_per_token * config.block_size / SWAP_BYTES_PER_S)
        # Coasting (see `begin_coast`): off only to compare with the step-by-step run.
        self.coast_enabled = True
        # (step ends from ends[0] = the coast's start, rows, the step each block is taken at)
        self._coast: tuple[np.ndarray, int, np.ndarray] | None = None
        self.clock = [0.0]  # the simulated instant load signals are read at (shared)
        self.gen = 0  # bumped when a scheduled step end is replaced (the heap skips stale)
        # Whether the next step may start a coast: not after an add since the last schedule
        # (the core admits it), nor right after a coast that ended at what stops it.
        self._may_coast = False
        self._added = False

    def _alloc(self, cap: int) -> None:
        self._mask = np.uint64(cap - 1)
        self.arrival = np.zeros(cap)
        self.last = np.full(cap, np.nan)
        self.owner = np.full(cap, -1, np.int64)

    def _grow(self) -> None:
        self._flush_pending()
        old = [(h, self.arrival[h & (self._cap - 1)], self.last[h & (self._cap - 1)])
               for h in self.live]
        self._cap *= 2
        self._alloc(self._cap)
        for h, a, t in old:
            s = h & (self._cap - 1)
            self.arrival[s], self.last[s], self.owner[s] = a, t, h

    # ---- load signals a router reads ----------------------------------------------------
    @property
    def num_running(self) -> int:
        return int(self.core.num_running)

    @property
    def num_waiting(self) -> int:
        return int(self.core.num_waiting)

    @property
    def kv_usage(self) -> float:
        used = self.core.num_used_gpu_blocks
        coast = self._coast
        if coast is not None and len(coast[2]):
            # The blocks taken by the steps scheduled by now: one past those that ended
            # (ends[0], the coast's start, is not a step's end).
            ends, _, grows = coast
            k = int(ends.searchsorted(self.clock[0], "right"))
            used += int(grows.searchsorted(k, "right"))
        return used / self._num_gpu_blocks

    # ---- requests ---------------------------------------------------------------------------
    def add(self, spec: RequestSpec, now: float) -> bool:
        """Queue a request; False (and counted) when the core refuses it."""
        self._flush_pending()
        try:
            h = self.core.add_request(spec.request_id,
                                      np.asarray(spec.prompt_token_ids, np.int64),
                                      spec.max_tokens, ignore_eos=True)
        except Exception as exc:  # the core's typed refusals; anything else is a bug
            for kind, reason in self._refusals:
                if isinstance(exc, kind):
                    self.stats.refuse(reason)
                    return False
            raise
        while self.owner[h & (self._cap - 1)] >= 0:
            self._grow()
        s = h & (self._cap - 1)
        self.arrival[s], self.last[s], self.owner[s] = now, np.nan, h
        self.live[h] = spec
        self._added = True
        return True

    # ---- steps ------------------------------------------------------------------------------
    # A steady decode step (the last step was decode-only and finished nothing, nothing was
    # added since, and this one decodes as many rows) runs the same rows: its context is the
    # last one plus one token a row, and every row's gap is the time since the last step, so
    # neither is read from arrays. The last-token times of such rows are written only when
    # the run of steady steps ends (`_pending`).

    def _flush_pending(self) -> None:
        if self._pending is not None:
            slots, t = self._pending
            self.last[slots] = t
            self._pending = None
        self._steady = False

    def start_step(self, now: float) -> float | None:
        """Schedule the next step; its end time, or None when there is nothing to run."""
        plan = self.core.schedule()
        self._added = False
        ns = plan.num_seqs
        if ns == 0:
            self.plan, self.busy = None, False
            return None
        self.plan, self.busy = plan, True
        wb, erb, kvb, fpt, fpp, inv_bw, inv_rate, c0, c1 = self._fixed
        if self._steady and ns == self._last_ns and plan.num_decodes == ns:
            # The same decodes, one token on: nothing to read (no swaps either: those come
            # with a preemption or a swap-in, which change the row count).
            ctx = self._last_ctx = self._last_ctx + ns
            mem = (wb + (erb + kvb) * ns + kvb * ctx) * inv_bw
            cmp = (fpt * ns + fpp * ctx) * inv_rate
            dt = max(mem, cmp) + c0 + c1 * ns
        else:
            self._steady = False
            nt, nd = plan.num_tokens, plan.num_decodes
            ctx = float(_sum(plan.seq_lens))
            self._last_ctx, self._last_ns = ctx, ns
            # A decode's query sees its whole context once: pairs == context.
            pairs = ctx if nd == ns else attention_pairs(np.diff(plan.query_start_loc),
                                                         plan.seq_lens)
            dt = max((wb + erb * nt + kvb * (ctx + nt)) * inv_bw,
                     (fpt * nt + fpp * pairs) * inv_rate) + c0 + c1 * ns
            if self._has_host:
                swaps = len(plan.swap_out) + len(plan.swap_in)
                if swaps:
                    dt += swaps * self._swap_s_per_block
        if self.step_clock is not None:
            dt = self.step_clock(plan)
        return now + dt

    # ---- coasting ---------------------------------------------------------------------------
    # A steady decode batch whose next K steps stop no request and find the blocks they take
    # leaves every load signal as it is but KV use, which the core says when it grows: the
    # simulator does not visit it per step. `begin_coast` computes the K step ends at once
    # (the same arithmetic as `start_step`, so the same floats), the replica's next event is
    # the last one, and the core runs the K steps in one `run_steady` call then, or at an
    # arrival routed to it (`sync`), up to that instant.

    @property
    def coasting(self) -> bool:
        return self._coast is not None

    def begin_coast(self, now: float, max_steps: int = 4096) -> float | None:
        """Coast from `now` if the next steps are steady ones; the end of the last, or None
        (then `start_step` as usual)."""
        if not (self._may_coast and self.coast_enabled and self.step_clock is None):
            return None
        k, grows = self.core.steady_outlook(SYNTHETIC_TOKEN, max_steps)
        self._may_coast = k == max_steps  # then the next coast starts where this one ends
        if k < 2:
            return None
        ns = self._last_ns
        wb, erb, kvb, fpt, fpp, inv_bw, inv_rate, c0, c1 = self._fixed
        ctx = np.arange(1, k + 1, dtype=np.float64) * ns + self._last_ctx
        mem = (wb + (erb + kvb) * ns + kvb * ctx) * inv_bw
        cmp = (fpt * ns + fpp * ctx) * inv_rate
        ends = np.empty(k + 1)
        ends[0] = now
        ends[1:] = np.maximum(mem, cmp) + c0 + c1 * ns
        np.cumsum(ends, out=ends)  # sequential: each end is the last one + its step, as above
        self._coast = (ends, ns, grows)
        self.plan, self.busy = None, True
        return float(ends[k])

    def end_coast(self) -> None:
        """The coast's last step ended: run all its steps."""
        coast = self._coast
        assert coast is not None
        self._advance(len(coast[0]) - 1)

    def sync(self, now: float) -> float | None:
        """Stop coasting at `now`: run the steps that ended by then and start the one in
        flight; its end (the caller schedules it; the coast's own end is stale)."""
        coast = self._coast
        assert coast is not None
        ends = coast[0]
        k = int(ends.searchsorted(now, "right")) - 1  # ends[0] <= now: not a step's end
        if k:
            self._advance(k)
        else:
            self._coast = None
        self.gen += 1
        return self.start_step(float(ends[k]))

    def _advance(self, k: int) -> None:
        ends, ns, _ = self._coast  # type: ignore[misc]
        self._coast = None
        ran = self.core.run_steady(k, SYNTHETIC_TOKEN)
        if ran != k:
            raise RuntimeError(f"replica {self.index}: the core ran {ran} of {k} steady steps")
        stats = self.stats
        stats.steps += k
        stats.output_tokens += k * ns
        stats.itl.add_weighted(ends[1:k + 1] - ends[:k], ns)
        slots = self._pending[0]  # type: ignore[index]
        self._pending = (slots, float(ends[k]))
        self._last_ctx += k * ns
        self.plan, self.busy = None, False

    def finish_step(self, now: float) -> list[Finished]:
        """Commit the step that ends at `now`; account tokens; the requests it finished."""
        plan = self.plan
        assert plan is not None, "finish_step without a step started"
        stats = self.stats
        stats.steps += 1
        n = plan.num_samples
        out = self.core.commit(plan.id, self._tokens[n])
        fin = out.finished_handles
        if self._steady:
            slots, t = self._pending  # type: ignore[misc]
            self._itl_add(now - t, n)
            self._pending = (slots, now)
        elif n:
            self._flush_pending()
            slots = _and(plan.sample_handles, self._mask)
            gaps = now - self.last[slots]
            # A row without a last-token time is a first token. Usually a completed
            # prefill (after the decodes), but a prompt found cached up to its last token
            # is planned as a one-token decode row.
            first = np.isnan(gaps)
            if first.any():
                stats.ttft.add_many(now - self.arrival[slots[first]])
                stats.itl.add_many(gaps[~first])
            else:
                stats.itl.add_many(gaps)
            self._pending = (slots, now)
        stats.output_tokens += n
        self._steady = plan.num_decodes == n == plan.num_seqs and n > 0
        self._may_coast = self._steady and not self._added
        if not len(fin):
            return []
        self._flush_pending()
        done: list[Finished] = []
        for h in fin.tolist():
            spec = self.live.pop(h)
            self.owner[h & (self._cap - 1)] = -1
            st = self.core.request_stats(spec.request_id)
            stats.completed += 1
            stats.prompt_tokens += int(st["prompt_tokens"])
            stats.cached_prompt_tokens += int(st["cached_prompt_tokens"])
            stats.e2e.add(now - float(self.arrival[h & (self._cap - 1)]))
            stats.last_finish_s = now
            done.append(Finished(spec, int(st["output_tokens"])))
        return done
