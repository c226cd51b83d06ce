"""The core's host prefix tier through the binding, against a simulated paged KV cache.

`TierSim` executes each plan the way the runner must: swap_out, swap_in, copies, then the
tier's loads, then the K/V writes at slot_mapping, and the tier's offloads last (as if they
ran beside the forward: the GPU blocks they read must not change during the step). A
scripted model samples the next token as a hash of the context read back through the
block table, so any stale or misplaced KV changes the output. Multi-turn conversations on
a GPU pool far too small for them run with the tier on and off: outputs equal the
no-scheduler reference either way, and with the tier on the returning turns hit host
blocks, load them and recompute fewer prompt tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvserve._core import Core, Plan, PrefixIndex, StalePlanError, block_hashes
from test_core_scenarios import VOCAB, Sim, reference

BS = 4


class TierSim(Sim):
    """test_core_scenarios' simulated cache (which applies loads and checks offloads), with
    copy-only plans committed exactly when the core says they must be."""

    def __init__(self, core: Core, num_host_blocks: int) -> None:
        super().__init__(core, num_host_blocks)
        self.offloads = self.loads = 0

    def add(self, request_id: str, prompt: list[int], max_tokens: int, **kw: object) -> int:
        return super().add(request_id, prompt, max_tokens, ignore_eos=True, **kw)

    def step(self) -> Plan:
        plan = self.core.schedule()
        sampled = self.execute(plan)
        self.offloads += len(plan.offloads)
        self.loads += len(plan.loads)
        assert plan.must_commit == (plan.num_seqs > 0 or len(plan.offloads) + len(plan.loads) > 0)
        if plan.must_commit:
            out = self.core.commit(plan.id, sampled)
            for h, t in zip(out.handles, out.token_ids):
                self.tokens[int(h)].append(int(t))
            self.finished.update(zip(out.finished_ids, out.finish_reasons))
        self.core.check_invariants()
        return plan

    def drain(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.core.has_unfinished():
                # Copies scheduled after the last request ended still run and commit.
                while self.step().must_commit:
                    pass
                return
            self.step()
        raise AssertionError("requests never finished")


def tier_core(host_prefix_cache: bool, load_bytes_per_s: float = 25e9, gpu: int = 24) -> Core:
    return Core(
        num_gpu_blocks=gpu,
        block_size=BS,
        num_host_blocks=256,
        max_num_batched_tokens=64,
        max_num_seqs=4,
        watermark=0.0,
        kv_bytes_per_token=1024,
        flops_per_token=1e9,
        preemption_mode="recompute",
        host_prefix_cache=host_prefix_cache,
        load_bytes_per_s=load_bytes_per_s,
    )


def conversations(
    core: Core, turns: int = 3, convs: int = 4, seed: int = 3
) -> tuple[TierSim, dict[str, list[int]]]:
    """`convs` conversations take turns; each turn's prompt is the last turn's prompt and
    answer plus new tokens, and the others' turns push it out of the small GPU pool."""
    rng = np.random.default_rng(seed)
    sim = TierSim(core, 256)
    history = {c: rng.integers(0, VOCAB, 40).tolist() for c in range(convs)}
    expected = {}
    for t in range(turns):
        for c in range(convs):
            rid = f"c{c}t{t}"
            prompt = history[c]
            sim.add(rid, prompt, max_tokens=4)
            sim.drain()
            out = sim.output(rid)
            expected[rid] = reference(prompt, 4)
            assert out == expected[rid], f"{rid}: output differs from the reference"
            history[c] = prompt + out + rng.integers(0, VOCAB, 6).tolist()
    return sim, expected


