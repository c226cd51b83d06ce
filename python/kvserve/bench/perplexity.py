"""Perplexity of a token sequence through the engine's own runner and paged KV cache.

The text is fed as chunked prefills of one sequence, so every chunk after the first reads
the earlier chunks back from the cache: with --kv-cache-dtype fp8_e4m3 the score includes
exactly the quantization the cache applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from kvserve.engine import LLMEngine
from kvserve.runner import ModelRunner, StepInputs


@dataclass(frozen=True)
class TextScore:
    """How a model predicts a text, teacher-forced: each position sees the true prefix."""

    perplexity: float  # exp(mean next-token NLL) over token_ids[1:]
    argmax: npt.NDArray[np.int64]  # the top next token at each position (len(token_ids) - 1)


def score_text(engine: LLMEngine, token_ids: list[int], chunk: int = 512) -> TextScore:
    """Perplexity and per-position top token over token_ids, using blocks 0.. of the pool."""
    runner, block = engine.runner, engine.args.block_size
    if not isinstance(runner, ModelRunner):
        raise ValueError("engine: perplexity needs the model (not --executor sim)")
    n = len(token_ids)
    blocks = (n + block - 1) // block
    if blocks > runner.num_blocks or n > engine.max_model_len:
        raise ValueError(f"token_ids: {n} tokens do not fit the pool / max_model_len")
    table = np.arange(blocks, dtype=np.int32)[None, :]
    ids = np.asarray(token_ids, dtype=np.int64)
    nll, count, tops = 0.0, 0, []
    for start in range(0, n - 1, chunk):
        end = min(start + chunk, n - 1)  # the last token is only a target
        logits = runner.forward(StepInputs(
            input_ids=ids[start:end], positions=np.arange(start, end, dtype=np.int64),
            slot_mapping=np.arange(start, end, dtype=np.int64),  # blocks 0.. in order
            query_start_loc=np.array([0, end - start], dtype=np.int32),
            seq_lens=np.array([end], dtype=np.int32), block_table=table,
            logits_indices=np.arange(end - start, dtype=np.int64)))
        targets = torch.from_numpy(ids[start + 1:end + 1]).to(logits.device)
        nll += float(torch.nn.functional.cross_entropy(logits.float(), targets,
                                                       reduction="sum"))
        tops.append(logits.argmax(dim=-1).cpu().numpy().astype(np.int64))
        count += end - start
    return TextScore(math.exp(nll / count), np.concatenate(tops))


def perplexity(engine: LLMEngine, token_ids: list[int], chunk: int = 512) -> float:
    """exp(mean next-token NLL) over token_ids[1:], using blocks 0.. of the engine's pool."""
    return score_text(engine, token_ids, chunk).perplexity
