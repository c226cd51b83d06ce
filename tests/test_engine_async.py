"""AsyncEngine: streamed deltas, early validation errors, cancellation aborts at once."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from kvserve import SamplingParams
from kvserve.async_engine import AsyncEngine
from kvserve.engine_args import EngineArgs
from kvserve.outputs import StepStats


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> AsyncEngine:
    return AsyncEngine(EngineArgs(model=str(tiny_llama_dir), block_size=4,
                                  kv_cache_memory="1MiB"))


def test_streams_cancel_and_load(engine: AsyncEngine) -> None:
    stats: list[StepStats] = []
    engine.add_step_listener(stats.append)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = engine.engine.tokenizer  # for decoding checks

    async def collect(prompt: str) -> tuple[str, list[int], list]:
        text, ids, items = "", [], []
        async for item in engine.generate(prompt, greedy):
            text += item.text
            ids += item.token_ids
            items.append(item)
        return text, ids, items

    async def main() -> None:
        await engine.start()
        try:
            results = await asyncio.gather(*(collect(p) for p in
                                             ["The quick brown fox", "Prefix caching", "A"]))
            for text, ids, items in results:
                assert len(ids) == 12 and text == want.decode(ids)
                assert [i.finished for i in items] == [False] * (len(items) - 1) + [True]
                final = items[-1]
                assert final.finish_reason == "length" and final.num_completion_tokens == 12
                assert final.num_prompt_tokens > 0

            # Validation errors surface at the first __anext__, before anything is queued.
            bad = engine.generate("", greedy)
            with pytest.raises(ValueError, match="prompt"):
                await bad.__anext__()
            with pytest.raises(ValueError, match="top_k"):
                await engine.generate("x", SamplingParams(top_k=-5)).__anext__()

            # Leaving a stream early aborts the request in the core at once.
            long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
            stream = engine.generate("The quick", long, request_id="to-cancel")
            await stream.__anext__()
            await stream.aclose()
            assert engine.engine.core.request_stats("to-cancel")["state"] == "aborted"

            task = asyncio.create_task(collect_one(engine, "cancel-me", long))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert engine.engine.core.request_stats("cancel-me")["state"] == "aborted"

            # engine.abort ends the stream with finish_reason "abort".
            stream = engine.generate("The quick", long, request_id="server-abort")
            await stream.__anext__()
            assert engine.abort("server-abort")
            items = [i async for i in stream]
            assert items[-1].finished and items[-1].finish_reason == "abort"

            load = engine.load()
            for key in ("kv_usage", "host_kv_usage", "running", "waiting", "swapped",
                        "tokens_last_step", "prefix_hit_rate", "admitting"):
                assert key in load
            assert load["admitting"] is True and load["running"] == 0
            info = engine.model_info
            assert info["block_size"] == 4 and info["dtype"] == "float32"
        finally:
            await engine.shutdown()

    asyncio.run(main())
    engine.engine.core.check_invariants()
    assert engine.engine.core.num_used_gpu_blocks == 0
    assert stats and all(s.num_tokens > 0 and s.flops_estimate > 0 for s in stats)
    assert any(s.num_prefill_tokens > 0 for s in stats)


async def collect_one(engine: AsyncEngine, request_id: str, params: SamplingParams) -> None:
    async for _ in engine.generate("The quick", params, request_id=request_id):
        pass


def test_a_full_queue_refuses_before_tokenizing_or_locking(tiny_llama_dir: Path) -> None:
    """The refusal of a burst must be cheap: no tokenizer call, no wait for the core lock
    (which the step thread holds through every schedule and commit)."""
    from kvserve._core import AtCapacityError

    engine = AsyncEngine(EngineArgs(model=str(tiny_llama_dir), kv_cache_memory="1MiB",
                                    max_num_seqs=1, max_waiting=3))
    encoded: list[str] = []
    tok = engine.engine.tokenizer
    real_encode = tok.encode

    def counting_encode(text: str, add_special_tokens: bool = True) -> list[int]:
        encoded.append(text)
        return real_encode(text, add_special_tokens)

    tok.encode = counting_encode  # type: ignore[method-assign]
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    for i in range(3):  # the step loop is not running yet: all three stay queued
        engine.engine.add_request(f"queued-{i}", f"the quick brown fox {i}", long)
    assert engine.engine.core.num_waiting == engine.engine.args.max_waiting == 3
    encoded.clear()

    held, release = threading.Event(), threading.Event()

    def hold_lock() -> None:  # as if a long commit were under way on the step thread
        with engine.engine._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    held.wait(10)

    async def main() -> float:
        await engine.start()
        try:
            start = time.perf_counter()
            with pytest.raises(AtCapacityError, match="at capacity"):
                await engine.generate("a prompt to refuse", long).__anext__()
            return time.perf_counter() - start
        finally:
            release.set()
            await asyncio.to_thread(holder.join)
            await engine.shutdown()

    try:
        took = asyncio.run(main())
    finally:
        release.set()
    assert took < 1.0  # the lock was held for up to 10 s
    assert encoded == []
