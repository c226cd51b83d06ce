"""The per-step token budget from the roofline: the largest prefill chunk whose modelled
mixed step (the chunk plus a running decode batch) stays under an inter-token target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvserve.device_peaks import device_peaks
from kvserve.sim.fit import StepTimeModel
from kvserve.sim.profile import SHAPE_FIELDS, MemoryModel, Profile
from kvserve.step_cost import ModelCost

if TYPE_CHECKING:
    from kvserve.model.config import ModelConfig


@dataclass(frozen=True)
class BudgetChoice:
    max_num_batched_tokens: int
    step_s: float  # the modelled mixed step at that budget
    reason: str


def mixed_step_seconds(profile: Profile, chunk: int, decodes: int, context: int) -> float:
    """`decodes` decodes at `context` tokens each, plus one `chunk`-token prefill over
    nothing cached."""
    tokens = chunk + decodes
    ctx = decodes * context + chunk
    pairs = decodes * context + chunk * (chunk + 1) / 2
    return profile.step_seconds(tokens, decodes + (1 if chunk else 0), ctx, pairs)


def datasheet_profile(model: ModelConfig, device_name: str, dtype_bytes: int,
                      kv_bytes_per_token: int, max_model_len: int) -> Profile | None:
    """A step-time model without a calibration: the model's bytes and FLOPs from its
    dimensions over the device's datasheet peaks (a pure roofline, no overheads); None for
    a device not in the table."""
    peaks = device_peaks(device_name)
    if peaks is None:
        return None
    flops, bandwidth = peaks
    # Every weight but the input embedding table (tied: the table is the output head too).
    table = 0 if model.tie_word_embeddings else model.vocab_size * model.hidden_size
    cost = ModelCost(
        weight_bytes=float((model.num_params - table) * dtype_bytes),
        embed_row_bytes=float(model.hidden_size * dtype_bytes),
        kv_bytes_per_token=float(kv_bytes_per_token),
        flops_per_token=model.flops_per_token,
        attn_flops_per_pair=4.0 * model.num_layers * model.num_heads * model.head_dim)
    shape = {k: int(getattr(model, k)) for k in SHAPE_FIELDS}
    return Profile("cuda", device_name, model.name, shape, f"{dtype_bytes} bytes",
                   max_model_len, cost, StepTimeModel(bandwidth, flops, 0.0, 0.0),
                   MemoryModel(0, 0), {}, {"source": "datasheet peaks, not calibrated"})


def auto_token_budget(profile: Profile, itl_target_s: float, max_num_seqs: int,
                      context: int = 1024, block_size: int = 16,
                      limit: int = 1 << 16) -> BudgetChoice:
    """Largest budget (a multiple of block_size) whose mixed step with max_num_seqs - 1
    decodes at `context` stays under itl_target_s; at least one token per sequence."""
    if itl_target_s <= 0:
        raise ValueError(f"itl_target: must be > 0 s, got {itl_target_s}")
    decodes = max(max_num_seqs - 1, 0)
    floor_s = mixed_step_seconds(profile, 0, decodes, context)
    ridge = profile.ridge_flops_per_byte()
    if floor_s > itl_target_s:
        return BudgetChoice(max_num_seqs, floor_s,
                            f"{decodes} decodes at {context} tokens alone take "
                            f"{floor_s * 1e3:.1f} ms > itl target {itl_target_s * 1e3:g} ms; "
                            f"budget = max_num_seqs")
    lo, hi = 0, limit // block_size  # in blocks; lo fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mixed_step_seconds(profile, mid * block_size, decodes, context) <= itl_target_s:
            lo = mid
        else:
            hi = mid
    chunk = lo * block_size
    budget = max(chunk + decodes, max_num_seqs)
    step = mixed_step_seconds(profile, chunk, decodes, context)
    return BudgetChoice(budget, step,
                        f"a {chunk}-token chunk beside {decodes} decodes at {context} tokens "
                        f"is modelled at {step * 1e3:.1f} ms <= itl target "
                        f"{itl_target_s * 1e3:g} ms (ridge {ridge:.0f} FLOP/B on "
                        f"{profile.device_name})")
