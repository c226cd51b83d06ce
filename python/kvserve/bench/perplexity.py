"""Perplexity of a token sequence through the engine's own runner and paged KV cache.

The text is fed as chunked prefills of one sequence, so every chunk after the first reads
the earlier chunks back from the cache: with --kv-cache-dtype fp8_e4m3 the score includes
exactly the quantization the cache applies.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from kvserve.engine import LLMEngine

_NO_PAIRS = np.zeros((0, 2), dtype=np.int64)


def perplexity(engine: LLMEngine, token_ids: list[int], chunk: int = 512) -> float:
    """exp(mean next-token NLL) over token_ids[1:], using blocks 0.. of the engine's pool."""
    runner, block = engine.runner, engine.args.block_size
    n = len(token_ids)
    blocks = (n + block - 1) // block
    if blocks > runner.num_blocks or n > engine.max_model_len:
        raise ValueError(f"token_ids: {n} tokens do not fit the pool / max_model_len")
    table = np.arange(blocks, dtype=np.int32)[None, :]
    ids = np.asarray(token_ids, dtype=np.int64)
    nll, count = 0.0, 0
    for start in range(0, n - 1, chunk):
        end = min(start + chunk, n - 1)  # the last token is only a target
        plan = SimpleNamespace(
            swap_out=_NO_PAIRS, swap_in=_NO_PAIRS, copies=_NO_PAIRS, loads=_NO_PAIRS,
            offloads=_NO_PAIRS, num_seqs=1,
            num_tokens=end - start, num_decodes=0,
            query_start_loc=np.array([0, end - start], dtype=np.int32),
            seq_lens=np.array([end], dtype=np.int32),
            slot_mapping=np.arange(start, end, dtype=np.int64),  # blocks 0.. in order
            block_table=table, input_ids=ids[start:end],
            positions=np.arange(start, end, dtype=np.int64),
            logits_indices=np.arange(end - start, dtype=np.int64))
        logits = runner.execute(plan)
        assert logits is not None
        targets = torch.from_numpy(ids[start + 1:end + 1]).to(logits.device)
        nll += float(torch.nn.functional.cross_entropy(logits.float(), targets,
                                                       reduction="sum"))
        count += end - start
    return math.exp(nll / count)
