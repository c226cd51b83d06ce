"""kvserve._core through its Python binding: types, arrays, errors that change nothing."""

from __future__ import annotations

import numpy as np
import pytest

from kvserve._core import (
    AtCapacityError,
    ConfigError,
    Core,
    InvalidRequestError,
    Plan,
    RequestTooLargeError,
    StalePlanError,
    StepOutput,
)


def snapshot(core: Core) -> dict:
    """Everything observable about the core (to prove an error changed nothing)."""
    return {
        **core.metrics(),
        "free": core.num_free_gpu_blocks,
        "cached": core.num_cached_gpu_blocks,
        "used": core.num_used_gpu_blocks,
    }


def test_error_classes_follow_the_contract() -> None:
    assert issubclass(InvalidRequestError, ValueError)
    assert issubclass(RequestTooLargeError, InvalidRequestError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(AtCapacityError, RuntimeError)
    assert issubclass(StalePlanError, RuntimeError)


def test_plan_arrays_dtypes_shapes_and_values() -> None:
    rng = np.random.default_rng(0)
    core = Core(num_gpu_blocks=64, block_size=8, max_num_batched_tokens=64)
    prompts = [rng.integers(0, 1000, size=n) for n in (13, 8, 5)]
    handles = [core.add_request(f"r{i}", p, max_tokens=4) for i, p in enumerate(prompts)]
    assert len(set(handles)) == 3
    plan = core.schedule()
    assert isinstance(plan, Plan)
    expect = {
        "handles": (np.uint64, (3,)),
        "input_ids": (np.int64, (26,)),
        "positions": (np.int64, (26,)),
        "slot_mapping": (np.int64, (26,)),
        "query_start_loc": (np.int32, (4,)),
        "seq_lens": (np.int32, (3,)),
        "block_table": (np.int32, (3, 2)),
        "logits_indices": (np.int64, (3,)),
        "sample_handles": (np.uint64, (3,)),
        "swap_out": (np.int64, (0, 2)),
        "swap_in": (np.int64, (0, 2)),
        "copies": (np.int64, (0, 2)),
    }
    for name, (dtype, shape) in expect.items():
        arr = getattr(plan, name)
        assert arr.dtype == dtype and arr.shape == shape, name
        assert arr.flags.c_contiguous, name
        # Zero-copy: numpy does not own the memory; it wraps the Rust Vec.
        assert not arr.flags.owndata and arr.base is not None, name
    assert (plan.num_seqs, plan.num_tokens, plan.num_decodes, plan.num_samples) == (3, 26, 0, 3)
    np.testing.assert_array_equal(plan.input_ids, np.concatenate(prompts))
    np.testing.assert_array_equal(plan.query_start_loc, [0, 13, 21, 26])
    np.testing.assert_array_equal(plan.seq_lens, [13, 8, 5])
    np.testing.assert_array_equal(plan.logits_indices, [12, 20, 25])
    np.testing.assert_array_equal(plan.sample_handles, handles)
    # Every token's slot is inside its sequence's blocks, at its position's offset.
    for i in range(3):
        a, b = plan.query_start_loc[i], plan.query_start_loc[i + 1]
        for row in range(a, b):
            pos = plan.positions[row]
            blk = plan.block_table[i, pos // 8]
            assert plan.slot_mapping[row] == blk * 8 + pos % 8
    assert plan.block_table[2, 1] == -1  # padding
    sampled = rng.integers(0, 1000, size=3)
    out = core.commit(plan.id, sampled)
    assert isinstance(out, StepOutput)
    np.testing.assert_array_equal(out.handles, handles)
    np.testing.assert_array_equal(out.token_ids, sampled)
    assert out.finished_ids == [] and out.finish_reasons == []
    plan = core.schedule()
    assert plan.num_decodes == 3 and plan.num_tokens == 3
    np.testing.assert_array_equal(plan.input_ids, sampled)
    core.check_invariants()


def test_plan_block_tables_are_read_only_and_stay_as_issued() -> None:
    # Tables live in recycled buffers; a plan that is still referenced keeps its own.
    rng = np.random.default_rng(7)
    core = Core(num_gpu_blocks=512, block_size=4, max_num_seqs=16, max_num_batched_tokens=64)
    for i in range(12):
        core.add_request(f"r{i}", rng.integers(0, 100, size=int(rng.integers(1, 30))),
                         max_tokens=int(rng.integers(1, 40)), ignore_eos=True)
    kept: list[tuple[object, np.ndarray]] = []
    while core.has_unfinished():
        plan = core.schedule()
        with pytest.raises(ValueError, match="read-only"):
            plan.block_table[...] = 0
        for old, table in kept:
            np.testing.assert_array_equal(old.block_table, table)
        if rng.random() < 0.3:
            kept.append((plan, plan.block_table.copy()))
        core.commit(plan.id, rng.integers(0, 100, size=plan.num_samples))
    assert len(kept) > 3


def test_prompt_accepts_lists_tuples_and_int_arrays() -> None:
    core = Core(num_gpu_blocks=16, block_size=4)
    core.add_request("list", [1, 2, 3], max_tokens=1)
    core.add_request("tuple", (1, 2, 3), max_tokens=1)
    core.add_request("i32", np.array([1, 2, 3], dtype=np.int32), max_tokens=1)
    core.add_request("strided", np.arange(10, dtype=np.int64)[::2], max_tokens=1)
    plan = core.schedule()
    np.testing.assert_array_equal(plan.input_ids, [1, 2, 3] * 3 + [0, 2, 4, 6, 8])
    core.commit(plan.id, [5, 5, 5, 5])
    assert not core.has_unfinished()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt_token_ids": []}, "prompt_token_ids"),
        ({"prompt_token_ids": list(range(64))}, "prompt_token_ids"),
        ({"prompt_token_ids": [1, -5]}, "prompt_token_ids"),
        ({"prompt_token_ids": "abc"}, "prompt_token_ids"),
        ({"request_id": "live"}, "request_id"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ({"prompt_token_ids": [1] * 30, "max_tokens": 30}, "max_tokens"),  # can't fit alone
        ({"stop_token_ids": ["x"]}, "stop_token_ids"),
    ],
)
def test_bad_requests_raise_naming_the_field_and_change_nothing(kwargs: dict, field: str) -> None:
    core = Core(num_gpu_blocks=8, block_size=4, max_model_len=64)
    core.add_request("live", [1, 2, 3], max_tokens=2)
    before = snapshot(core)
    args = {"request_id": "new", "prompt_token_ids": [4, 5], "max_tokens": 2, **kwargs}
    with pytest.raises(InvalidRequestError, match=field):
        core.add_request(**args)
    assert snapshot(core) == before
    core.check_invariants()
    with pytest.raises(KeyError):
        core.request_stats("new")


@pytest.mark.parametrize("seed", range(4))
def test_request_too_large_is_its_own_invalid_request_error(seed: int) -> None:
    """Exactly the requests that need more blocks than the pool has get RequestTooLargeError
    (naming the field to shrink, keeping "could never run"); the rest are accepted."""
    rng = np.random.default_rng(seed)
    num_blocks, bs = int(rng.integers(2, 12)), int(2 ** rng.integers(0, 4))
    core = Core(num_gpu_blocks=num_blocks, block_size=bs, max_model_len=10_000, max_waiting=10_000)
    accepted = 0
    for i in range(40):
        n = int(rng.integers(1, num_blocks * bs + 3))
        max_tokens = int(rng.integers(1, num_blocks * bs + 3))
        prompt = rng.integers(0, 1000, size=n)
        before = snapshot(core)
        # The last sampled token needs no KV slot.
        need = -(-(n + max_tokens - 1) // bs)
        if need <= num_blocks:
            core.add_request(f"r{i}", prompt, max_tokens=max_tokens)
            accepted += 1
            continue
        field = "prompt_token_ids" if -(-n // bs) > num_blocks else "max_tokens"
        with pytest.raises(RequestTooLargeError, match=f"{field}.*could never run") as info:
            core.add_request(f"r{i}", prompt, max_tokens=max_tokens)
        # Callers catching the base classes keep working.
        assert isinstance(info.value, InvalidRequestError) and isinstance(info.value, ValueError)
        assert snapshot(core) == before
        with pytest.raises(KeyError):
            core.request_stats(f"r{i}")
    assert core.metrics()["requests_added"] == accepted
    core.check_invariants()


def test_other_bad_requests_are_not_request_too_large() -> None:
    core = Core(num_gpu_blocks=8, block_size=4, max_model_len=64)
    for kwargs in (
        {"prompt_token_ids": []},
        {"prompt_token_ids": list(range(64))},
        {"max_tokens": 0},
        {"min_tokens": 3, "max_tokens": 2},
    ):
        args = {"request_id": "x", "prompt_token_ids": [1], "max_tokens": 1, **kwargs}
        with pytest.raises(InvalidRequestError) as info:
            core.add_request(**args)
        assert not isinstance(info.value, RequestTooLargeError), kwargs


def test_at_capacity_raises_and_queues_nothing() -> None:
    core = Core(num_gpu_blocks=8, block_size=4, max_waiting=2)
    core.add_request("a", [1], max_tokens=1)
    core.add_request("b", [2], max_tokens=1)
    before = snapshot(core)
    with pytest.raises(AtCapacityError):
        core.add_request("c", [3], max_tokens=1)
    assert snapshot(core) == before and core.metrics()["waiting"] == 2
    with pytest.raises(KeyError):
        core.request_stats("c")
    # Once scheduled, the waiting queue has room again.
    plan = core.schedule()
    core.add_request("c", [3], max_tokens=1)
    core.commit(plan.id, [0, 0])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 24}, "block_size"),
        ({"block_size": 512}, "block_size"),
        ({"block_size": 0}, "block_size"),
        ({"num_gpu_blocks": 0}, "num_gpu_blocks"),
        ({"num_gpu_blocks": -1}, "num_gpu_blocks"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"preemption_mode": "maybe"}, "preemption_mode"),
        ({"preemption_mode": "swap"}, "num_host_blocks"),
        ({"watermark": 1.0}, "watermark"),
        ({"swap_bytes_per_s": 0.0}, "swap_bytes_per_s"),
    ],
)
def test_bad_config_raises_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Core(**{"num_gpu_blocks": 8, **kwargs})


