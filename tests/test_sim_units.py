"""Simulator parts: histograms, trace parsing and its errors, routing, a fleet run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvserve.bench.workloads import RequestSpec, Workload
from kvserve.sim.fit import StepTimeModel
from kvserve.sim.profile import MemoryModel, Profile, ProfileError
from kvserve.sim.replica import ReplicaConfig
from kvserve.sim.routing import LeastLoad, RoundRobin, make_policy
from kvserve.sim.simulator import Simulator
from kvserve.sim.sources import AzureTraceSource, JsonlTraceSource, TraceError, WorkloadSource
from kvserve.sim.stats import LogHistogram
from kvserve.step_cost import ModelCost

SHAPE = {"num_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_heads": 32,
         "num_kv_heads": 8, "head_dim": 128, "vocab_size": 128256}


def gpu_like_profile() -> Profile:
    cost = ModelCost(1.5e10, 8192.0, 131072.0, 1.4e10, 524288.0)
    return Profile("cuda", "test GPU", "llama-8b-shape", SHAPE, "bfloat16", 8192, cost,
                   StepTimeModel(4.0e12, 7.0e14, 3e-4, 2e-6),
                   MemoryModel(80 * 2**30, 20 * 2**30), {"decode": {"n": 1, "mape": 1.0,
                                                                   "max_abs_pct": 1.0}})


def test_histogram_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(0)
    values = rng.lognormal(-4, 1.5, size=50_000)
    h = LogHistogram()
    for chunk in np.array_split(values, 997):
        h.add_many(chunk)
    h.add(0.02, 10_000)
    ref = np.concatenate([values, np.full(10_000, 0.02)])
    for p in (1, 50, 90, 99, 99.9):
        assert h.percentile(p) == pytest.approx(np.percentile(ref, p), rel=0.011)
    assert h.total == len(ref)
    assert h.mean() == pytest.approx(ref.mean(), rel=1e-9)


def test_profile_round_trip_and_errors(tmp_path: Path) -> None:
    p = gpu_like_profile()
    path = tmp_path / "p.json"
    p.save(path)
    q = Profile.load(path)
    assert q == p
    assert q.num_gpu_blocks(16, 0.9) == (int(80 * 2**30 * 0.9) - 20 * 2**30) // (131072 * 16)
    doc = json.loads(path.read_text())
    del doc["step_time"]["bandwidth_bytes_per_s"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="step_time.bandwidth_bytes_per_s"):
        Profile.load(path)
    path.write_text("{\n  not json")
    with pytest.raises(ProfileError, match=r"p\.json line 2"):
        Profile.load(path)
    with pytest.raises(ProfileError, match="hidden_size: profile 4096 vs model 576"):
        p.check_matches({**SHAPE, "hidden_size": 576})
    with pytest.raises(ProfileError, match="measured on cuda"):
        p.check_matches(device_type="cpu")


def test_azure_trace_parses_and_names_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:15:50.9951690,396,109\n")
    rows = list(AzureTraceSource(path, 32000).arrivals())
    assert [len(s.prompt_token_ids) for _, s in rows] == [374, 396]
    assert [s.max_tokens for _, s in rows] == [44, 109]
    assert rows[1][0] == pytest.approx(50.995169 - 46.68059, abs=1e-6)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0.5,12,x\n")
    with pytest.raises(TraceError, match=r"azure.csv:2: GeneratedTokens"):
        list(AzureTraceSource(path, 32000).arrivals())
    path.write_text("TIMESTAMP,Context\n0.5,12\n")
    with pytest.raises(TraceError, match="missing column ContextTokens"):
        list(AzureTraceSource(path, 32000).arrivals())


def test_jsonl_conversations_and_shared_prefixes(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = [
        {"timestamp": 0.0, "prompt_tokens": 100, "output_tokens": 10, "conversation": "a",
         "shared_prefix": "sys", "shared_prefix_tokens": 64},
        {"timestamp": 0.1, "prompt_tokens": 80, "output_tokens": 5,
         "shared_prefix": "sys", "shared_prefix_tokens": 64},
        {"timestamp": 0.2, "prompt_tokens": 130, "output_tokens": 5, "conversation": "a"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (_t0, a), (_, b), (t2, c) = list(JsonlTraceSource(path, 32000).arrivals())
    assert a.prompt_token_ids[:64] == b.prompt_token_ids[:64]
    assert a.prompt_token_ids[64:80] != b.prompt_token_ids[64:80]
    assert c.prompt_token_ids[:110] == a.prompt_token_ids + [5] * 10
    assert len(c.prompt_token_ids) == 130 and t2 == 0.2
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[2], "prompt_tokens": 50})
                    + "\n")
    with pytest.raises(TraceError, match=r"t.jsonl:2: prompt_tokens: 50 does not extend"):
        list(JsonlTraceSource(path, 32000).arrivals())
    path.write_text('{"timestamp": 1, "prompt_tokens": 3}\n')
    with pytest.raises(TraceError, match=r":1: output_tokens"):
        list(JsonlTraceSource(path, 32000).arrivals())
    path.write_text('{"timestamp": 1, "prompt_tokens": 3, "output_tokens": 1}\n{"timestamp": 0')
    with pytest.raises(TraceError, match=r":2: not JSON"):
        list(JsonlTraceSource(path, 32000).arrivals())


def test_routing_policies() -> None:
    class R:
        def __init__(self, w: int, r: int, kv: float) -> None:
            self.num_waiting, self.num_running, self.kv_usage = w, r, kv

    reps = [R(1, 4, 0.5), R(0, 3, 0.9), R(0, 3, 0.2)]
    assert LeastLoad().choose(reps, None) == 2
    rr = RoundRobin()
    assert [rr.choose(reps, None) for _ in range(4)] == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="router"):
        make_policy("closest")


def _fleet(profile: Profile, replicas: int, blocks: int | None = None) -> Simulator:
    cfg = ReplicaConfig(num_gpu_blocks=blocks or profile.num_gpu_blocks(16), num_host_blocks=0,
                        max_model_len=4096, max_num_seqs=64, max_waiting=64)
    return Simulator(profile, cfg, replicas, LeastLoad(), 0.5)


def test_fleet_run_returns_every_block_and_counts() -> None:
    p = gpu_like_profile()
    sim = _fleet(p, 3, blocks=400)  # a small pool: preemption and eviction happen
    w = Workload("multiturn", 32000, 4096, seed=1, think_time_s=0.2, turns=3)
    result = sim.run(WorkloadSource(w, rate=30.0, duration_s=5.0, seed=1))
    s = result.summary()
    assert s["completed"] + s["refused_total"] == s["requests_sent"] > 100
    assert s["prefix_hit_rate"] > 0
    assert s["preemptions"] > 0
    assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"]
    assert s["itl_ms"]["p50"] > 0 and s["kv_usage_max"] > 0.5
    for r in sim.replicas:
        r.core.check_invariants()
        assert r.core.num_used_gpu_blocks == 0 and not r.live


def test_prefix_hits_follow_the_conversation_on_one_large_replica() -> None:
    p = gpu_like_profile()
    w = Workload("multiturn", 32000, 4096, seed=1, think_time_s=0.2, turns=3)
    one = _fleet(p, 1).run(WorkloadSource(w, rate=5.0, duration_s=5.0, seed=1)).summary()
    # Turns 2 and 3 find their whole history cached: well over half their prompt.
    assert one["prefix_hit_rate"] > 0.4 and one["preemptions"] == 0


def test_single_request_latency_is_the_modelled_step_times() -> None:
    p = gpu_like_profile()
    sim = _fleet(p, 1)
    w = Workload("synthetic", 32000, 4096, seed=3)
    sim.run(WorkloadSource(w, rate=1.0, num_requests=1, seed=0))
    spec = Workload("synthetic", 32000, 4096, seed=3).new_request(0)
    n = len(spec.prompt_token_ids)
    prefill = p.step_seconds(n, 1, n, n * (n + 1) / 2)
    decode = [p.step_seconds(1, 1, n + k, n + k) for k in range(1, spec.max_tokens)]
    s = sim.stats
    assert s.ttft.percentile(50) == pytest.approx(prefill, rel=0.01)
    assert s.e2e.percentile(50) == pytest.approx(prefill + sum(decode), rel=0.01)
    assert s.itl.total == spec.max_tokens - 1


def test_sim_and_plan_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               tiny_llama_dir: Path) -> None:
    from kvserve.cli import main

    prof = tmp_path / "gpu.json"
    gpu_like_profile().save(prof)
    out = tmp_path / "out"
    assert main(["sim", "--profile", str(prof), "--workload", "multiturn", "--rate", "8",
                 "--replicas", "2", "--duration", "3", "--out", str(out), "--no-progress",
                 "--router", "round-robin"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["summary"]["completed"] > 10 and doc["meta"]["replicas"] == 2
    assert (out / "load_over_time.png").stat().st_size > 0
    assert "2x round-robin" in capsys.readouterr().out

    assert main(["plan", "--profile", str(prof), "--workload", "synthetic", "--rate", "4",
                 "--duration", "2", "--slo", "ttft_p99=2s,itl_p99=80ms", "--max-replicas", "4",
                 "--no-refusal-search"]) == 0
    assert "smallest fleet meeting ttft_p99=2000ms,itl_p99=80ms at 4 req/s: 1 replicas" \
        in capsys.readouterr().out

    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"timestamp": 0, "prompt_tokens": 0, "output_tokens": 3}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: prompt_tokens"):
        main(["sim", "--profile", str(prof), "--trace", str(trace), "--out", str(out),
              "--no-progress", "--no-plots"])
    with pytest.raises(SystemExit, match="for another model shape"):
        main(["sim", "--profile", str(prof), "--model", str(tiny_llama_dir), "--out", str(out),
              "--duration", "1", "--no-progress", "--no-plots"])
    with pytest.raises(SystemExit, match="slo: 'ttft' is not one of"):
        main(["plan", "--profile", str(prof), "--rate", "1", "--slo", "ttft=2s"])


def test_ctrl_c_returns_the_partial_result() -> None:
    p = gpu_like_profile()
    w = Workload("synthetic", 32000, 4096, seed=2)
    inner = WorkloadSource(w, rate=20.0, duration_s=60.0, seed=2)

    class Interrupting:
        def arrivals(self) -> Iterator[tuple[float, RequestSpec]]:
            for n, item in enumerate(inner.arrivals()):
                if n == 50:
                    raise KeyboardInterrupt
                yield item

        def follow_up(self, spec: RequestSpec, output_tokens: int) -> None:
            return None

    result = _fleet(p, 2).run(Interrupting())
    s = result.summary()
    assert result.interrupted and s["interrupted"]
    assert 0 < s["completed"] <= s["requests_sent"] <= 50
    assert s["simulated_s"] < 60.0


def test_first_token_of_a_fully_cached_prompt_counts_as_ttft() -> None:
    # The second request's prompt is all cached but its last token, so the core plans it
    # as a one-token (decode) row; its first token is still a first token, not a gap.
    prompt = list(range(100, 133))

    class Twice:
        def arrivals(self) -> Iterator[tuple[float, RequestSpec]]:
            yield 0.0, RequestSpec("a", prompt, 4)
            yield 1.0, RequestSpec("b", prompt, 4)

        def follow_up(self, spec: RequestSpec, output_tokens: int) -> None:
            return None

    sim = _fleet(gpu_like_profile(), 1)
    s = sim.run(Twice()).summary()
    assert s["completed"] == 2 and s["prefix_hit_rate"] > 0.4
    assert sim.stats.ttft.total == 2 and sim.stats.itl.total == 6
    assert sim.stats.itl.percentile(100) < 0.1  # no gap spans the idle second


def test_a_router_policy_object_plugs_in() -> None:
    seen: list[int] = []

    class Last:
        """Sends everything to the last replica and records what it was shown."""

        def choose(self, replicas: list, request: RequestSpec) -> int:
            seen.append(len(replicas))
            assert all(hasattr(r, a) for r in replicas
                       for a in ("num_running", "num_waiting", "kv_usage", "core"))
            return len(replicas) - 1

    p = gpu_like_profile()
    cfg = ReplicaConfig(num_gpu_blocks=2000, num_host_blocks=0, max_model_len=4096)
    sim = Simulator(p, cfg, 3, Last(), 0.5)
    w = Workload("synthetic", 32000, 4096, seed=4)
    s = sim.run(WorkloadSource(w, rate=10.0, num_requests=20, seed=4)).summary()
    assert s["completed"] == 20 and seen == [3] * 20
    assert [r.core.metrics()["requests_added"] for r in sim.replicas] == [0, 0, 20]
