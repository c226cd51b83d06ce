"""`--executor sim`: the real engine with modelled step times and synthetic tokens."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvserve.engine import LLMEngine
from kvserve.engine_args import EngineArgs
from kvserve.model import load_checkpoint
from kvserve.sampling_params import SamplingParams
from kvserve.sim.calibrate import model_shape
from kvserve.sim.fit import StepTimeModel
from kvserve.sim.profile import MemoryModel, Profile
from kvserve.step_cost import ModelCost


def _profile(path: Path, shape: dict[str, int], step_s: float) -> Path:
    cost = ModelCost(1e6, 256.0, 512.0, 1e6, 1e3)
    Profile("cpu", "test", "tiny", shape, "float32", 512, cost,
            StepTimeModel(1e15, 1e15, step_s, 0.0), MemoryModel(0, 0), {}).save(path)
    return path


def test_sim_executor_serves_with_modelled_step_times(tiny_llama_dir: Path,
                                                      tmp_path: Path) -> None:
    shape = model_shape(load_checkpoint(tiny_llama_dir).config)
    prof = _profile(tmp_path / "p.json", shape, 0.02)
    engine = LLMEngine(EngineArgs(model=str(tiny_llama_dir), executor="sim",
                                  profile=str(prof), kv_cache_memory=64 * 16 * 512))
    assert engine.runner.num_blocks == 64  # the profile's KV bytes per token sized the pool
    durations: list[float] = []
    engine.add_step_listener(lambda s: durations.append(s.duration_s))
    engine.add_request("g", None, SamplingParams(temperature=0.0, max_tokens=5),
                       prompt_token_ids=[5, 6, 7, 8])
    engine.add_request("s", None, SamplingParams(temperature=1.0, max_tokens=5, seed=1),
                       prompt_token_ids=[9, 10, 11])
    outs: dict[str, list[int]] = {"g": [], "s": []}
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for d in engine.step():
            outs[d.request_id].extend(d.token_ids)
    wall = time.perf_counter() - t0
    assert outs["g"] == [engine.runner.token_id] * 5
    assert len(outs["s"]) == 5 and all(0 <= t < engine.vocab_size for t in outs["s"])
    assert len(durations) == 5 and min(durations) >= 0.02
    assert wall >= 5 * 0.02
    assert engine.core.num_used_gpu_blocks == 0


def test_sim_executor_errors_name_the_field(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="executor: 'sim' needs a profile"):
        LLMEngine(EngineArgs(model=str(tiny_llama_dir), executor="sim"))
    shape = {**model_shape(load_checkpoint(tiny_llama_dir).config), "hidden_size": 4096}
    prof = _profile(tmp_path / "other.json", shape, 0.01)
    with pytest.raises(ValueError, match="for another model shape"):
        LLMEngine(EngineArgs(model=str(tiny_llama_dir), executor="sim", profile=str(prof)))
    with pytest.raises(ValueError, match="executor: 'gpu' is not one of"):
        EngineArgs(executor="gpu")
