"""KV events by tier from a core to a router's index: the server's snapshot message names
each hash's tier, and the router's IndexFeed applies snapshots and events of both tiers
(kinds 1-4) to the Rust PrefixIndex, which then answers by tier as the core holds it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np

from kvserve._core import Core, PrefixIndex
from kvserve.router.index_feed import IndexFeed
from kvserve.server.kv_events import snapshot_fields
from kvserve.server.proto import pb

BS = 4


def run_to_end(core: Core) -> None:
    """Runs every request and the copy-only plans after them; tokens are arbitrary."""
    for _ in range(1000):
        plan = core.schedule()
        if not plan.must_commit:
            if not core.has_unfinished():
                return
            continue
        core.commit(plan.id, np.zeros(len(plan.sample_handles), np.int64))
    raise AssertionError("never settled")


class FakeCall:
    """A StreamKvEvents call that yields the given messages, then ends."""

    def __init__(self, msgs: list[pb.KvEvents]) -> None:
        self.msgs = msgs

    def __aiter__(self) -> Any:
        return self._gen()

    async def _gen(self) -> Any:
        for m in self.msgs:
            yield m

    def cancel(self) -> None:
        pass


def follow(index: PrefixIndex, msgs: list[pb.KvEvents]) -> SimpleNamespace:
    replica = SimpleNamespace(
        name="r", connected=False, instance_id="", stub=SimpleNamespace(
            StreamKvEvents=lambda *a, **k: FakeCall(msgs)))
    replicas = SimpleNamespace(upstream=SimpleNamespace(metadata=lambda: ()),
                               mark_down=lambda r, why: None)
    feed = IndexFeed(index, replicas)  # type: ignore[arg-type]
    asyncio.run(feed.follow(replica))  # type: ignore[arg-type]
    return replica


def split(b: bytes) -> set[bytes]:
    return {b[i : i + 16] for i in range(0, len(b), 16)}


def test_snapshot_and_events_of_both_tiers_rebuild_the_index() -> None:
    core = Core(num_gpu_blocks=12, block_size=BS, num_host_blocks=64, watermark=0.0,
                kv_bytes_per_token=1, flops_per_token=1e9, host_prefix_cache=True)
    core.enable_kv_events(4096)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 50, 32).tolist() for _ in range(4)]
    core.add_request("a", prompts[0], 1)
    run_to_end(core)
    seq, gpu, host = core.kv_snapshot()
    assert split(host) and split(gpu)
    fields = snapshot_fields(gpu, host)
    assert fields["kinds"] == b"\x01" * (len(gpu) // 16) + b"\x03" * (len(host) // 16)
    assert snapshot_fields(gpu, b"") == {"block_hashes": gpu}
    core.drain_kv_events()  # covered by the snapshot
    for i, p in enumerate(prompts[1:]):
        core.add_request(f"b{i}", p, 1)
        run_to_end(core)
    _, first, kinds, hashes = core.drain_kv_events()
    assert first == seq + 1 and {1, 2, 3} <= set(kinds)
    msgs = [
        pb.KvEvents(snapshot=True, seq=seq, **fields),
        pb.KvEvents(seq=first, kinds=kinds, block_hashes=hashes),
    ]
    ix = PrefixIndex()
    r = follow(ix, msgs)
    assert r.connected
    _, gpu_now, host_now = core.kv_snapshot()
    for p in prompts:
        want_gpu = 0
        for h in (core_chain := _chain(p)):
            if h not in split(gpu_now):
                break
            want_gpu += 1
        want_any = 0
        for h in core_chain:
            if h not in split(gpu_now) | split(host_now):
                break
            want_any += 1
        assert ix.match_prompt_tiers(p, BS)[0] == {"r": (want_gpu, want_any)}
    assert ix.host_blocks("r") == len(split(host_now))
    assert len(ix) == len(split(gpu_now))


def _chain(tokens: list[int]) -> list[bytes]:
    from kvserve._core import block_hashes

    b = block_hashes(tokens, BS)
    return [b[i : i + 16] for i in range(0, len(b), 16)]


def test_a_host_evicted_event_drops_the_host_entry() -> None:
    core = Core(num_gpu_blocks=12, block_size=BS, num_host_blocks=8, watermark=0.0,
                kv_bytes_per_token=1, flops_per_token=1e9, host_prefix_cache=True)
    core.enable_kv_events(4096)
    rng = np.random.default_rng(2)
    for i in range(4):  # 8 blocks each through an 8-block host tier: it evicts
        core.add_request(f"p{i}", rng.integers(0, 50, 32).tolist(), 1)
        run_to_end(core)
    _, first, kinds, hashes = core.drain_kv_events()
    assert 4 in set(kinds)
    assert core.metrics()["host_evictions"] > 0
    ix = PrefixIndex()
    r = follow(ix, [pb.KvEvents(snapshot=True, seq=first - 1),
                    pb.KvEvents(seq=first, kinds=kinds, block_hashes=hashes)])
    assert r.connected
    _, _, host = core.kv_snapshot()
    assert ix.host_blocks("r") == len(split(host)) == 8
