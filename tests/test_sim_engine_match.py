"""The simulator's scheduler decisions equal the real engine's for the same arrivals when
the modelled step time is replaced by the time each real step took."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvserve.bench.workloads import RequestSpec
from kvserve.engine import LLMEngine
from kvserve.engine_args import EngineArgs
from kvserve.sampling_params import SamplingParams
from kvserve.sim.fit import StepTimeModel
from kvserve.sim.profile import MemoryModel, Profile
from kvserve.sim.replica import ReplicaConfig
from kvserve.sim.routing import RoundRobin
from kvserve.sim.simulator import Simulator


def _arrivals(seed: int, vocab: int) -> list[tuple[float, RequestSpec]]:
    """Poisson arrivals; half the prompts share one of two system prompts (prefix hits)."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(3, vocab, size=48).tolist() for _ in range(2)]
    t, out = 0.0, []
    for i in range(20):
        t += float(rng.exponential(0.004))
        tail = rng.integers(3, vocab, size=int(rng.integers(4, 90))).tolist()
        prompt = systems[i % 2] + tail if i % 3 else tail
        out.append((t, RequestSpec(f"r{i}", prompt, int(rng.integers(2, 40)))))
    return out


def _plan_key(plan: object) -> tuple:
    p = plan  # type: ignore[assignment]
    return (tuple(p.handles.tolist()), tuple(np.diff(p.query_start_loc).tolist()),
            tuple(p.seq_lens.tolist()), int(p.num_decodes), len(p.swap_out), len(p.swap_in),
            len(p.copies))


class _Recorder:
    """Wraps the engine's core: keeps every non-empty plan's key."""

    def __init__(self, core: object) -> None:
        self.core, self.keys = core, []

    def schedule(self) -> object:
        plan = self.core.schedule()  # type: ignore[attr-defined]
        if plan.num_seqs:
            self.keys.append(_plan_key(plan))
        return plan

    def __getattr__(self, name: str) -> object:
        return getattr(self.core, name)


def _run_engine(engine: LLMEngine, arrivals: list[tuple[float, RequestSpec]]
                ) -> tuple[list[tuple], list[float]]:
    """The engine on a clock that advances by each step's measured time; requests join
    when the clock passes their arrival, as the simulator's event loop does."""
    recorder = _Recorder(engine.core)
    engine.core = recorder  # type: ignore[assignment]
    durations: list[float] = []
    engine.add_step_listener(lambda s: durations.append(s.duration_s))
    clock, i = 0.0, 0
    while i < len(arrivals) or engine.has_unfinished():
        if not engine.has_unfinished() and arrivals[i][0] > clock:
            clock = arrivals[i][0]  # idle: jump to the next arrival
        while i < len(arrivals) and arrivals[i][0] <= clock:
            spec = arrivals[i][1]
            engine.add_request(spec.request_id, None,
                               SamplingParams(temperature=0.0, max_tokens=spec.max_tokens,
                                              ignore_eos=True),
                               prompt_token_ids=spec.prompt_token_ids)
            i += 1
        before = len(durations)
        engine.step()
        if len(durations) > before:
            clock += durations[-1]
    engine.core = recorder.core  # type: ignore[assignment]
    return recorder.keys, durations


class _ListSource:
    def __init__(self, arrivals: list[tuple[float, RequestSpec]]) -> None:
        self._arrivals = arrivals

    def arrivals(self):
        return iter(self._arrivals)

    def follow_up(self, spec: RequestSpec, output_tokens: int) -> None:
        return None


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_sim_plans_equal_engine_plans(tiny_llama_dir: Path, mode: str) -> None:
    # A pool of 24 blocks (384 tokens) for 20 requests: preemption happens.
    args = EngineArgs(model=str(tiny_llama_dir), max_model_len=256, max_num_seqs=8,
                      max_num_batched_tokens=96, kv_cache_memory=24 * 16 * 512,
                      swap_space=64 * 16 * 512, preemption_mode=mode, seed=0)
    engine = LLMEngine(args)
    assert engine.runner.num_blocks == 24
    arrivals = _arrivals(1, engine.vocab_size)
    real_keys, durations = _run_engine(engine, arrivals)
    metrics = engine.metrics()
    assert metrics["preemptions"] > 0 and metrics["prefix_hits_tokens"] > 0
    if mode == "swap":
        assert metrics["preemptions_swap"] > 0

    cfg = engine.runner.config
    shape = {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
             "intermediate_size": cfg.intermediate_size, "num_heads": cfg.num_heads,
             "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
             "vocab_size": cfg.vocab_size}
    profile = Profile("cpu", "test", "tiny", shape, "float32", 256, engine.cost,
                      StepTimeModel(1e9, 1e9, 0.0, 0.0), MemoryModel(0, 0), {})
    config = ReplicaConfig(num_gpu_blocks=engine.runner.num_blocks,
                           num_host_blocks=engine.runner.num_host_blocks, max_model_len=256,
                           max_num_seqs=8, max_num_batched_tokens=96, preemption_mode=mode)
    sim = Simulator(profile, config, 1, RoundRobin())
    sim_keys: list[tuple] = []
    measured = iter(durations)

    def clock(plan: object) -> float:
        sim_keys.append(_plan_key(plan))
        return next(measured)

    sim.replicas[0].step_clock = clock
    result = sim.run(_ListSource(arrivals))
    assert len(sim_keys) == len(real_keys)
    for n, (a, b) in enumerate(zip(sim_keys, real_keys)):
        assert a == b, f"step {n} differs"
    assert result.stats.completed == len(arrivals)
    core = sim.replicas[0].core
    core.check_invariants()
    assert core.num_used_gpu_blocks == 0 and not core.has_unfinished()
    sm = core.metrics()
    for key in ("preemptions", "prefix_hits_tokens", "recomputed_tokens", "swapped_out_blocks"):
        assert sm[key] == metrics[key], key
