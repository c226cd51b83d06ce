"""The offline API end to end on a tiny random model: stops, seeds, logprobs, chat."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvserve import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Paged attention stores", "Grüße aus München! 日本語"]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), block_size=4, kv_cache_memory="1MiB")


def test_outputs_carry_text_ids_and_reasons(llm: LLM) -> None:
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    for prompt, o in zip(PROMPTS, outs):
        assert o.prompt_token_ids == llm.tokenizer.encode(prompt)
        assert len(o.token_ids) == 10 and o.finish_reason == "length"
        assert o.text == llm.tokenizer.decode(o.token_ids)
        assert o.num_completion_tokens == 10 and o.num_prompt_tokens == len(o.prompt_token_ids)


def test_stop_string_ends_request_without_emitting_it(llm: LLM) -> None:
    base = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24,
                                                ignore_eos=True))
    for prompt, o in zip(PROMPTS, base):
        text = o.text
        stop = text[len(text) // 2: len(text) // 2 + 2]
        if not stop.strip():
            continue
        cut = text.find(stop)
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24,
                                                    ignore_eos=True, stop=[stop, "@@@@"]))[0]
        assert out.text == text[:cut], (text, stop)
        assert out.finish_reason == "stop"
    assert not llm.engine.has_unfinished()
    llm.engine.core.check_invariants()
    assert llm.engine.core.num_used_gpu_blocks == 0  # core.finish freed the blocks


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    base = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12,
                                                     ignore_eos=True))[0].token_ids
    stop_id = base[4]
    first = base.index(stop_id)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12,
                                                    ignore_eos=True,
                                                    stop_token_ids=[stop_id]))[0]
    assert out.token_ids == base[: first + 1] and out.finish_reason == "stop"
    out = llm.generate([PROMPTS[0]], SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id],
        min_tokens=first + 2))[0]
    assert len(out.token_ids) >= first + 2
    assert stop_id not in out.token_ids[: first + 2]


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16,
                            ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], seeded)[0].token_ids
    noisy = SamplingParams(temperature=1.2, max_tokens=16, ignore_eos=True)
    batch = llm.generate(PROMPTS + [PROMPTS[1]], [noisy, seeded, noisy, noisy])
    assert batch[1].token_ids == alone
    other = llm.generate([PROMPTS[1]], SamplingParams(temperature=1.0, top_p=0.9, seed=99,
                                                      max_tokens=16, ignore_eos=True))
    assert other[0].token_ids != alone  # the seed matters (16 tokens from ~380: no collision)


def test_logprobs_per_token(llm: LLM) -> None:
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=6,
                                                    ignore_eos=True, logprobs=3))[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and len(entry) >= 3
        assert entry[tok] == max(entry.values())  # greedy picked the most likely token


def test_chat_applies_template(llm: LLM) -> None:
    msgs = [{"role": "user", "content": "hello"}]
    out = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    want = llm.tokenizer.encode("<s>user: hello</s><s>assistant: ", add_special_tokens=False)
    assert out.prompt_token_ids == want


def _token_deltas(llm: LLM, prompt: str, params: SamplingParams) -> list[str]:
    """The text each generated token added (one delta per token), through the step loop."""
    engine = llm.engine
    engine.add_request("deltas", prompt, params)
    pieces: list[str] = []
    while engine.has_unfinished():
        pieces += [d.text for d in engine.step()]
    return pieces


def test_stop_strings_wait_for_min_tokens(llm: LLM) -> None:
    """Like EOS and stop ids, a stop string ends a request only from token min_tokens + 1
    on; one that completes earlier is ordinary text (vLLM's behaviour)."""
    from test_tokenizer_stream import stop_reference

    ignored_early = 0
    for prompt in PROMPTS:
        for min_tokens in (3, 6):
            params = {"temperature": 0.0, "max_tokens": 16, "ignore_eos": True,
                      "min_tokens": min_tokens}
            pieces = _token_deltas(llm, prompt, SamplingParams(**params))
            early = "".join(pieces[:min_tokens])
            stop = early.strip()[-2:]
            if not stop:
                continue
            want, hit = stop_reference([stop], pieces, min_tokens)
            ignored_early += early.find(stop) >= 0
            out = llm.generate([prompt], SamplingParams(**params, stop=[stop]))[0]
            assert out.text == want, (prompt, min_tokens, stop, pieces)
            assert out.finish_reason == ("stop" if hit else "length")
            assert len(out.token_ids) >= min_tokens + (1 if hit else 0)
    assert ignored_early >= 3  # the stop string did occur inside the first min_tokens
    assert llm.engine.core.num_used_gpu_blocks == 0
