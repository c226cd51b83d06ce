"""Bad input gives a clear error naming the field; nothing is queued; other requests go on."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvserve import LLM, SamplingParams
from kvserve.engine_args import EngineArgs, parse_size


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), block_size=4, max_model_len=64, kv_cache_memory="1MiB")


def test_bad_requests_leave_the_engine_serving(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = llm.generate(["The quick brown fox"], greedy)[0].token_ids
    engine = llm.engine
    engine.add_request("good", "The quick brown fox", greedy)
    bad = [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "fox " * 200}, "max_model_len"),
        ({"prompt": None, "prompt_token_ids": [1, 2, 10**6]}, "prompt_token_ids"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "x", "prompt_token_ids": [1]}, "prompt"),
        ({"prompt": None, "messages": [{"role": "user"}]}, "messages"),
    ]
    for kwargs, field_name in bad:
        with pytest.raises(ValueError, match=field_name):
            engine.add_request(None, params=greedy, **kwargs)
    with pytest.raises(ValueError, match="good"):  # duplicate live request id
        engine.add_request("good", "again", greedy)
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request(None, "ok", SamplingParams(top_p=2.0))
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request(None, "ok", SamplingParams(stop_token_ids=[10**6]))
    # What the core owns it alone checks; its message starts with the field.
    with pytest.raises(ValueError, match=r"^min_tokens: 4 is more than max_tokens 3"):
        engine.add_request(None, "ok", SamplingParams(max_tokens=3, min_tokens=4))
    with pytest.raises(ValueError, match=r"^min_tokens: .*more than max_tokens"):
        engine.add_request(None, None, SamplingParams(min_tokens=70), prompt_token_ids=[1] * 8)
    with pytest.raises(ValueError, match=r"^prompt_token_ids: .*max_model_len is 64"):
        engine.add_request(None, None, greedy, prompt_token_ids=[1] * 64)
    assert engine.metrics()["waiting"] == 1  # only the good request was queued
    tokens: list[int] = []
    while engine.has_unfinished():
        for d in engine.step():
            tokens += d.token_ids
    assert tokens == alone
    engine.core.check_invariants()


def test_missing_model_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LLM(str(tmp_path / "nowhere"))


def test_engine_args_validation() -> None:
    assert parse_size("512MiB", "x") == 512 * 2**20
    assert parse_size("2GB", "x") == 2 * 10**9
    assert parse_size(1024, "x") == 1024
    with pytest.raises(ValueError, match="kv_cache_memory"):
        EngineArgs(kv_cache_memory="lots")
    with pytest.raises(ValueError, match="dtype"):
        EngineArgs(dtype="int3")
    with pytest.raises(ValueError, match="preemption_mode"):
        EngineArgs(preemption_mode="maybe")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineArgs(gpu_memory_utilization=1.5)


def test_cuda_backend_on_cpu_is_a_clear_error(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="attention_backend"):
        LLM(str(tiny_llama_dir), attention_backend="cuda", device="cpu")


def test_full_waiting_queue_refuses_without_losing_work(tiny_llama_dir: Path) -> None:
    from kvserve._core import AtCapacityError

    small = LLM(str(tiny_llama_dir), block_size=4, max_waiting=2, kv_cache_memory="1MiB")
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine = small.engine
    engine.add_request("a", "The quick", greedy)
    engine.add_request("b", "brown fox", greedy)
    with pytest.raises(AtCapacityError):
        engine.add_request("c", "jumps", greedy)
    done = set()
    while engine.has_unfinished():
        done |= {d.request_id for d in engine.step() if d.finished}
    assert done == {"a", "b"}
    engine.add_request("c", "jumps", greedy)  # room again once the queue drained
    engine.core.check_invariants()


def test_unlocked_counts_fall_back_to_the_lock_while_the_core_is_borrowed(llm: LLM) -> None:
    """The binding refuses a read while another thread holds the core mutably; the engine's
    lock-free counts then read under its lock instead of failing the request."""
    engine = llm.engine
    real = engine.core

    class Borrowed:  # as the binding answers while the step thread is inside commit
        def __getattr__(self, name: str) -> object:
            if not engine._lock.locked():
                raise RuntimeError("Already mutably borrowed")
            return getattr(real, name)

    engine.core = Borrowed()  # type: ignore[assignment]
    try:
        assert engine.admitting() is True
        assert engine.num_unfinished() == 0
        assert "0 requests waiting" in str(engine.at_capacity_error())
    finally:
        engine.core = real