def test_returning_turns_load_from_the_host_tier_with_identical_outputs() -> None:
    on, _ = conversations(tier_core(True))
    off, _ = conversations(tier_core(False))
    m_on, m_off = on.core.metrics(), off.core.metrics()
    # Same requests, same tokens (each checked against the reference in `conversations`).
    assert m_on["prefix_queries_tokens"] == m_off["prefix_queries_tokens"]
    assert m_off["prefix_hits_host_tokens"] == 0 and m_off["host_offloaded_blocks"] == 0
    assert m_on["host_offloaded_blocks"] == on.offloads > 0
    assert m_on["host_loaded_blocks"] == on.loads > 0
    assert m_on["host_load_decisions"] > 0 and m_on["host_recompute_decisions"] == 0
    assert m_on["prefix_hits_host_tokens"] > 0
    assert m_on["prefix_hits_gpu_tokens"] + m_on["prefix_hits_host_tokens"] == m_on[
        "prefix_hits_tokens"
    ]
    # Every host hit is a prompt token the tier-off core had to compute again.
    assert m_on["prefix_hits_tokens"] - m_off["prefix_hits_tokens"] == m_on[
        "prefix_hits_host_tokens"
    ]
    assert m_on["recomputed_tokens"] < m_off["recomputed_tokens"]
    computed_on = m_on["tokens_scheduled_total"]
    assert computed_on < m_off["tokens_scheduled_total"]
    assert m_on["host_loaded_bytes"] == m_on["host_loaded_blocks"] * BS * 1024
    assert m_on["host_blocks_cached"] == on.core.num_cached_host_blocks > 0
    assert on.core.num_used_gpu_blocks == 0 and on.core.num_used_host_blocks == 0


def test_a_slow_host_link_recomputes_instead() -> None:
    # 1 KiB per token over 1 kB/s is slower than 1e9 FLOPs per token at 1e14 FLOP/s.
    sim, _ = conversations(tier_core(True, load_bytes_per_s=1e3))
    m = sim.core.metrics()
    assert m["host_offloaded_blocks"] > 0 and m["host_blocks_cached"] > 0
    assert m["host_recompute_decisions"] > 0 and m["host_load_decisions"] == 0
    assert m["host_loaded_blocks"] == 0 and m["prefix_hits_host_tokens"] == 0


def test_host_tier_config_needs_host_blocks_and_prefix_caching() -> None:
    from kvserve._core import ConfigError

    with pytest.raises(ConfigError, match="host_prefix_cache"):
        Core(num_gpu_blocks=8, host_prefix_cache=True)
    with pytest.raises(ConfigError, match="host_prefix_cache"):
        Core(num_gpu_blocks=8, num_host_blocks=4, enable_prefix_caching=False,
             host_prefix_cache=True)
    with pytest.raises(ConfigError, match="load_bytes_per_s"):
        Core(num_gpu_blocks=8, num_host_blocks=4, host_prefix_cache=True, load_bytes_per_s=0)


def offload_everything(sim: TierSim, prompt: list[int]) -> None:
    """One request runs and ends; the copy-only plan after it offloads its blocks."""
    sim.add("seed", prompt, max_tokens=1)
    sim.drain()
    assert sim.core.num_cached_host_blocks == len(prompt) // BS


def test_copy_only_plans_must_be_committed() -> None:
    sim = TierSim(tier_core(True), 256)
    sim.add("a", list(range(16)), max_tokens=1)
    plan = sim.step()  # prefill + the one sampled token: a ends in this commit
    assert plan.num_seqs == 1 and not sim.core.has_unfinished()
    plan = sim.core.schedule()  # nothing to run, but a's idle blocks go to the host
    assert plan.num_seqs == 0 and len(plan.offloads) == 4 and plan.must_commit
    with pytest.raises(StalePlanError):
        sim.core.schedule()
    sim.execute(plan)
    sim.core.commit(plan.id, [])
    assert sim.core.num_cached_host_blocks == 4
    assert not sim.core.schedule().must_commit