def test_commit_errors_change_nothing() -> None:
    rng = np.random.default_rng(1)
    core = Core(num_gpu_blocks=32, block_size=4)
    for i in range(3):
        core.add_request(f"r{i}", rng.integers(0, 50, size=6), max_tokens=5)
    plan = core.schedule()
    before = snapshot(core)
    with pytest.raises(InvalidRequestError, match="sampled_token_ids"):
        core.commit(plan.id, np.zeros(2, dtype=np.int64))
    with pytest.raises(InvalidRequestError, match="sampled_token_ids"):
        core.commit(plan.id, np.array([1, 2, -1]))
    with pytest.raises(StalePlanError):
        core.commit(plan.id + 1, np.ones(3, dtype=np.int64))
    with pytest.raises(StalePlanError):
        core.schedule()  # the previous plan is still uncommitted
    assert snapshot(core) == before
    core.check_invariants()
    core.commit(plan.id, rng.integers(0, 50, size=3))
    with pytest.raises(StalePlanError):
        core.commit(plan.id, rng.integers(0, 50, size=3))


@pytest.mark.parametrize("kind", ["int64", "strided", "int32", "list"])
def test_commit_accepts_any_int_sequence_alike(kind: str) -> None:
    """The in-place int64 fast path and the converting path append the same tokens."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 50, size=int(rng.integers(1, 9))) for _ in range(5)]
    sampled = [rng.integers(0, 50, size=5) for _ in range(4)]

    def run(convert) -> list[list[int]]:
        core = Core(num_gpu_blocks=32, block_size=4)
        for i, p in enumerate(prompts):
            core.add_request(f"r{i}", p, max_tokens=4, ignore_eos=True)
        got: list[list[int]] = []
        for toks in sampled:
            plan = core.schedule()
            out = core.commit(plan.id, convert(toks[: plan.num_samples]))
            got.append(out.token_ids.tolist())
            core.check_invariants()
        return got

    convert = {
        "int64": lambda t: np.ascontiguousarray(t, dtype=np.int64),
        "strided": lambda t: np.repeat(t.astype(np.int64), 2)[::2],
        "int32": lambda t: t.astype(np.int32),
        "list": lambda t: [int(x) for x in t],
    }[kind]
    want = [toks[: len(got)].tolist() for toks, got in zip(sampled, run(convert))]
    assert run(convert) == want
    assert run(convert) == run(lambda t: [int(x) for x in t])


def test_abort_finish_and_stats() -> None:
    core = Core(num_gpu_blocks=16, block_size=4)
    assert core.abort("unknown") is None
    assert core.finish("unknown", "stop") is None
    ha = core.add_request("a", [1, 2, 3, 4, 5], max_tokens=8)
    core.add_request("b", [6, 7], max_tokens=8)
    plan = core.schedule()
    core.commit(plan.id, [9, 9])
    assert core.request_stats("a")["state"] == "running"
    assert core.num_used_gpu_blocks == 3
    assert core.abort("a") == ha
    assert core.abort("a") is None
    assert core.request_stats("a")["state"] == "aborted"
    assert core.finish("b", "stop_string") == 0  # nothing of it was cached
    st = core.request_stats("b")
    assert st["state"] == "finished:stop_string" and st["output_tokens"] == 1
    assert core.num_used_gpu_blocks == 0 and not core.has_unfinished()
    # The id is free again once the request has ended.
    core.add_request("a", [1], max_tokens=1)
    m = core.metrics()
    assert (m["requests_aborted"], m["requests_finished"], m["waiting"]) == (1, 1, 1)
    core.check_invariants()


def test_abort_between_schedule_and_commit_skips_the_row() -> None:
    core = Core(num_gpu_blocks=16, block_size=4)
    ha = core.add_request("a", [1, 2, 3], max_tokens=4)
    hb = core.add_request("b", [4, 5, 6], max_tokens=4)
    plan = core.schedule()
    np.testing.assert_array_equal(plan.sample_handles, [ha, hb])
    core.abort("a")
    out = core.commit(plan.id, [7, 8])
    np.testing.assert_array_equal(out.handles, [hb])
    np.testing.assert_array_equal(out.token_ids, [8])
    core.check_invariants()


def test_stop_conditions() -> None:
    core = Core(num_gpu_blocks=16, block_size=4, max_model_len=12)
    core.add_request("eos", [1], max_tokens=9, eos_token_id=2, min_tokens=2)
    core.add_request("ign", [1], max_tokens=3, eos_token_id=2, ignore_eos=True)
    core.add_request("stopid", [1], max_tokens=9, stop_token_ids=[3, 4])
    core.add_request("mml", [1] * 8, max_tokens=100)
    reasons: dict[str, str] = {}
    outputs: dict[int, list[int]] = {}
    # Scripted tokens per request: eos at once (suppressed by min_tokens), then eos.
    script = {0: [2, 2], 1: [2, 2, 2], 2: [5, 4], 3: [1, 1, 1, 1]}
    while core.has_unfinished():
        plan = core.schedule()
        toks = [script[int(h)][len(outputs.setdefault(int(h), []))] for h in plan.sample_handles]
        out = core.commit(plan.id, toks)
        for h, t in zip(out.handles, out.token_ids):
            outputs[int(h)].append(int(t))
        reasons.update(zip(out.finished_ids, out.finish_reasons))
    assert reasons == {"eos": "stop", "ign": "length", "stopid": "stop", "mml": "length"}
    assert outputs == {0: [2, 2], 1: [2, 2, 2], 2: [5, 4], 3: [1, 1, 1, 1]}


def test_metrics_keys() -> None:
    core = Core(num_gpu_blocks=4)
    m = core.metrics()
    for key in (
        "running",
        "waiting",
        "swapped",
        "gpu_kv_usage",
        "host_kv_usage",
        "prefix_queries_tokens",
        "prefix_hits_tokens",
        "evictions",
        "preemptions_recompute",
        "preemptions_swap",
        "recomputed_tokens",
        "tokens_scheduled_last_step",
        "steps",
    ):
        assert key in m, key
    assert core.num_gpu_blocks == 4 and core.num_free_gpu_blocks == 4


def test_request_stats_remembers_the_last_4096_ended_even_with_reused_ids() -> None:
    core = Core(num_gpu_blocks=16, block_size=4, max_waiting=8)

    def end(request_id: str) -> None:
        core.add_request(request_id, [1, 2], max_tokens=4)
        assert core.finish(request_id, "stop") is not None

    end("x")
    for i in range(4095):
        end(f"o{i}")
    end("x")  # ends again: now the most recent, not the oldest
    end("y")
    assert core.request_stats("x")["state"] == "finished:stop"
    assert core.request_stats("y")["state"] == "finished:stop"
    assert core.request_stats("o1")["state"] == "finished:stop"
    with pytest.raises(KeyError):
        core.request_stats("o0")  # the oldest of the 4097 distinct ids that ended
    core.check_invariants()


def test_step_output_reports_finished_cached_prompt_tokens_and_plans_their_predecessor() -> None:
    rng = np.random.default_rng(3)
    core = Core(num_gpu_blocks=64, block_size=4, max_num_seqs=4)
    shared = rng.integers(0, 50, 9).tolist()
    for i in range(12):
        prompt = shared[: int(rng.integers(1, 10))] + rng.integers(0, 50, 3).tolist()
        core.add_request(f"r{i}", prompt, max_tokens=int(rng.integers(1, 12)))
    finished, hits, continued, advancing, prev_id = 0, 0, 0, 0, None
    while core.has_unfinished():
        plan = core.schedule()
        assert plan.continues_plan_id in (None, prev_id)
        continued += plan.continues_plan_id is not None
        nxt = plan.positions + 1  # the run-ahead's precondition, as cuda_graphs once had it
        in_place = (0 < plan.num_seqs == plan.num_decodes and not len(plan.swap_out)
                    and not len(plan.swap_in) and not len(plan.copies)
                    and bool(np.all(nxt % 4 != 0)) and bool(np.all(nxt < core.max_model_len)))
        assert plan.advances_in_place is in_place
        advancing += in_place
        out = core.commit(plan.id, rng.integers(0, 50, plan.num_samples))
        assert len(out.finished_cached_prompt_tokens) == len(out.finished_handles)
        assert out.finished_cached_prompt_tokens.dtype == np.uint64
        for request_id, cached in zip(out.finished_ids, out.finished_cached_prompt_tokens):
            assert cached == core.request_stats(request_id)["cached_prompt_tokens"]
            finished += 1
            hits += cached > 0
        prev_id = plan.id
    assert finished == 12 and hits > 0 and continued > 0 and advancing > 0


def test_finish_and_abort_report_what_request_stats_records() -> None:
    """finish returns the ended request's cached prompt tokens and abort its handle, the
    facts the engine needs, so it never asks request_stats for them."""
    rng = np.random.default_rng(5)
    core = Core(num_gpu_blocks=64, block_size=4, max_num_seqs=4)
    shared = rng.integers(0, 50, 9).tolist()
    handles: dict[str, int] = {}
    for i in range(16):
        prompt = shared[: int(rng.integers(1, 10))] + rng.integers(0, 50, 3).tolist()
        handles[f"r{i}"] = core.add_request(f"r{i}", prompt, max_tokens=20)
    live = set(handles)
    hits = 0
    while live:
        plan = core.schedule()
        out = core.commit(plan.id, rng.integers(0, 50, plan.num_samples))
        live -= set(out.finished_ids)
        if not live:
            break
        victim = sorted(live)[int(rng.integers(0, len(live)))]
        live.discard(victim)
        if rng.random() < 0.5:
            assert core.abort(victim) == handles[victim]
            assert core.request_stats(victim)["state"] == "aborted"
        else:
            cached = core.finish(victim, "stop_string")
            stats = core.request_stats(victim)
            assert stats["state"] == "finished:stop_string"
            assert cached == stats["cached_prompt_tokens"] and stats["handle"] == handles[victim]
            hits += cached is not None and cached > 0
        assert core.abort(victim) is None and core.finish(victim, "stop") is None
        core.check_invariants()
    assert hits > 0
