"""The open-loop driver: sends requests at their arrival times and records what came back.

Open loop means arrivals never wait for earlier answers (that is what a fleet sees); an
optional concurrency cap turns it into a fixed-concurrency run.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from kvserve.bench.workloads import RequestSpec, Workload, poisson_arrivals


@dataclass
class StreamEvent:
    """One streamed delta as the load generator sees it."""

    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    cached_prompt_tokens: int = 0


class BenchClient(Protocol):
    def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]: ...

    async def load(self) -> dict[str, float]: ...

    async def limits(self) -> tuple[int, int]: ...

    async def close(self) -> None: ...


@dataclass
class RequestRecord:
    request_id: str
    conversation: int
    turn: int
    prompt_tokens: int
    send_s: float
    first_token_s: float | None = None
    end_s: float | None = None
    output_token_ids: list[int] = field(default_factory=list)
    token_gaps_s: list[float] = field(default_factory=list)
    cached_prompt_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.send_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.send_s


@dataclass
class LoadRun:
    rate: float
    concurrency: int
    duration_s: float
    records: list[RequestRecord]
    load_before: dict[str, float]
    load_after: dict[str, float]


async def _send(client: BenchClient, spec: RequestSpec, t0: float) -> RequestRecord:
    record = RequestRecord(
        request_id=spec.request_id,
        conversation=spec.conversation,
        turn=spec.turn,
        prompt_tokens=len(spec.prompt_token_ids),
        send_s=time.perf_counter() - t0,
    )
    last = record.send_s
    try:
        async for event in client.stream(spec):
            now = time.perf_counter() - t0
            if event.token_ids:
                if record.first_token_s is None:
                    record.first_token_s = now
                    # Tokens that came with the first one arrived with no gap at all.
                    record.token_gaps_s.extend([0.0] * (len(event.token_ids) - 1))
                else:
                    # A delta holding k tokens spreads its gap over them.
                    gap = (now - last) / len(event.token_ids)
                    record.token_gaps_s.extend([gap] * len(event.token_ids))
                last = now
                record.output_token_ids.extend(event.token_ids)
            if event.finished:
                record.finish_reason = event.finish_reason
                record.cached_prompt_tokens = event.cached_prompt_tokens
        record.end_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - a refused or failed request is a result
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def run_load(
    client: BenchClient,
    workload: Workload,
    num_requests: int,
    rate: float,
    concurrency: int = 0,
    seed: int = 0,
    on_done: Callable[[RequestRecord], object] | None = None,
) -> LoadRun:
    """Send `num_requests` requests (multi-turn follow-ups included) and wait for all."""
    if num_requests < 1:
        raise ValueError(f"num_requests: must be >= 1, got {num_requests}")
    if concurrency < 0:
        raise ValueError(f"concurrency: must be >= 0, got {concurrency}")
    turns = workload.turns if workload.name == "multiturn" else 1
    conversations = math.ceil(num_requests / turns)
    arrivals = poisson_arrivals(conversations, rate, seed)
    cap = asyncio.Semaphore(concurrency) if concurrency > 0 else None
    records: list[RequestRecord] = []
    budget = [num_requests]  # requests still allowed, follow-ups included
    load_before = await client.load()
    t0 = time.perf_counter()

    async def conversation(first: RequestSpec, at: float) -> None:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        spec: RequestSpec | None = first
        while spec is not None and budget[0] > 0:
            budget[0] -= 1
            if cap is not None:
                async with cap:
                    record = await _send(client, spec, t0)
            else:
                record = await _send(client, spec, t0)
            records.append(record)
            if on_done is not None:
                on_done(record)
            if not record.ok:
                return
            spec = workload.follow_up(spec, record.output_token_ids)
            if spec is not None:
                await asyncio.sleep(workload.think_time())

    firsts = [workload.new_request(i) for i in range(conversations)]
    await asyncio.gather(*(conversation(s, float(at)) for s, at in zip(firsts, arrivals)))
    duration = time.perf_counter() - t0
    load_after = await client.load()
    return LoadRun(rate, concurrency, duration, records, load_before, load_after)
