"""The router's pure parts: the policies against a direct model of their rules, address
parsing and the replicas file (a bad edit keeps the last good list)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from kvserve import _core
from kvserve.router.discovery import Discovery, DiscoveryError, ReplicaAddress, parse_address
from kvserve.router.policy import UNKNOWN_DECODE_STEPS, Candidate, Router, kv_wait_s


def cand(name: str, **kw: float) -> Candidate:
    base = {
        "rtt_s": 0.001,
        "prefill_tokens_per_s": 1000.0,
        "decode_step_s": 0.01,
        "waiting_prompt_tokens": 0,
        "pending_prompt_tokens": 0,
        "in_flight": 0,
        "cached_tokens": 0,
    }
    base.update(kw)
    return Candidate(name=name, **base)  # type: ignore[arg-type]


def model_kv_wait(c: Candidate, uncached: int, queue: float) -> float:
    """KV pressure by brute force: the fewest finished decodes whose blocks cover the
    deficit, shortest first; unknown decodes count as UNKNOWN_DECODE_STEPS."""
    if c.block_size <= 0 or c.num_gpu_blocks <= 0:
        return 0.0
    deficit = math.ceil((queue + uncached) / c.block_size) - (
        c.num_gpu_blocks - c.num_used_gpu_blocks
    )
    n = max(c.running, len(c.decode_steps_left))
    if deficit <= 0 or n == 0:
        return 0.0
    steps = sorted([*c.decode_steps_left, *[UNKNOWN_DECODE_STEPS] * (n - len(c.decode_steps_left))])
    per = c.num_used_gpu_blocks / n
    k = next((k for k in range(1, n + 1) if k * per >= deficit), n)
    return steps[k - 1] * c.decode_step_s


def model_ttft(c: Candidate, prompt: int, rate: float) -> float:
    r = c.prefill_tokens_per_s if c.prefill_tokens_per_s > 0 else rate
    queue = max(c.waiting_prompt_tokens * (1 - c.prefix_hit_rate), c.pending_prompt_tokens)
    uncached = max(prompt - c.cached_tokens, 1)
    return (
        c.rtt_s + max(queue / r, model_kv_wait(c, uncached, queue)) + uncached / r + c.decode_step_s
    )


def test_kv_picks_the_lowest_predicted_ttft_on_random_fleets() -> None:
    rng = random.Random(0)
    router = Router("kv")
    for _ in range(300):
        cands = []
        for i in range(rng.randrange(1, 9)):
            total = rng.choice([0, rng.randrange(1, 400)])
            running = rng.randrange(0, 12)
            known = rng.randrange(0, running + 2)
            cands.append(
                cand(
                    f"r{i}",
                    rtt_s=rng.uniform(0, 0.2),
                    prefill_tokens_per_s=rng.choice([0.0, rng.uniform(100, 5000)]),
                    decode_step_s=rng.uniform(0, 0.05),
                    waiting_prompt_tokens=rng.randrange(0, 4000),
                    pending_prompt_tokens=rng.randrange(0, 4000),
                    cached_tokens=rng.randrange(0, 2000),
                    prefix_hit_rate=rng.choice([0.0, rng.random()]),
                    block_size=rng.choice([0, 16]),
                    num_gpu_blocks=total,
                    num_used_gpu_blocks=rng.randrange(0, total + 1),
                    running=running,
                    decode_steps_left=tuple(rng.randrange(0, 500) for _ in range(known)),
                )
            )
        prompt = rng.randrange(1, 2048)
        known = [c.prefill_tokens_per_s for c in cands if c.prefill_tokens_per_s > 0]
        rate = sum(known) / len(known) if known else 5000.0
        best = min(model_ttft(c, prompt, rate) for c in cands)
        got = router.rank(cands, prompt)
        assert sorted(c.name for c in got) == sorted(c.name for c in cands)
        assert model_ttft(got[0], prompt, rate) == pytest.approx(best)


def test_a_far_replica_with_the_prefix_beats_a_near_one_without() -> None:
    near = cand("near", rtt_s=0.001)
    far = cand("far", rtt_s=0.080, cached_tokens=1984)
    assert Router("kv").rank([near, far], 2000)[0].name == "far"
    # ... unless its queue makes it slower
    busy = cand("far", rtt_s=0.080, cached_tokens=1984, waiting_prompt_tokens=3000)
    assert Router("kv").rank([near, busy], 2000)[0].name == "near"


def test_a_full_kv_pool_waits_for_decodes_to_finish() -> None:
    # 100 blocks of 16, 96 in use by 4 decodes (24 each): a 1000-token prompt (63 blocks)
    # needs 59 more, so 3 decodes must finish; the third shortest has 300 steps left.
    full = cand(
        "full",
        cached_tokens=0,
        block_size=16,
        num_gpu_blocks=100,
        num_used_gpu_blocks=96,
        running=4,
        decode_steps_left=(500, 100, 300, 200),
        decode_step_s=0.02,
    )
    assert kv_wait_s(full, 1000) == pytest.approx(300 * 0.02)
    assert kv_wait_s(full, 60) == 0.0, "4 blocks fit in the 4 free ones"
    # a decode this router did not send counts as UNKNOWN_DECODE_STEPS
    other = cand(
        "o",
        block_size=16,
        num_gpu_blocks=100,
        num_used_gpu_blocks=96,
        running=4,
        decode_steps_left=(10,),
        decode_step_s=0.02,
    )
    assert kv_wait_s(other, 1000) == pytest.approx(UNKNOWN_DECODE_STEPS * 0.02)
    # the replica holding most of the prompt loses to an empty one when its pool is full
    holder = cand(
        "holder",
        cached_tokens=512,
        block_size=16,
        num_gpu_blocks=100,
        num_used_gpu_blocks=100,
        running=4,
        decode_steps_left=(400,) * 4,
        decode_step_s=0.02,
    )
    empty = cand("empty", block_size=16, num_gpu_blocks=100)
    assert Router("kv").rank([holder, empty], 1000)[0].name == "empty"
    roomy = cand(
        "holder",
        cached_tokens=512,
        block_size=16,
        num_gpu_blocks=200,
        num_used_gpu_blocks=100,
        running=4,
        decode_steps_left=(400,) * 4,
        decode_step_s=0.02,
    )
    assert Router("kv").rank([roomy, empty], 1000)[0].name == "holder"


def test_a_queue_that_will_hit_the_cache_costs_less() -> None:
    hits = cand("hits", waiting_prompt_tokens=4000, prefix_hit_rate=0.9)
    misses = cand("misses", waiting_prompt_tokens=1000)
    assert Router("kv").rank([hits, misses], 100)[0].name == "hits"
    assert (
        Router("kv").rank([cand("hits", waiting_prompt_tokens=4000), misses], 100)[0].name
        == "misses"
    )


def test_a_host_tier_hit_counts_at_its_discount() -> None:
    from kvserve.router.policy import HOST_HIT_COST, predicted_ttft

    gpu = cand("gpu", cached_tokens=1600)
    host = cand("host", host_cached_tokens=1600)
    cold = cand("cold")
    assert [c.name for c in Router("kv").rank([cold, host, gpu], 2000)] == ["gpu", "host", "cold"]
    # 400 computed tokens plus 1600 loaded at HOST_HIT_COST each, over 1000 tokens/s
    want = 0.001 + (400 + HOST_HIT_COST * 1600) / 1000.0 + 0.01
    assert predicted_ttft(host, 2000, 1000.0) == pytest.approx(want)
    # A host part reaching the whole prompt still computes its last token.
    whole = cand("whole", host_cached_tokens=5000)
    assert predicted_ttft(whole, 2000, 1000.0) == pytest.approx(
        0.001 + (1 + HOST_HIT_COST * 1999) / 1000.0 + 0.01
    )


def test_round_robin_cycles_least_load_prefers_idle_random_is_seeded() -> None:
    cands = [cand("a", in_flight=3), cand("b", in_flight=1), cand("c", in_flight=2)]
    rr = Router("round-robin")
    firsts = [rr.rank(cands, 10)[0].name for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert [c.name for c in Router("least-load").rank(cands, 10)] == ["b", "c", "a"]
    one = [c.name for c in Router("random", seed=4).rank(cands, 10)]
    assert one == [c.name for c in Router("random", seed=4).rank(cands, 10)]
    with pytest.raises(ValueError, match="--policy"):
        Router("closest")


def test_index_overlap_feeds_the_policy() -> None:
    ix = _core.PrefixIndex()
    ix.add_replica("a")
    ix.add_replica("b")
    prompt = list(range(100, 164))
    ix.store("b", _core.block_hashes(prompt[:48], 16))
    overlaps, blocks = ix.match_prompt(prompt, 16)
    assert (overlaps, blocks) == ({"a": 0, "b": 3}, 4)
    salted, _ = ix.match_prompt(prompt, 16, "tenant")
    assert salted == {"a": 0, "b": 0}, "a salt names other blocks"
    with pytest.raises(ValueError, match="hashes"):
        ix.store("a", b"\x00" * 15)
    with pytest.raises(KeyError):
        ix.store("zz", b"")


def test_addresses_parse_and_name_the_source() -> None:
    assert parse_address("10.0.0.1:50051@eu-west", "--replica") == ReplicaAddress(
        "10.0.0.1:50051", "eu-west"
    )
    assert parse_address("[::1]:7000", "x").target == "[::1]:7000"
    for bad in ("host", "host:", "host:99999", ":80"):
        with pytest.raises(DiscoveryError, match="--replica"):
            parse_address(bad, "--replica")


def test_replicas_file_is_reread_and_a_bad_edit_keeps_the_last_list(tmp_path: Path) -> None:
    path = tmp_path / "replicas.txt"
    path.write_text("# fleet\n127.0.0.1:1@a\n127.0.0.1:2  # second\n")
    d = Discovery(static=[ReplicaAddress("127.0.0.1:9")], replicas_file=path)
    assert d.refresh_file()
    assert set(d.current()) == {"127.0.0.1:9", "127.0.0.1:1", "127.0.0.1:2"}
    assert d.current()["127.0.0.1:1"].region == "a"
    assert not d.refresh_file(), "unchanged file: nothing to do"
    path.write_text("127.0.0.1:1\nnot-an-address\n")
    assert not d.refresh_file()
    assert set(d.current()) == {"127.0.0.1:9", "127.0.0.1:1", "127.0.0.1:2"}
    path.write_text("127.0.0.1:3\n")
    assert d.refresh_file()
    assert set(d.current()) == {"127.0.0.1:9", "127.0.0.1:3"}


def test_a_dns_name_resolves_to_every_address() -> None:
    import asyncio

    d = Discovery(dns=[ReplicaAddress("localhost:50051", "lab")])
    asyncio.run(d.refresh_dns())
    got = d.current()
    assert "127.0.0.1:50051" in got and got["127.0.0.1:50051"].region == "lab"
    d.dns = [ReplicaAddress("no-such-host.invalid:1")]
    asyncio.run(d.refresh_dns())  # a failed lookup keeps what was resolved before
    assert "127.0.0.1:50051" in d.current()
