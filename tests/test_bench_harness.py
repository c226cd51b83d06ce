"""The load generator's workloads, driver and report, against a scripted client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import numpy as np
import pytest

from kvserve.bench import report
from kvserve.bench.driver import StreamEvent, run_load
from kvserve.bench.workloads import WORKLOADS, RequestSpec, Workload, poisson_arrivals


class ScriptedClient:
    """Answers each request with max_tokens tokens in random-sized deltas.

    The cached prompt tokens it reports are the prefix it has seen before, block-aligned,
    the way a prefix cache would; it refuses every request whose id is in `refuse`.
    """

    def __init__(self, seed: int, refuse: frozenset[str] = frozenset()) -> None:
        self.rng = np.random.default_rng(seed)
        self.seen: list[list[int]] = []
        self.refuse = refuse
        self.sent: list[RequestSpec] = []

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        self.sent.append(spec)
        if spec.request_id in self.refuse:
            raise RuntimeError("at capacity")
        cached = max((_common(p, spec.prompt_token_ids) for p in self.seen), default=0)
        cached = min(cached, len(spec.prompt_token_ids) - 1) // 16 * 16
        self.seen.append(spec.prompt_token_ids)
        left = spec.max_tokens
        while left:
            k = int(min(left, self.rng.integers(1, 4)))
            left -= k
            await asyncio.sleep(0)
            yield StreamEvent(
                token_ids=self.rng.integers(0, 1000, size=k).tolist(),
                finished=left == 0,
                finish_reason="length" if left == 0 else None,
                cached_prompt_tokens=cached,
            )

    async def load(self) -> dict[str, float]:
        return {"preemptions_recompute": 0.0, "preemptions_swap": 0.0, "recomputed_tokens": 0.0}

    async def limits(self) -> tuple[int, int]:
        return 4096, 2048


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("name", WORKLOADS)
def test_workload_lengths_fit_and_repeat_with_seed(name: str) -> None:
    a, b = Workload(name, 5000, 1024, seed=3), Workload(name, 5000, 1024, seed=3)
    for i in range(50):
        sa, sb = a.new_request(i), b.new_request(i)
        assert sa == sb
        assert 1 <= len(sa.prompt_token_ids) and len(sa.prompt_token_ids) + sa.max_tokens < 1024
        assert all(0 <= t < 5000 for t in sa.prompt_token_ids)


def test_workload_shapes_contrast() -> None:
    pre = [Workload("prefill-heavy", 5000, 8192, seed=s).new_request(0) for s in range(20)]
    dec = [Workload("decode-heavy", 5000, 8192, seed=s).new_request(0) for s in range(20)]
    assert min(len(s.prompt_token_ids) for s in pre) > max(s.max_tokens for s in pre)
    assert min(s.max_tokens for s in dec) > max(len(s.prompt_token_ids) for s in dec)


def test_follow_up_extends_previous_turn_exactly() -> None:
    w = Workload("multiturn", 5000, 4096, seed=1, turns=3)
    first = w.new_request(7)
    answer = list(range(500, 540))
    second = w.follow_up(first, answer)
    assert second is not None and second.turn == 1 and second.conversation == 7
    assert second.prompt_token_ids[: len(first.prompt_token_ids) + 40] == (
        first.prompt_token_ids + answer
    )
    third = w.follow_up(second, answer)
    assert third is not None and w.follow_up(third, answer) is None  # 3 turns in all


def test_bad_workload_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="workload"):
        Workload("chatty", 5000, 1024)
    with pytest.raises(ValueError, match="vocab_size"):
        Workload("synthetic", 10, 1024)


def test_poisson_arrivals_have_the_asked_rate() -> None:
    t = poisson_arrivals(20000, rate=8.0, seed=0)
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert abs(len(t) / t[-1] - 8.0) < 0.3
    assert not poisson_arrivals(5, rate=0, seed=0).any()  # 'inf': all at once


def test_driver_records_every_request_and_summary_adds_up(tmp_path) -> None:
    client = ScriptedClient(seed=0, refuse=frozenset({"bench-5"}))
    w = Workload("multiturn", 4096, 2048, seed=2, think_time_s=0.001, turns=3)
    run = asyncio.run(run_load(client, w, num_requests=30, rate=0, concurrency=4, seed=2))
    assert len(run.records) == len(client.sent)
    assert 20 <= len(run.records) <= 30  # a refused first turn ends its conversation
    by_id = {r.request_id: r for r in run.records}
    assert by_id["bench-5"].error is not None and not by_id["bench-5"].ok
    for spec in client.sent:
        r = by_id[spec.request_id]
        if r.ok:
            assert len(r.output_token_ids) == spec.max_tokens
            assert len(r.token_gaps_s) == spec.max_tokens - 1  # all but the first token
    s = report.summarise(run)
    ok = [r for r in run.records if r.ok]
    assert s.completed == len(ok) and s.failed == 1 and s.errors == {"RuntimeError": 1}
    prompt = sum(r.prompt_tokens for r in ok)
    assert s.prefix_hit_rate == pytest.approx(sum(r.cached_prompt_tokens for r in ok) / prompt)
    assert s.prefix_hit_rate > 0.3  # later turns hit their conversation's earlier turns
    e2e = [r.e2e_s * 1e3 for r in ok]
    assert s.e2e_ms["p50"] == pytest.approx(np.percentile(e2e, 50))
    out_tokens = sum(len(r.output_token_ids) for r in ok)
    assert s.output_token_throughput == pytest.approx(out_tokens / run.duration_s)

    report.write_json(tmp_path / "r.json", [s], [run], {"workload": "multiturn"})
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["summaries"][0]["completed"] == s.completed
    assert len(doc["requests"][0]) == len(run.records)
    table = report.format_table([s])
    assert "TTFT" in table and len(table.splitlines()) == 3


def test_plots_are_png_files(tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib")
    runs, sums = [], []
    for rate in (50.0, 200.0):
        w = Workload("synthetic", 4096, 512, seed=4)
        run = asyncio.run(run_load(ScriptedClient(seed=1), w, num_requests=12, rate=rate))
        runs.append(run)
        sums.append(report.summarise(run))
    paths = report.write_plots(tmp_path, sums, runs)
    assert [p.name for p in paths] == ["latency_cdf.png", "rate_sweep.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_kvserve_bench_in_process_end_to_end(tiny_llama_dir, tmp_path, capsys) -> None:
    """The real command against the real engine: every request completes, turns hit cache."""
    from kvserve.cli import main

    out = tmp_path / "bench"
    rc = main([
        "bench", "--model", str(tiny_llama_dir), "--workload", "multiturn", "--turns", "2",
        "--think-time", "0.01", "--num-requests", "8", "--rate", "inf", "--out", str(out),
        "--max-model-len", "256", "--kv-cache-memory", "4MiB", "--no-plots",
    ])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    (summary,) = doc["summaries"]
    assert summary["completed"] == summary["requests"] == 8 and summary["failed"] == 0
    assert summary["prefix_hit_rate"] > 0  # second turns reuse their first turn's blocks
    assert all(r["finish_reason"] == "length" for r in doc["requests"][0])
    assert "TTFT" in capsys.readouterr().out


def test_full_context_starts_a_fresh_conversation_keeping_the_turn_count() -> None:
    w = Workload("multiturn", 5000, 300, seed=5, turns=3)
    first = w.new_request(0)
    nxt = w.follow_up(first, list(range(300 - len(first.prompt_token_ids))))
    assert nxt is not None and nxt.turn == 0 and nxt.turns_left == first.turns_left - 1
    assert nxt.conversation != first.conversation and nxt.request_id != first.request_id


def test_kvserve_bench_against_a_running_server(tiny_llama_dir, tmp_path) -> None:
    """`kvserve bench --server`: the same report, the load sent over gRPC and over HTTP."""
    from kvserve.cli import main
    from kvserve.server.testing import ServerProcess

    flags = ["--model", str(tiny_llama_dir), "--device", "cpu", "--max-model-len", "256",
             "--kv-cache-memory", "4MiB"]
    with ServerProcess(flags).start() as server:
        summaries = []
        for i, target in enumerate((server.target, server.http_url)):
            out = tmp_path / f"bench{i}"
            rc = main(["bench", "--server", target, "--workload", "multiturn",
                       "--turns", "2", "--think-time", "0.01", "--num-requests", "6",
                       "--rate", "50", "--seed", str(10 * i), "--out", str(out), "--no-plots"])
            assert rc == 0, server.log()
            doc = json.loads((out / "results.json").read_text())
            summaries.append(doc["summaries"][0])
            assert all(r["finish_reason"] == "length" for r in doc["requests"][0])
    for summary in summaries:
        assert summary["completed"] == summary["requests"] == 6
        assert summary["prefix_hit_rate"] > 0


def test_shared_prefix_prompts_start_with_one_of_the_system_prompts() -> None:
    w = Workload("shared-prefix", 5000, 1024, seed=6, system_prompts=3, system_prompt_len=200)
    specs = [w.new_request(i) for i in range(60)]
    heads = {tuple(s.prompt_token_ids[:200]) for s in specs}
    assert len(heads) == 3, "every prompt opens with one of the three system prompts"
    tails = {tuple(s.prompt_token_ids[200:]) for s in specs}
    assert len(tails) == 60, "and goes on with its own question"
    assert all(216 <= len(s.prompt_token_ids) < 264 and s.max_tokens >= 1 for s in specs)
    assert w.follow_up(specs[0], [1, 2]) is None
    with pytest.raises(ValueError, match="system_prompts"):
        Workload("shared-prefix", 5000, 1024, system_prompts=0)
