"""Scheduler scenarios through the binding, run against a simulated paged KV cache.

`Sim` executes each plan the way the runner must (swap_out, swap_in, copies, then K/V
writes at slot_mapping) and a scripted model samples the next token as a hash of the
context it reads back through the block table. Outputs are compared with `reference`,
which generates the same tokens with no scheduler at all, and with runs on a pool big
enough to never preempt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvserve._core import AtCapacityError, Core, InvalidRequestError, Plan

VOCAB = 101


def model(context: np.ndarray) -> int:
    """Scripted deterministic model: next token = hash of the whole context."""
    digest = hashlib.blake2b(np.ascontiguousarray(context, dtype=np.int64).tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") % VOCAB


def reference(prompt: list[int], max_tokens: int, max_model_len: int = 4096) -> list[int]:
    """What a request generates with no scheduler (no stop tokens: length-bound)."""
    ctx = list(prompt)
    out: list[int] = []
    while len(out) < max_tokens and len(ctx) < max_model_len:
        t = model(np.array(ctx))
        ctx.append(t)
        out.append(t)
    return out


@dataclass
class Sim:
    """The runner's side: GPU/host caches holding (token, position) per slot."""

    core: Core
    num_host_blocks: int = 0
    tokens: dict[int, list[int]] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)
    finished: dict[str, str] = field(default_factory=dict)
    # Plans kept alive for a few steps, with a copy of their block table: the binding
    # recycles table buffers, and must never reuse one that a live plan still shows.
    held: list[tuple[Plan, np.ndarray]] = field(default_factory=list)
    steps: int = 0

    def __post_init__(self) -> None:
        bs = self.core.block_size
        self.gpu = np.full((self.core.num_gpu_blocks, bs, 2), -1, dtype=np.int64)
        self.host = np.full((max(self.num_host_blocks, 1), bs, 2), -1, dtype=np.int64)

    def add(self, request_id: str, prompt: list[int], max_tokens: int, **kw: object) -> int:
        h = self.core.add_request(request_id, prompt, max_tokens, **kw)
        self.tokens[h] = list(prompt)
        self.ids[request_id] = h
        return h

    def execute(self, plan: Plan) -> np.ndarray:
        bs = self.core.block_size
        for g, h in plan.swap_out:
            self.host[h] = self.gpu[g]
        for h, g in plan.swap_in:
            self.gpu[g] = self.host[h]
        for src, dst in plan.copies:
            self.gpu[dst] = self.gpu[src]
        for h, g in plan.loads:  # host tier: loads land before the forward reads them
            self.gpu[g] = self.host[h]
        offloaded = [self.gpu[g].copy() for g, _ in plan.offloads]
        flat = self.gpu.reshape(-1, 2)
        flat[plan.slot_mapping, 0] = plan.input_ids
        flat[plan.slot_mapping, 1] = plan.positions
        sampled = []
        rows = {int(h): i for i, h in enumerate(plan.sample_handles)}
        for i in range(plan.num_seqs):
            h = int(plan.handles[i])
            truth = self.tokens[h]
            a, b = plan.query_start_loc[i], plan.query_start_loc[i + 1]
            n = int(plan.seq_lens[i])
            assert i >= plan.num_decodes or b - a == 1
            np.testing.assert_array_equal(plan.input_ids[a:b], truth[n - (b - a) : n])
            blocks = plan.block_table[i, : (n + bs - 1) // bs]
            assert (blocks >= 0).all()
            kv = self.gpu[blocks].reshape(-1, 2)[:n]
            np.testing.assert_array_equal(kv[:, 0], truth[:n], err_msg=f"KV tokens of {h}")
            np.testing.assert_array_equal(kv[:, 1], np.arange(n), err_msg=f"KV positions of {h}")
            if h in rows:
                assert n == len(truth) and plan.logits_indices[rows[h]] == b - 1
                sampled.append(model(kv[:, 0]))
            else:
                assert n < len(truth)
        # Offloads may overlap the forward: the block they read must not change under them.
        for (g, h), before in zip(plan.offloads, offloaded):
            np.testing.assert_array_equal(self.gpu[g], before, err_msg="offloaded block written")
            self.host[h] = self.gpu[g]
        return np.array(sampled, dtype=np.int64)

    def step(self) -> Plan:
        plan = self.core.schedule()
        for old, table in self.held:
            np.testing.assert_array_equal(old.block_table, table, err_msg="a held plan changed")
        self.steps += 1
        if self.steps % 3 == 0:
            self.held.append((plan, plan.block_table.copy()))
        if len(self.held) > 4 or self.steps % 5 == 0:
            self.held = self.held[1:]
        sampled = self.execute(plan)
        out = self.core.commit(plan.id, sampled)
        for h, t in zip(out.handles, out.token_ids):
            self.tokens[int(h)].append(int(t))
        self.finished.update(zip(out.finished_ids, out.finish_reasons))
        self.core.check_invariants()
        return plan

    def drain(self, max_steps: int = 20_000) -> None:
        for _ in range(max_steps):
            if not self.core.has_unfinished():
                return
            self.step()
        raise AssertionError("requests never finished")

    def output(self, request_id: str) -> list[int]:
        h = self.ids[request_id]
        n = self.core.request_stats(request_id)["prompt_tokens"]
        return self.tokens[h][n:]


def random_prompt(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(0, VOCAB, size=n).tolist()


def test_two_turn_conversation_reuses_first_turn_blocks() -> None:
    rng = np.random.default_rng(10)
    sim = Sim(Core(num_gpu_blocks=64, block_size=4, watermark=0.0))
    turn1 = random_prompt(rng, 23)
    sim.add("turn1", turn1, max_tokens=9)
    sim.drain()
    history = turn1 + sim.output("turn1")  # 32 tokens, 31 computed -> 7 full blocks cached
    assert sim.core.num_cached_gpu_blocks == 7
    turn2 = history + random_prompt(rng, 6)
    hits_before = sim.core.metrics()["prefix_hits_tokens"]
    sim.add("turn2", turn2, max_tokens=5)
    plan = sim.step()
    assert plan.num_tokens == len(turn2) - 28, "only the uncached tail is computed"
    assert sim.core.request_stats("turn2")["cached_prompt_tokens"] == 28
    assert sim.core.metrics()["prefix_hits_tokens"] - hits_before == 28
    sim.drain()
    assert sim.output("turn2") == reference(turn2, 5)


def test_whole_prompt_hit_is_copy_on_write_of_the_last_block() -> None:
    rng = np.random.default_rng(11)
    sim = Sim(Core(num_gpu_blocks=32, block_size=8, watermark=0.0))
    prompt = random_prompt(rng, 24)
    sim.add("first", prompt, max_tokens=1)
    sim.drain()
    sim.add("again", prompt, max_tokens=4)
    plan = sim.step()
    assert plan.num_tokens == 1 and plan.positions.tolist() == [23]
    assert plan.copies.shape == (1, 2)
    src, dst = plan.copies[0]
    assert src != dst and plan.block_table[0, 2] == dst
    sim.drain()
    assert sim.output("again") == reference(prompt, 4)
    assert sim.core.metrics()["cow_copies"] == 1


def test_chunked_prefill_of_a_prompt_ten_times_the_budget() -> None:
    rng = np.random.default_rng(12)
    budget = 32
    core = Core(num_gpu_blocks=128, block_size=16, max_num_batched_tokens=budget)
    sim = Sim(core)
    prompt = random_prompt(rng, 10 * budget)
    h = sim.add("long", prompt, max_tokens=3)
    steps_with_long = 0
    while h not in (sim.step().sample_handles.tolist()):
        steps_with_long += 1
        assert sim.core.metrics()["tokens_scheduled_last_step"] == budget
    assert steps_with_long + 1 == 10
    sim.drain()
    assert sim.output("long") == reference(prompt, 3)


def run_workload(
    mode: str, num_gpu_blocks: int, num_host_blocks: int, seed: int = 13
) -> tuple[dict[str, list[int]], dict]:
    rng = np.random.default_rng(seed)
    core = Core(
        num_gpu_blocks=num_gpu_blocks,
        block_size=4,
        num_host_blocks=num_host_blocks,
        preemption_mode=mode,
        max_num_batched_tokens=48,
        max_num_seqs=8,
        watermark=0.0,
        kv_bytes_per_token=64,
        flops_per_token=1e9,
    )
    sim = Sim(core, num_host_blocks=num_host_blocks)
    shared = random_prompt(rng, 12)
    for i in range(10):
        # Half the prompts share a prefix, so preemption meets shared blocks too.
        prompt = (shared if i % 2 else []) + random_prompt(rng, int(rng.integers(3, 14)))
        sim.add(f"r{i}", prompt, max_tokens=int(rng.integers(10, 30)))
    sim.drain()
    return {rid: sim.output(rid) for rid in sim.ids}, core.metrics()


@pytest.mark.parametrize("mode", ["recompute", "swap", "auto"])
def test_forced_preemption_restores_identical_token_streams(mode: str) -> None:
    want, m_big = run_workload("recompute", 1024, 0)
    assert m_big["preemptions"] == 0
    got, m = run_workload(mode, 16, 64)
    assert got == want
    if mode == "recompute":
        assert m["preemptions_recompute"] > 0 and m["preemptions_swap"] == 0
        assert m["recomputed_tokens"] > 0
    else:  # 64 B/token over PCIe vs 1 GFLOP/token: auto swaps as well
        assert m["preemptions_swap"] > 0 and m["preemptions_recompute"] == 0
        assert m["swapped_in_blocks"] == m["swapped_out_blocks"] > 0
    assert m["gpu_blocks_used"] == 0 and m["host_blocks_used"] == 0


def test_auto_recomputes_when_swap_is_dearer() -> None:
    rng = np.random.default_rng(14)
    core = Core(
        num_gpu_blocks=10,
        block_size=4,
        num_host_blocks=64,
        preemption_mode="auto",
        watermark=0.0,
        kv_bytes_per_token=1 << 30,
        flops_per_token=1.0,
    )
    sim = Sim(core, num_host_blocks=64)
    prompts = {f"r{i}": random_prompt(rng, 9) for i in range(4)}
    for rid, prompt in prompts.items():
        sim.add(rid, prompt, max_tokens=20)
    sim.drain()
    m = core.metrics()
    assert m["preemptions_recompute"] > 0 and m["preemptions_swap"] == 0
    for rid, prompt in prompts.items():
        assert sim.output(rid) == reference(prompt, 20)


# ------------------------------------------------------------------ random operations

op = st.one_of(
    st.tuples(
        st.just("add"), st.integers(1, 30), st.integers(1, 20), st.integers(0, 2), st.booleans()
    ),
    st.tuples(st.just("step")),
    st.tuples(st.just("step")),
    st.tuples(st.just("step")),
    st.tuples(st.just("abort"), st.integers(0, 1000)),
    st.tuples(st.just("abort_mid"), st.integers(0, 1000)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block_size=st.sampled_from([1, 2, 4, 8]),
    num_gpu_blocks=st.integers(6, 40),
    num_host_blocks=st.integers(0, 32),
    mode=st.sampled_from(["recompute", "swap", "auto"]),
    budget=st.integers(1, 48),
    max_num_seqs=st.integers(1, 6),
    prefix=st.booleans(),
    ops=st.lists(op, min_size=1, max_size=60),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_operations_keep_invariants_and_streams(
    block_size: int,
    num_gpu_blocks: int,
    num_host_blocks: int,
    mode: str,
    budget: int,
    max_num_seqs: int,
    prefix: bool,
    ops: list,
    seed: int,
) -> None:
    if mode == "swap" and num_host_blocks == 0:
        num_host_blocks = 1
    core = Core(
        num_gpu_blocks=num_gpu_blocks,
        block_size=block_size,
        num_host_blocks=num_host_blocks,
        preemption_mode=mode,
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=prefix,
        max_model_len=96,
        max_waiting=12,
        watermark=0.0,
        kv_bytes_per_token=16,
        flops_per_token=1e6,
    )
    sim = Sim(core, num_host_blocks=num_host_blocks)
    rng = np.random.default_rng(seed)
    base = random_prompt(rng, 64)
    prompts: dict[str, tuple[list[int], int]] = {}
    ended: set[str] = set()
    for n, o in enumerate(ops):
        if o[0] == "add":
            _, plen, max_tokens, _prio, share = o
            prompt = base[:plen] if share else random_prompt(rng, plen)
            before = core.metrics()
            try:
                sim.add(f"r{n}", prompt, max_tokens, priority=o[3])
                prompts[f"r{n}"] = (prompt, max_tokens)
            except (AtCapacityError, InvalidRequestError):
                assert core.metrics() == before
        elif o[0] == "step":
            sim.step()
        else:
            live = [r for r in prompts if r not in ended and r not in sim.finished]
            if not live:
                assert core.abort("nobody") is None
                continue
            victim = live[o[1] % len(live)]
            if o[0] == "abort":
                assert core.abort(victim) is not None
            else:  # abort between schedule and commit
                plan = core.schedule()
                sampled = sim.execute(plan)
                assert core.abort(victim) is not None
                out = core.commit(plan.id, sampled)
                assert sim.ids[victim] not in out.handles.tolist()
                for h, t in zip(out.handles, out.token_ids):
                    sim.tokens[int(h)].append(int(t))
                sim.finished.update(zip(out.finished_ids, out.finish_reasons))
            ended.add(victim)
        core.check_invariants()
    sim.drain()
    m = core.metrics()
    assert m["gpu_blocks_used"] == 0 and m["host_blocks_used"] == 0
    assert m["gpu_blocks_free"] + m["gpu_blocks_cached"] == num_gpu_blocks
    for rid, (prompt, max_tokens) in prompts.items():
        if rid not in ended:
            assert sim.finished[rid] == "length"
            assert sim.output(rid) == reference(prompt, max_tokens, 96)


def test_waiting_requests_are_admitted_by_priority_then_arrival() -> None:
    rng = np.random.default_rng(15)
    sim = Sim(Core(num_gpu_blocks=64, block_size=4, max_num_seqs=1))
    order = [("late-low", 2), ("early-high", 0), ("late-high", 0), ("mid", 1)]
    for rid, prio in order:
        sim.add(rid, random_prompt(rng, 5), max_tokens=2, priority=prio)
    admitted: list[str] = []
    by_handle = {h: rid for rid, h in sim.ids.items()}
    while sim.core.has_unfinished():
        plan = sim.step()
        for h in plan.handles.tolist():
            if by_handle[h] not in admitted:
                admitted.append(by_handle[h])
    assert admitted == ["early-high", "late-high", "mid", "late-low"]
