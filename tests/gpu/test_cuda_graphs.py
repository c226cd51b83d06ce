"""Decode CUDA graphs: replays equal eager launches, and the engine's output does not move."""

from __future__ import annotations

import gc

import torch
from test_engine_cuda import TIE, _tiny_model


def _llm(model_dir, enforce_eager: bool, dtype: str = "float16"):
    from kvserve import LLM

    return LLM(
        model=str(model_dir),
        attention_backend="cuda",
        dtype=dtype,
        gpu_memory_utilization=0.3,
        max_num_batched_tokens=512,
        max_model_len=1024,
        max_num_seqs=24,
        block_size=16,
        enforce_eager=enforce_eager,
    )


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]


def test_capture_sizes_cover_every_batch() -> None:
    from kvserve.cuda_graphs import capture_sizes

    for max_seqs in (1, 3, 8, 17, 24, 256):
        sizes = capture_sizes(max_seqs)
        assert sizes == sorted(set(sizes)) and sizes[-1] == max_seqs
        assert all(any(s >= n for s in sizes) for n in range(1, max_seqs + 1))


def test_graph_replay_equals_eager_forward_on_the_same_inputs(tmp_path) -> None:
    from kvserve import SamplingParams

    vocab = _tiny_model(tmp_path)
    llm = _llm(tmp_path, enforce_eager=False)
    graphs = llm.engine.runner.graphs
    assert graphs is not None, "graphs should be captured for a capturable backend on CUDA"
    replayed = graphs.run
    checked: list[int] = []

    def run_and_compare(plan, greedy_only=False):
        # Never ahead here: the eager forward below reads the static inputs of this step.
        logits = replayed(plan).clone()
        n = int(plan.num_seqs)
        bs = next(s for s in graphs.sizes if s >= n)
        greedy = graphs.last_greedy.clone()
        eager, eager_greedy = graphs._forward(bs)  # the same static inputs, launched eagerly
        assert torch.equal(logits, eager[:n]), f"batch {n} (graph {bs}): replay != eager"
        assert torch.isfinite(logits).all()
        # The in-graph greedy tokens are the argmax of those logits.
        assert torch.equal(greedy, eager_greedy[:n]) and torch.equal(greedy, logits.argmax(-1))
        checked.append(n)
        return logits

    graphs.run = run_and_compare
    # Batches of different sizes hit different captured graphs (and padding rows).
    prompts = _prompts(vocab, [5, 17, 33, 64, 100, 3, 16, 250, 31], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert all(len(o.token_ids) == 12 for o in outs)
    assert len(set(checked)) >= 2, f"decode steps replayed: {checked}"
    del graphs.run  # back to the method; no reference cycle left behind
    llm.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def test_engine_tokens_match_with_graphs_on_and_off(tmp_path) -> None:
    from kvserve import SamplingParams

    vocab = _tiny_model(tmp_path)
    prompts = _prompts(vocab, [1, 15, 17, 64, 300, 7, 40], seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)
    runs = []
    for eager in (True, False):
        llm = _llm(tmp_path, enforce_eager=eager)
        assert (llm.engine.runner.graphs is None) == eager
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        runs.append([(list(o.token_ids), list(o.logprobs)) for o in outs])
        llm.close()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    # Graphs fix the split-KV layout at capture (for max_model_len), eager picks it per step:
    # the two sum in a different order, so only a true near-tie may flip a greedy choice.
    tie = TIE["float16"]
    for i, ((a_tok, a_lp), (b_tok, b_lp)) in enumerate(zip(*runs)):
        for step, (a, b) in enumerate(zip(a_tok, b_tok)):
            top = sorted(a_lp[step].values(), reverse=True)
            if a != b:
                assert top[0] - top[1] < tie, f"prompt {i} step {step}: {a} vs {b}, no tie"
                break
            assert abs(a_lp[step][a] - b_lp[step][b]) < tie, f"prompt {i} step {step}"


def _outputs(tmp_path, prompts, params, enforce_eager: bool = False) -> tuple[list, int]:
    """(token ids, logprobs, finish reason) per prompt from a fresh LLM, and how many decode
    steps it ran ahead; the LLM is closed and its memory released."""
    llm = _llm(tmp_path, enforce_eager=enforce_eager)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    graphs = llm.engine.runner.graphs
    used = graphs.steps_ahead_used if graphs is not None else 0
    rows = [(list(o.token_ids), list(o.logprobs or []), o.finish_reason) for o in outs]
    llm.close()
    del llm, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return rows, used


def _generate_tokens(tmp_path, prompts, params, run_ahead: bool) -> tuple[list, int]:
    from kvserve import cuda_graphs

    saved = cuda_graphs.RUN_AHEAD
    cuda_graphs.RUN_AHEAD = run_ahead
    try:
        rows, used = _outputs(tmp_path, prompts, params)
    finally:
        cuda_graphs.RUN_AHEAD = saved
    return [(tokens, reason) for tokens, _, reason in rows], used


def test_run_ahead_gives_the_same_tokens(tmp_path) -> None:
    """Greedy decode with the next step launched ahead equals plain steps token for token:
    rows of different lengths cross block boundaries (block 16) at different steps, end at
    different steps (max_tokens, eos) and batches shrink, so run-ahead steps are both used
    and dropped. The run-ahead step is the same graph on the same inputs: bit-identical."""
    from kvserve import SamplingParams

    vocab = _tiny_model(tmp_path)
    prompts = _prompts(vocab, [1, 15, 16, 17, 40, 64, 3, 100], seed=21)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=i % 3 != 0,
                             stop_token_ids=[5] if i == 4 else None)
              for i, n in enumerate((40, 7, 23, 33, 60, 2, 19, 45))]
    on, used_on = _generate_tokens(tmp_path, prompts, params, run_ahead=True)
    off, used_off = _generate_tokens(tmp_path, prompts, params, run_ahead=False)
    assert on == off
    assert used_off == 0 and used_on > 20, f"run-ahead steps used: {used_on}"


def test_run_ahead_stays_off_when_logits_are_read(tmp_path) -> None:
    """A batch that wants logprobs (or samples) reads the logits: nothing runs ahead, and
    the output equals the plain run's."""
    from kvserve import SamplingParams

    vocab = _tiny_model(tmp_path)
    prompts = _prompts(vocab, [9, 30], seed=22)
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)]
    on, used_on = _generate_tokens(tmp_path, prompts, params, run_ahead=True)
    off, _ = _generate_tokens(tmp_path, prompts, params, run_ahead=False)
    assert on == off
    # Only the steps after the logprobs row finished could run ahead: none here (same length).
    assert used_on == 0
