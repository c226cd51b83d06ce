"""The roofline token budget: the largest chunk under the ITL target, checked by brute force."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvserve.sim.budget import auto_token_budget, mixed_step_seconds
from test_sim_units import gpu_like_profile


@pytest.mark.parametrize("target_ms, seqs", [(20, 64), (50, 256), (80, 8), (200, 32)])
def test_budget_is_the_largest_chunk_under_target(target_ms: float, seqs: int) -> None:
    p = gpu_like_profile()
    choice = auto_token_budget(p, target_ms / 1e3, seqs)
    chunk = choice.max_num_batched_tokens - (seqs - 1)
    assert chunk % 16 == 0
    assert mixed_step_seconds(p, chunk, seqs - 1, 1024) <= target_ms / 1e3
    assert mixed_step_seconds(p, chunk + 16, seqs - 1, 1024) > target_ms / 1e3
    assert "itl target" in choice.reason


def test_budget_when_decodes_alone_miss_the_target() -> None:
    p = gpu_like_profile()
    choice = auto_token_budget(p, 1e-3, 256)
    assert choice.max_num_batched_tokens == 256 and "alone take" in choice.reason
    with pytest.raises(ValueError, match="itl_target"):
        auto_token_budget(p, 0.0, 8)


def test_engine_args_auto_budget(tmp_path: Path) -> None:
    import argparse

    from kvserve.engine_args import EngineArgs

    path = tmp_path / "p.json"
    gpu_like_profile().save(path)
    want = auto_token_budget(gpu_like_profile(), 0.03, 64, 1024).max_num_batched_tokens
    args = EngineArgs(max_num_batched_tokens="auto", profile=str(path), itl_target=0.03,
                      max_num_seqs=64)
    assert args.max_num_batched_tokens == want
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--max-num-batched-tokens", "auto", "--profile", str(path),
                            "--itl-target", "0.03", "--max-num-seqs", "64"])
    assert EngineArgs.from_cli_args(ns).max_num_batched_tokens == want
    with pytest.raises(ValueError, match="max_num_batched_tokens: 'auto' needs a profile"):
        EngineArgs(max_num_batched_tokens="auto")
