"""The host swap pool is allocated without zeroing: a host block must only ever be read
after a swap-out wrote it. Filled with NaN before any request, a run that swaps must still
give the greedy tokens of a run that never preempts."""

from __future__ import annotations

from pathlib import Path

import torch

from kvserve import LLM, SamplingParams


def test_swapped_runs_never_read_unwritten_host_blocks(tiny_llama_dir: Path) -> None:
    gen = torch.Generator().manual_seed(21)
    prompts = [torch.randint(3, 300, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 40, (6,), generator=gen)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def greedy(llm: LLM) -> list[list[int]]:
        return [o.token_ids for o in llm.generate(None, params, prompt_token_ids=prompts)]

    want = greedy(LLM(str(tiny_llama_dir), block_size=4, kv_cache_memory="1MiB"))
    # 20 blocks of 4 tokens (512 bytes a token): far less than the batch needs.
    llm = LLM(str(tiny_llama_dir), block_size=4, kv_cache_memory=20 * 2048, swap_space="1MiB",
              preemption_mode="swap", enable_prefix_caching=False)
    # All bits set: NaN in every float KV dtype.
    llm.engine.runner.host_pool.data.fill_(255)
    assert greedy(llm) == want
    assert llm.engine.metrics()["preemptions_swap"] > 0
