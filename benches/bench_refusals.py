"""Refusals under load: a 300-request burst against a full queue, and a 5 MB prompt.

Not a test; run as a script: `python benches/bench_refusals.py [--model PATH]`.

The server runs in this process on the CPU (embedded SmolLM2 unless --model), with
`--max-num-seqs 4 --max-waiting 8`; every Generate handler is timed from its entry to its
return, so "server-side" is the handler's own time, without the client's or the transport's
queueing. The client runs in a child process (its own interpreter and GIL):

1. Four greedy streams decode; their inter-token gaps are recorded for a baseline window,
   then while a 5 MB prompt ("ab " * 1747626, far over max_model_len) is sent and refused.
2. With those four running, eight more fill the waiting queue; then 300 requests are sent
   at once. Every one must be refused with RESOURCE_EXHAUSTED; the server-side and the
   client-side refusal latencies are reported, and the event loop thread's CPU time per
   refusal (from the first burst handler's entry to the last one's exit; unlike the
   latencies it does not grow with the machine's load).

Prints one JSON object with the percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any

BURST = 300
MAX_WAITING = 8
MAX_NUM_SEQS = 4
BASELINE_S = 3.0
HUGE_PROMPT = "ab " * 1747626  # 5.2 MB


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    s = sorted(values)

    def at(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))] * 1e3

    return {"n": len(s), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": s[-1] * 1e3}


# ---- the client (child process) --------------------------------------------------------------


async def client(port: int) -> dict[str, Any]:
    import grpc

    from kvserve.server.proto import pb
    from kvserve.server.proto.service import KvServeStub

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = KvServeStub(channel)

    def request(rid: str, max_tokens: int, prompt: str = "Once upon a time") -> Any:
        return pb.GenerateRequest(
            prompt=prompt,
            request_id=rid,
            sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        )

    arrivals: list[list[float]] = []

    async def stream(rid: str, times: list[float] | None) -> None:
        try:
            async for _ in stub.Generate(request(rid, 1500), timeout=600):
                if times is not None:
                    times.append(time.perf_counter())
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise

    runners = []
    for i in range(MAX_NUM_SEQS):
        arrivals.append([])
        runners.append(asyncio.ensure_future(stream(f"run-{i}", arrivals[-1])))
    while any(len(a) < 2 for a in arrivals):
        await asyncio.sleep(0.05)
    base_start = time.perf_counter()
    await asyncio.sleep(BASELINE_S)
    huge_start, huge_details = time.perf_counter(), ""
    try:
        await stub.Generate(request("huge", 4, HUGE_PROMPT), timeout=120).read()
        huge_code = "OK"
    except grpc.aio.AioRpcError as exc:
        huge_code, huge_details = exc.code().name, exc.details()
    huge_end = time.perf_counter()
    await asyncio.sleep(0.5)  # the gap that spans the refusal ends with the next token

    def gaps(lo: float, hi: float) -> list[float]:
        out = []
        for times in arrivals:
            out += [b - a for a, b in itertools.pairwise(times) if lo <= b and a <= hi]
        return out

    baseline = gaps(base_start, huge_start)
    during = gaps(huge_start, huge_end)

    waiting = [asyncio.ensure_future(stream(f"wait-{i}", None)) for i in range(MAX_WAITING)]
    while (await stub.GetLoad(pb.GetLoadRequest(), timeout=10)).waiting < MAX_WAITING:
        await asyncio.sleep(0.05)

    async def refused(i: int) -> tuple[str, float, bool]:
        t0 = time.perf_counter()
        try:
            await stub.Generate(request(f"burst-{i}", 4), timeout=60).read()
            return "OK", time.perf_counter() - t0, False
        except grpc.aio.AioRpcError as exc:
            retry = "retry-after" in dict(exc.trailing_metadata() or ())
            return exc.code().name, time.perf_counter() - t0, retry

    results = await asyncio.gather(*(refused(i) for i in range(BURST)))
    for task in runners + waiting:
        task.cancel()
    await asyncio.gather(*runners, *waiting, return_exceptions=True)
    await channel.close()
    codes: dict[str, int] = {}
    for code, _, _ in results:
        codes[code] = codes.get(code, 0) + 1
    return {
        "itl_baseline": percentiles(baseline),
        "itl_while_5mb_refused": percentiles(during),
        "huge_prompt": {"code": huge_code, "details": huge_details[:120],
                        "latency_ms": (huge_end - huge_start) * 1e3},
        "burst_codes": codes,
        "burst_with_retry_after": sum(r for _, _, r in results),
        "burst_client": percentiles([t for _, t, _ in results]),
    }


# ---- the server (this process) ---------------------------------------------------------------


async def serve_and_measure(model: str | None) -> dict[str, Any]:
    from kvserve.async_engine import AsyncEngine
    from kvserve.engine_args import EngineArgs
    from kvserve.server.app import start_server
    from kvserve.server.config import ServerConfig
    from kvserve.server.servicer import KvServeServicer

    handler_s: list[float] = []
    # wall and event-loop-thread CPU clocks at the first burst handler's entry and at each
    # burst handler's exit: the loop's CPU per refusal does not depend on the machine's load
    clocks: dict[str, float] = {}
    generate = KvServeServicer.Generate

    async def timed(self: Any, request: Any, context: Any) -> None:
        burst = getattr(request, "request_id", "").startswith("burst-")
        if burst and "cpu0" not in clocks:
            clocks.update(cpu0=time.thread_time(), wall0=time.perf_counter())
        t0 = time.perf_counter()
        try:
            await generate(self, request, context)
        finally:
            if burst:
                handler_s.append(time.perf_counter() - t0)
                clocks.update(cpu1=time.thread_time(), wall1=time.perf_counter())

    KvServeServicer.Generate = timed  # type: ignore[method-assign]
    engine = AsyncEngine(EngineArgs(model=model, device="cpu", max_model_len=2048,
                                    max_num_seqs=MAX_NUM_SEQS, max_waiting=MAX_WAITING,
                                    kv_cache_memory="256MiB"))
    await engine.start()
    rs = await start_server(engine, ServerConfig(port=0, metrics_port=-1))
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", str(rs.port), stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        result = json.loads(out)
    finally:
        await rs.server.stop(None)
        await engine.shutdown()
    result["burst_server"] = percentiles(handler_s)
    if handler_s:
        result["burst_loop_cpu_per_refusal_ms"] = (clocks["cpu1"] - clocks["cpu0"]) / len(
            handler_s) * 1e3
        result["burst_server_span_ms"] = (clocks["wall1"] - clocks["wall0"]) * 1e3
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--client", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client is not None:
        print(json.dumps(asyncio.run(client(args.client))))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False,
                            capture_output=True, text=True,
                            cwd=os.path.dirname(__file__)).stdout.strip()
    result = asyncio.run(serve_and_measure(args.model))
    result["commit"] = commit
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
