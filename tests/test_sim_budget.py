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
    # Without a profile "auto" waits for the engine (the model and the device).
    assert EngineArgs().max_num_batched_tokens == "auto"



LLAMA_8B = dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
                intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                head_dim=128, max_position_embeddings=8192, name="llama-8b-shape")


def test_datasheet_roofline_budget_without_a_profile(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from kvserve.device_peaks import ridge_point
    from kvserve.engine_args import EngineArgs
    from kvserve.model.config import ModelConfig
    from kvserve.sim.budget import datasheet_profile

    cfg = ModelConfig(**LLAMA_8B)  # type: ignore[arg-type]
    kv = 2 * 32 * 8 * 128 * 2
    prof = datasheet_profile(cfg, "NVIDIA H200", 2, kv, 8192)
    assert prof is not None
    assert prof.ridge_flops_per_byte() == pytest.approx(ridge_point("NVIDIA H200"))
    # The roofline of one decode by hand: every weight but the input table, over 4.8 TB/s.
    weights = (cfg.num_params - cfg.vocab_size * cfg.hidden_size) * 2
    one = (weights + 4096 * 2 + kv * 101) / 4.8e12
    assert prof.step_seconds(1, 1, 100, 100) == pytest.approx(one)
    args = EngineArgs(max_num_seqs=64, itl_target=0.03)
    with caplog.at_level(logging.INFO, logger="kvserve.engine_args"):
        budget = args.resolve_token_budget(prof, 8192, "NVIDIA H200")
    assert args.max_num_batched_tokens == budget
    chunk = budget - 63
    assert mixed_step_seconds(prof, chunk, 63, 1024) <= 0.03 < mixed_step_seconds(
        prof, chunk + 16, 63, 1024)
    assert 64 < budget < 1 << 16
    assert "datasheet peaks" in caplog.text and f"auto = {budget}" in caplog.text
    # A device with no datasheet entry has no ridge point: the default, and why.
    assert datasheet_profile(cfg, "cpu", 4, kv, 8192) is None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvserve.engine_args"):
        assert EngineArgs().resolve_token_budget(None, 8192, "cpu") == 2048
    assert "no datasheet peaks for cpu" in caplog.text
    # A number is kept as given.
    assert EngineArgs(max_num_batched_tokens=512).resolve_token_budget(prof) == 512


def test_engine_resolves_auto_at_start(tiny_llama_dir: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from kvserve.engine import LLMEngine
    from kvserve.engine_args import EngineArgs

    with caplog.at_level(logging.INFO, logger="kvserve.engine_args"):
        engine = LLMEngine(EngineArgs(model=str(tiny_llama_dir), device="cpu",
                                      kv_cache_memory="8MiB", swap_space=0))
    assert engine.args.max_num_batched_tokens == 2048
    assert engine.core.max_num_batched_tokens == 2048
    assert "max_num_batched_tokens auto = 2048" in caplog.text
