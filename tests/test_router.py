"""`kvserve route` in front of real `kvserve serve` replicas (tiny model, CPU, loopback):
the router adds nothing to the text, its index matches what every replica caches, it
routes a conversation's next turn to the replica holding it, survives a replica killed
mid-load, sends nothing to a draining replica, refuses fast at fleet capacity, cancels
upstream, refuses a mismatched replica, follows a restarted replica and picks up a replica
added to its replicas file. One fleet for the module; the tests run in file order.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvserve.server.proto import pb
from kvserve.server.proto.service import KvServeStub
from kvserve.server.testing import KVSERVE_ROUTE, ServerProcess

ROUTE = KVSERVE_ROUTE
BLOCK = 4
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "paged",
    "attention",
    "blocks",
    "prefix",
    "cache",
]


def replica_flags(model: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(model),
        "--device",
        "cpu",
        "--kv-cache-memory",
        "1MiB",
        "--block-size",
        str(BLOCK),
        "--max-model-len",
        "256",
        "--seed",
        "7",
        "--grace-period",
        "20",
        *extra,
    ]


@dataclass
class Fleet:
    model: Path
    replicas: list[ServerProcess]
    router: ServerProcess
    replicas_file: Path

    def stub(self, proc: ServerProcess) -> KvServeStub:
        return KvServeStub(proc.channel())

    def wait_for(self, cond: Any, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.router.log()[-4000:]}")
            time.sleep(0.1)

    def load(self) -> pb.GetLoadResponse:
        return self.stub(self.router).GetLoad(pb.GetLoadRequest(), timeout=5)

    def up(self, proc: ServerProcess) -> bool:
        m = self.load().metrics
        return m.get(f"{proc.target}/up", 0.0) == 1.0 and m.get(f"{proc.target}/admitting") == 1.0


@pytest.fixture(scope="module")
def fleet(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    reps = [ServerProcess(replica_flags(tiny_llama_dir)).launch() for _ in range(4)]
    router: ServerProcess | None = None
    try:
        for r in reps:
            r.wait_ready()
        path = tmp_path_factory.mktemp("router") / "replicas.txt"
        # the fourth replica joins later, through the file
        path.write_text("".join(f"{r.target}@region{i % 2}\n" for i, r in enumerate(reps[:3])))
        router = ServerProcess(
            ["--replicas-file", str(path), "--poll-interval", "0.2", "--grace-period", "5"],
            command=ROUTE,
        ).start()
        f = Fleet(tiny_llama_dir, reps, router, path)
        f.wait_for(lambda: all(f.up(r) for r in reps[:3]), "three replicas up")
        yield f
    finally:
        if router is not None:
            router.stop()
            router.kill()
        for r in reps:
            r.kill()


def prompt(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def generate(
    stub: KvServeStub, req: pb.GenerateRequest, timeout: float = 30
) -> tuple[list[int], pb.GenerateResponse, str]:
    call = stub.Generate(req, timeout=timeout)
    msgs = list(call)
    replica = dict(call.initial_metadata()).get("kvserve-replica", "")
    return [t for m in msgs for t in m.token_ids], msgs[-1], replica


def greedy(text: str, max_tokens: int = 6, **kw: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=text,
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        **kw,
    )


def snapshot_size(proc: ServerProcess) -> int:
    call = KvServeStub(proc.channel()).StreamKvEvents(pb.StreamKvEventsRequest(), timeout=5)
    first = next(iter(call))
    call.cancel()
    assert first.snapshot
    return len(first.block_hashes) // 16


def index_matches(f: Fleet, procs: list[ServerProcess]) -> bool:
    m = f.load().metrics
    return all(m.get(f"{p.target}/indexed_blocks", -1) == snapshot_size(p) for p in procs)


def test_greedy_through_the_router_equals_a_replica(fleet: Fleet) -> None:
    rng = random.Random(1)
    direct = fleet.stub(fleet.replicas[0])
    routed = fleet.stub(fleet.router)
    for _ in range(4):
        req = greedy(prompt(rng, 12), max_tokens=8)
        want, want_last, _ = generate(direct, req)
        got, last, replica = generate(routed, req)
        assert got == want and replica in {r.target for r in fleet.replicas[:3]}
        assert last.finish_reason == want_last.finish_reason == pb.FINISH_REASON_LENGTH
    info = routed.ModelInfo(pb.ModelInfoRequest(), timeout=5)
    assert info.block_size == BLOCK and info.model
    tok = routed.Tokenize(pb.TokenizeRequest(text="the fox"), timeout=5)
    assert list(tok.token_ids) == list(
        direct.Tokenize(pb.TokenizeRequest(text="the fox")).token_ids
    )


def test_index_matches_every_replica_after_a_mixed_workload(fleet: Fleet) -> None:
    rng = random.Random(2)
    systems = [prompt(rng, 30) for _ in range(3)]
    stub = fleet.stub(fleet.router)

    async def run() -> None:
        async with fleet.router.channel(aio=True) as ch:
            s = KvServeStub(ch)
            reqs = [
                greedy(
                    rng.choice(systems) + " " + prompt(rng, rng.randrange(1, 8)),
                    max_tokens=rng.randrange(1, 8),
                    cache_salt="tenant" if i % 5 == 0 else None,
                )
                for i in range(40)
            ]
            for i in range(0, len(reqs), 8):
                await asyncio.gather(*(_drain(s.Generate(r, timeout=30)) for r in reqs[i : i + 8]))

    asyncio.run(run())
    fleet.wait_for(lambda: index_matches(fleet, fleet.replicas[:3]), "index == snapshots")
    routed = stub.GetLoad(pb.GetLoadRequest())
    assert routed.num_gpu_blocks == sum(
        fleet.stub(r).GetLoad(pb.GetLoadRequest()).num_gpu_blocks for r in fleet.replicas[:3]
    )


async def _drain(call: Any) -> list[Any]:
    return [m async for m in call]


def test_second_turn_goes_to_the_replica_holding_the_first(fleet: Fleet) -> None:
    rng = random.Random(3)
    stub = fleet.stub(fleet.router)

    def counts(name: str) -> tuple[float, float]:
        m = fleet.load().metrics
        return m[f"{name}/predicted_cached_tokens"], m[f"{name}/reported_cached_tokens"]

    for _ in range(3):
        first = prompt(rng, 40)
        _, _, replica = generate(stub, greedy(first, max_tokens=4))
        # the index has the first turn's blocks before the second is routed
        fleet.wait_for(lambda: index_matches(fleet, fleet.replicas[:3]), "index == snapshots")
        before = counts(replica)
        second = first + " " + prompt(rng, 6)
        _, last, replica2 = generate(stub, greedy(second, max_tokens=4))
        assert replica2 == replica
        assert last.usage.cached_prompt_tokens >= 32
        # the accuracy figures: what the index predicted there vs what the replica reported
        predicted, reported = (a - b for a, b in zip(counts(replica), before))
        assert reported == last.usage.cached_prompt_tokens
        assert predicted == reported


def test_cancel_and_deadline_through_the_router_free_the_replica_blocks(fleet: Fleet) -> None:
    stub = fleet.stub(fleet.router)
    rng = random.Random(4)
    long = greedy(prompt(rng, 20), max_tokens=200)
    call = stub.Generate(long, timeout=30)
    next(iter(call))
    target = dict(call.initial_metadata())["kvserve-replica"]
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        # the deadline passes mid-stream (240 tokens take longer than 50 ms)
        list(stub.Generate(greedy(prompt(rng, 20), max_tokens=240), timeout=0.05))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for r in fleet.replicas[:3]:
        fleet.wait_for(lambda r=r: _idle(fleet.stub(r)), f"{r.target} idle")
    assert target


def _idle(stub: KvServeStub) -> bool:
    load = stub.GetLoad(pb.GetLoadRequest(), timeout=5)
    return load.running == 0 and load.waiting == 0 and load.num_used_gpu_blocks == 0


def test_killing_a_replica_mid_load_loses_no_unstarted_request(fleet: Fleet) -> None:
    rng = random.Random(5)
    victim = fleet.replicas[1]
    results: list[tuple[str, int]] = []

    async def one(s: KvServeStub, req: pb.GenerateRequest) -> None:
        tokens = 0
        try:
            async for m in s.Generate(req, timeout=60):
                tokens += len(m.token_ids)
            results.append(("ok", tokens))
        except grpc.aio.AioRpcError as exc:
            results.append((exc.code().name, tokens))

    async def run() -> None:
        async with fleet.router.channel(aio=True) as ch:
            s = KvServeStub(ch)
            tasks = [
                asyncio.ensure_future(one(s, greedy(prompt(rng, 10), max_tokens=60)))
                for _ in range(24)
            ]
            await asyncio.sleep(0.4)
            victim.kill()  # SIGKILL: no drain, connections drop
            await asyncio.wait_for(asyncio.gather(*tasks), 60)

    asyncio.run(run())
    assert len(results) == 24
    for status, tokens in results:
        # a request either completes or was cut after it had streamed (never duplicated)
        assert status == "ok" or (status == "UNAVAILABLE" and tokens > 0), results
    fleet.wait_for(
        lambda: (
            victim.target not in fleet.stub(fleet.router).GetLoad(pb.GetLoadRequest()).metrics
            or fleet.load().metrics.get(f"{victim.target}/up") == 0
        ),
        "the killed replica marked down",
    )
    assert fleet.load().metrics.get(f"{victim.target}/indexed_blocks", 0) == 0
    for _ in range(6):  # the rest of the fleet serves
        _, last, replica = generate(fleet.stub(fleet.router), greedy(prompt(rng, 8)))
        assert last.finished and replica != victim.target


def test_a_restarted_replica_converges_under_its_new_instance(fleet: Fleet) -> None:
    old = fleet.replicas[1]
    port = old.port
    new = ServerProcess(replica_flags(fleet.model, "--port", str(port))).start()
    fleet.replicas[1] = new
    fleet.wait_for(lambda: fleet.up(new), "restarted replica up")
    rng = random.Random(6)
    stub = fleet.stub(fleet.router)
    for _ in range(6):
        generate(stub, greedy(prompt(rng, 20)))
    fleet.wait_for(lambda: index_matches(fleet, fleet.replicas[:3]), "index == snapshots")
    assert "restarted" in fleet.router.log() or "new instance" in fleet.router.log()


def test_a_draining_replica_receives_nothing_new(fleet: Fleet) -> None:
    drained = fleet.replicas[2]
    rng = random.Random(7)
    hold = fleet.stub(drained).Generate(greedy(prompt(rng, 10), max_tokens=240), timeout=60)
    next(iter(hold))  # a stream stays open, so the replica drains for a while
    drained.signal(signal.SIGTERM)
    fleet.wait_for(lambda: not fleet.up(drained), "router sees the drain")
    stub = fleet.stub(fleet.router)
    for _ in range(8):
        _, _, replica = generate(stub, greedy(prompt(rng, 8)))
        assert replica != drained.target
    hold.cancel()
    drained.wait(30)


def test_a_replica_added_to_the_file_starts_receiving_work(fleet: Fleet) -> None:
    added = fleet.replicas[3]
    rng = random.Random(8)
    text = prompt(rng, 48)
    generate(fleet.stub(added), greedy(text, max_tokens=2))  # only it holds this prefix
    with fleet.replicas_file.open("a") as fh:
        fh.write(f"{added.target}@region9\n")
    fleet.wait_for(lambda: fleet.up(added), "added replica up")
    _, last, replica = generate(fleet.stub(fleet.router), greedy(text + " fox", max_tokens=2))
    assert replica == added.target and last.usage.cached_prompt_tokens >= 40


def test_fleet_at_capacity_refuses_fast_and_a_mismatch_is_refused(fleet: Fleet) -> None:
    odd = ServerProcess(
        [
            "--model",
            str(fleet.model),
            "--device",
            "cpu",
            "--kv-cache-memory",
            "1MiB",
            "--block-size",
            "8",
            "--max-model-len",
            "256",
        ]
    ).launch()
    # a long context, so one held stream keeps KV in use for seconds
    good = ServerProcess(
        [
            "--model",
            str(fleet.model),
            "--device",
            "cpu",
            "--kv-cache-memory",
            "4MiB",
            "--block-size",
            "4",
            "--max-model-len",
            "4096",
        ]
    ).launch()
    odd.wait_ready()
    good.wait_ready()
    path = fleet.replicas_file.with_name("second.txt")
    path.write_text(f"{good.target}\n")
    router = ServerProcess(
        ["--replicas-file", str(path), "--poll-interval", "0.2", "--kv-usage-threshold", "0.0001"],
        command=ROUTE,
    ).start()
    try:
        stub = KvServeStub(router.channel())
        # the first replica to answer sets the fleet's model; the odd one joins after it
        fleet.wait_for(lambda: "fleet model" in router.log(), "fleet model adopted")
        path.write_text(f"{good.target}\n{odd.target}@far\n")
        deadline = time.monotonic() + 20
        while "refusing replica" not in router.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"refusing replica {odd.target}: block size 8 != fleet block size 4" in router.log()
        rng = random.Random(9)
        hold = fleet.stub(good).Generate(greedy(prompt(rng, 10), max_tokens=4000), timeout=60)
        next(iter(hold))  # the only usable replica now has KV in use above the threshold
        time.sleep(0.6)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(greedy("the fox"), timeout=10))
        took = time.monotonic() - start
        hold.cancel()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert took < 0.5
        wait = dict(err.value.trailing_metadata() or ())["retry-after"]
        assert int(wait) >= 1
        load = stub.GetLoad(pb.GetLoadRequest(), timeout=5)
        assert load.metrics[f"{odd.target}/up"] == 0.0
    finally:
        router.stop()
        router.kill()
        for proc in (odd, good):
            proc.stop()
            proc.kill()


def test_a_restarted_router_rebuilds_the_index(fleet: Fleet) -> None:
    fleet.router.stop()
    fleet.router = ServerProcess(
        ["--replicas-file", str(fleet.replicas_file), "--poll-interval", "0.2"], command=ROUTE
    ).start()
    live = [fleet.replicas[0], fleet.replicas[1], fleet.replicas[3]]
    fleet.wait_for(lambda: all(fleet.up(r) for r in live), "replicas up")
    fleet.wait_for(lambda: index_matches(fleet, live), "index == snapshots")
    assert sum(snapshot_size(r) for r in live) > 0
