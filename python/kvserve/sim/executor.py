"""`--executor sim`: the engine's model runner replaced by the step-time model.

The real engine, core, sampler and server run; each step sleeps for the profile's modelled
time of its plan and yields synthetic tokens (one fixed id for greedy rows; uniform random
ids otherwise). No weights are loaded and no KV cache is allocated, so many such replicas
fit on one machine.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvserve.sim.profile import Profile
from kvserve.step_cost import attention_pairs

if TYPE_CHECKING:
    from kvserve._core import Plan


class _WeightBytes:
    """What the engine asks the model for (weight bytes a step reads), from the profile."""

    def __init__(self, profile: Profile) -> None:
        self.cost = profile.cost

    def weight_bytes_read(self, num_tokens: int) -> int:
        return int(self.cost.weight_bytes + self.cost.embed_row_bytes * num_tokens)


class SimRunner:
    """Stands in for ModelRunner: same attributes the engine reads, modelled execute()."""

    def __init__(self, config: Any, args: Any, vocab_size: int) -> None:
        from kvserve.sim.calibrate import model_shape

        if args.profile is None:
            raise ValueError("executor: 'sim' needs a profile (--profile, from "
                             "`kvserve calibrate`)")
        profile = Profile.load(args.profile)
        profile.check_matches(model_shape(config), source=args.profile)
        self.profile, self.config = profile, config
        self.model = _WeightBytes(profile)
        self.kv_bytes_per_token = int(profile.cost.kv_bytes_per_token)
        self.block_bytes = self.kv_bytes_per_token * args.block_size
        self.num_blocks = profile.num_gpu_blocks(args.block_size, args.gpu_memory_utilization,
                                                 args.kv_cache_bytes)
        self.num_host_blocks = args.swap_bytes // self.block_bytes
        if args.host_kv_cache_bytes:
            raise ValueError("host_kv_cache: the sim executor models no host tier")
        self.num_host_tier_blocks = 0
        self.link_bytes_per_s: tuple[float, float] | None = None
        self.prefill_flops_per_s: float | None = None
        self.vocab_size = vocab_size
        # A fixed ordinary id (clear of the low ids where special tokens live).
        self.token_id = min(1000, vocab_size // 2)
        self.last_greedy: torch.Tensor | None = None
        self.steps = 0

    def step_seconds(self, plan: Plan) -> float:
        ctx = float(plan.seq_lens.sum())
        pairs = attention_pairs(np.diff(plan.query_start_loc), plan.seq_lens)
        return self.profile.step_seconds(int(plan.num_tokens), int(plan.num_seqs), ctx, pairs)

    def execute(self, plan: Plan, greedy_only: bool = False) -> torch.Tensor | None:
        self.last_greedy = None
        if plan.num_tokens == 0:
            return None
        start = time.perf_counter()
        n = int(plan.num_samples)
        if greedy_only:
            self.last_greedy = torch.full((n,), self.token_id, dtype=torch.long)
            logits = torch.zeros(n, 1)  # unread: the sampler takes last_greedy
        else:
            logits = torch.zeros(n, self.vocab_size)
            logits[:, self.token_id] = 1.0
        self.steps += 1
        left = self.step_seconds(plan) - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)
        return logits

    def wait_copies(self) -> bool:
        return True  # no host tier, and swaps are only modelled

    def close(self) -> None:
        pass
