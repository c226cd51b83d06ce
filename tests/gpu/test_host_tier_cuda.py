"""The host tier on CUDA: the copier's side stream and pinned pool against a reference, and
the engine's tokens with overlapped copies equal to synchronous ones under CUDA-graph decode."""

from __future__ import annotations

import gc

import numpy as np
import torch
from test_engine_cuda import _tiny_model

from conversations import run_conversations, user_turns
from kvserve import host_tier


def _llm(model_dir, host_kv_cache):
    from kvserve import LLM

    return LLM(model=str(model_dir), attention_backend="cuda", dtype="float16",
               gpu_memory_utilization=0.3, max_num_batched_tokens=512, max_model_len=1024,
               max_num_seqs=8, block_size=16, num_gpu_blocks_override=40,
               host_kv_cache=host_kv_cache, swap_space="16MiB")


def _free(llm) -> None:
    llm.close()
    gc.collect()
    torch.cuda.empty_cache()


def test_copier_on_its_stream_matches_per_block_copies() -> None:
    gen = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    gpu_blocks, host_blocks = 64, 48
    shape = (gpu_blocks, 8, 16, 128)  # HND: [blocks, kv heads, block size, head dim]
    caches = [(torch.randn(shape, generator=gen).half().cuda(),
               torch.randn(shape, generator=gen).half().cuda()) for _ in range(3)]
    ref = [(k.cpu(), v.cpu()) for k, v in caches]
    views = host_tier.cache_byte_views(caches)
    pool = host_tier.HostPool(host_blocks, len(views), views[0].shape[1], pin=True)
    assert pool.pinned
    copier = host_tier.HostCopier(caches, pool, torch.device("cuda"),
                                  staging_bytes=5 * pool.block_bytes)  # several chunks
    ref_host: dict[int, list[torch.Tensor]] = {}
    for step in range(40):
        n = int(rng.integers(1, 17))
        if step % 2 == 0 or not ref_host:
            gpu = rng.choice(gpu_blocks, n, replace=False)
            host = rng.choice(host_blocks, n, replace=False)
            pairs = np.stack([gpu, host], axis=1)
            copier.to_host(pairs, gate=bool(step % 4))
            for g, h in pairs.tolist():
                ref_host[h] = [t[g].clone() for pair in ref for t in pair]
        else:
            written = sorted(ref_host)
            host = rng.choice(written, min(n, len(written)), replace=False)
            gpu = rng.choice(gpu_blocks, len(host), replace=False)
            pairs = np.stack([host, gpu], axis=1)
            copier.to_device(pairs)
            for h, g in pairs.tolist():
                for j, (k, v) in enumerate(ref):
                    k[g], v[g] = ref_host[h][2 * j], ref_host[h][2 * j + 1]
        copier.wait_ready()
        if step % 4 == 0:  # ungated: the blocks may be written only after the commit's wait
            assert copier.wait_done() == []
        # The compute stream is now ordered after the copies' device side: write over some
        # blocks on it, as a forward would (no host wait), in the reference too.
        touched = rng.choice(gpu_blocks, 2, replace=False).tolist()
        for (k, _), (rk, _) in zip(caches, ref):
            k[touched] += 1
            rk[touched] += 1
        assert copier.wait_done() == []
    torch.cuda.synchronize()
    for (k, v), (rk, rv) in zip(caches, ref):
        assert torch.equal(k.cpu(), rk) and torch.equal(v.cpu(), rv)
    d2h, h2d = copier.measure_bandwidth()
    assert d2h > 1e9 and h2d > 1e9, (d2h, h2d)  # pinned PCIe moves GB/s
    copier.synchronize()
    pool.close()


def test_overlapped_copies_give_the_tokens_of_synchronous_ones(tmp_path) -> None:
    vocab = _tiny_model(tmp_path)
    turns = user_turns(num_convs=6, turns=3, lengths=(60, 121), vocab=vocab, seed=11)
    results = {}
    for overlap in (True, False):
        host_tier.OVERLAP = overlap
        try:
            llm = _llm(tmp_path, "64MiB")
            graphs = llm.engine.runner.graphs
            assert graphs is not None
            replays: list[int] = []
            real_run = graphs.run

            def counted(plan, greedy_only=False, _run=real_run, _n=replays):
                _n.append(int(plan.num_seqs))
                return _run(plan, greedy_only)

            graphs.run = counted
            results[overlap] = run_conversations(llm, turns, max_tokens=24)
            m = llm.engine.metrics()
            assert m["host_loaded_blocks"] > 0 and m["host_offloaded_blocks"] > 0, m
            assert m["prefix_hits_host_tokens"] > 0
            assert replays, "decode steps should replay CUDA graphs"
            llm.engine.core.check_invariants()
            del graphs.run
            _free(llm)
        finally:
            host_tier.OVERLAP = True
    assert results[True] == results[False]