def test_a_failed_load_ends_its_request_and_serves_nothing_stale() -> None:
    rng = np.random.default_rng(5)
    sim = TierSim(tier_core(True, gpu=12), 256)
    prompt = rng.integers(0, VOCAB, 32).tolist()
    offload_everything(sim, prompt)
    # Fill the GPU with other prompts so the first one's GPU blocks are evicted.
    for i in range(3):
        sim.add(f"fill{i}", rng.integers(0, VOCAB, 40).tolist(), max_tokens=1)
        sim.drain()
    assert sim.core.metrics()["prefix_hits_host_tokens"] == 0
    sim.add("back", prompt + [1, 2, 3], max_tokens=2)
    plan = sim.core.schedule()
    assert len(plan.loads) == 8, "the whole prompt's blocks come from the host"
    loaded_gpu = plan.loads[:, 1].copy()
    sim.gpu[loaded_gpu] = -7  # the copies never arrived
    assert sim.core.fail_copies(plan.id) == ["back"]
    with pytest.raises(StalePlanError):
        sim.core.fail_copies(plan.id + 1)
    out = sim.core.commit(plan.id, np.zeros(len(plan.sample_handles), np.int64))
    assert len(out.handles) == 0, "the failed request's row is not committed"
    assert sim.core.request_stats("back")["state"] == "aborted"
    m = sim.core.metrics()
    assert m["host_copy_failures"] == 8 and m["host_copy_failed_requests"] == 1
    sim.core.check_invariants()
    assert sim.core.num_used_gpu_blocks == 0 and sim.core.num_used_host_blocks == 0
    # The host blocks are intact and load again; the junk GPU blocks were never cached.
    sim.add("again", prompt + [1, 2, 3], max_tokens=2)
    sim.drain()
    assert sim.output("again") == reference(prompt + [1, 2, 3], 2)


def test_a_failed_offload_never_becomes_findable() -> None:
    sim = TierSim(tier_core(True), 256)
    sim.add("a", list(range(16)), max_tokens=1)
    sim.step()
    plan = sim.core.schedule()
    assert len(plan.offloads) == 4
    assert sim.core.fail_copies(plan.id) == []
    sim.core.commit(plan.id, [])
    assert sim.core.num_cached_host_blocks == 0 and sim.core.num_used_host_blocks == 0
    assert sim.core.metrics()["host_copy_failures"] == 4
    sim.core.check_invariants()


def test_kv_events_and_snapshot_report_the_tier() -> None:
    core = tier_core(True, gpu=12)
    core.enable_kv_events(1024)
    sim = TierSim(core, 256)
    rng = np.random.default_rng(9)
    prompt = rng.integers(0, VOCAB, 32).tolist()
    offload_everything(sim, prompt)
    for i in range(3):
        sim.add(f"fill{i}", rng.integers(0, VOCAB, 40).tolist(), max_tokens=1)
        sim.drain()
    _, first_seq, kinds, hashes = core.drain_kv_events()
    chain = block_hashes(prompt, BS)
    events = [(k, hashes[16 * i : 16 * i + 16]) for i, k in enumerate(kinds)]
    mine = [chain[16 * i : 16 * i + 16] for i in range(8)]
    assert {h for k, h in events if k == 3} >= set(mine), "host stored"
    assert {h for k, h in events if k == 2} >= set(mine), "evicted from the GPU"
    seq, gpu, host = core.kv_snapshot()
    assert seq == first_seq + len(kinds) - 1
    host_set = {host[i : i + 16] for i in range(0, len(host), 16)}
    gpu_set = {gpu[i : i + 16] for i in range(0, len(gpu), 16)}
    assert set(mine) <= host_set and not set(mine) & gpu_set
    # A router's index fed with these sees the prompt on the host only.
    ix = PrefixIndex()
    ix.add_replica("r")
    ix.store("r", gpu)
    ix.store_host("r", host)
    depth, n = ix.match_prompt_tiers(prompt, BS)
    assert n == 8 and depth == {"r": (0, 8)}
    assert ix.match_prompt(prompt, BS)[0] == {"r": 0}
    assert ix.host_blocks("r") == len(host_set)
    ix.evict_host("r", host)
    assert ix.match_prompt_tiers(prompt, BS)[0] == {"r": (0, 0)}
