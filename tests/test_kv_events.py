"""StreamKvEvents through a real `kvserve serve` subprocess: a subscriber's snapshot plus
live events rebuild exactly the set of block hashes the replica caches, named by the
core's own chain (kvserve._core.block_hashes) over each request's computed tokens; a late
subscriber's snapshot equals the live view; GetLoad carries the router fields.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvserve import _core
from kvserve.server.proto import pb
from kvserve.server.proto.service import KvServeStub
from kvserve.server.testing import ServerProcess
from serving import cpu_flags, served

BLOCK = 4


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[ServerProcess]:
    # a small pool: the workload below evicts, so evicted events are exercised too
    yield from served(cpu_flags(tiny_llama_dir, "96KiB", "--block-size", str(BLOCK),
                                "--max-model-len", "128", "--seed", "3"))


class Follower:
    """Applies a replica's KV event stream to a set, checking sequence numbers."""

    def __init__(self, stub: KvServeStub) -> None:
        self.call = stub.StreamKvEvents(pb.StreamKvEventsRequest())
        self.held: set[bytes] = set()
        self.next_seq = 0
        self.snapshots = 0
        self.instance = ""
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for msg in self.call:
                with self.lock:
                    self._apply(msg)
        except grpc.RpcError:
            pass

    def _apply(self, msg: pb.KvEvents) -> None:
        hashes = [msg.block_hashes[i : i + 16] for i in range(0, len(msg.block_hashes), 16)]
        assert msg.block_size == BLOCK
        self.instance = msg.instance_id
        if msg.snapshot:
            self.held = set(hashes)
            self.next_seq = msg.seq + 1
            self.snapshots += 1
            return
        assert msg.seq == self.next_seq, "events arrive in order, none missing"
        assert len(msg.kinds) == len(hashes)
        for kind, h in zip(msg.kinds, hashes):
            if kind == 1:
                assert h not in self.held
                self.held.add(h)
            else:
                assert kind == 2 and h in self.held
                self.held.remove(h)
        self.next_seq += len(hashes)

    def view(self) -> set[bytes]:
        with self.lock:
            return set(self.held)

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)


def settled(f: Follower, other: Follower, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while f.view() != other.view() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_events_rebuild_the_cache(server: ServerProcess) -> None:
    rng = random.Random(5)
    with server.channel() as channel:
        stub = KvServeStub(channel)
        early = Follower(stub)
        time.sleep(0.3)
        systems = [[rng.randrange(3, 250) for _ in range(24)] for _ in range(3)]
        chains: list[list[bytes]] = []
        for i in range(40):
            prompt = rng.choice(systems)[: rng.randrange(4, 24)] + [
                rng.randrange(3, 250) for _ in range(rng.randrange(1, 12))
            ]
            req = pb.GenerateRequest(
                prompt_token_ids=pb.TokenIds(ids=prompt),
                sampling=pb.SamplingParams(
                    max_tokens=rng.randrange(1, 9), temperature=0.0, ignore_eos=True
                ),
                cache_salt="t" if i % 7 == 0 else None,
            )
            out = [t for m in stub.Generate(req, timeout=30) for t in m.token_ids]
            computed = prompt + out[:-1]  # the last sampled token has no KV yet
            hs = _core.block_hashes(computed, BLOCK, req.cache_salt or None)
            chains.append([hs[j : j + 16] for j in range(0, len(hs), 16)])
        late = Follower(stub)
        settled(late, early)
        held = early.view()
        assert held == late.view(), "a fresh snapshot equals the live view"
        assert early.instance == late.instance and early.instance
        every = {h for c in chains for h in c}
        assert held <= every, "only blocks the requests computed are reported"
        assert chains[-1] and set(chains[-1]) <= held, "the latest request's blocks are cached"
        load = stub.GetLoad(pb.GetLoadRequest())
        assert load.num_used_gpu_blocks + load.num_cached_gpu_blocks >= len(held)
        # an evicting workload: the pool is smaller than what was computed
        assert len(every) > load.num_gpu_blocks and len(held) < len(every)
        assert load.instance_id == early.instance
        assert load.prefill_tokens_per_s > 0 and load.decode_step_s > 0
        assert load.waiting_prompt_tokens == 0 and load.retry_after_s >= 1
        early.close()
        late.close()


def test_events_and_load_need_the_api_key(tiny_llama_dir: Path) -> None:
    with (
        ServerProcess(
            cpu_flags(tiny_llama_dir, "1MiB", "--metrics-port", "-1"),
            env={"KVSERVE_API_KEY": "sekrit"},
        ) as proc,
        proc.channel() as channel,
    ):
        stub = KvServeStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            next(iter(stub.StreamKvEvents(pb.StreamKvEventsRequest(), timeout=5)))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        first = next(
            iter(
                stub.StreamKvEvents(
                    pb.StreamKvEventsRequest(),
                    timeout=5,
                    metadata=(("authorization", "Bearer sekrit"),),
                )
            )
        )
        assert first.snapshot and first.instance_id
