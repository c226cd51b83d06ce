"""The torch reference attention backend vs a per-token loop, on random paged layouts."""

from __future__ import annotations

import pytest
import torch

from kvserve.attention import get_backend
from kvserve.attention.base import AttentionMetadata


def _naive(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
           ) -> torch.Tensor:
    """q [Hq, D] against keys/values [L, Hkv, D], GQA by head groups, plain softmax."""
    group = q.shape[0] // keys.shape[1]
    out = torch.empty_like(q)
    for h in range(q.shape[0]):
        kh, vh = keys[:, h // group], values[:, h // group]
        weights = torch.softmax((kh @ q[h]) * scale, dim=0)
        out[h] = weights @ vh
    return out


@pytest.mark.parametrize(("hq", "hkv", "block"), [(4, 4, 4), (8, 2, 16), (6, 1, 8)])
def test_mixed_batch_matches_per_token_reference(hq: int, hkv: int, block: int) -> None:
    gen = torch.Generator().manual_seed(hq * 100 + hkv * 10 + block)
    d, num_blocks = 16, 40
    backend = get_backend("torch", "cpu")
    shape = backend.kv_cache_shape(num_blocks, block, hkv, d)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    # 3 decodes then 3 prefill chunks; cached lengths not multiples of the block size.
    cached = [int(x) for x in torch.randint(1, 3 * block, (6,), generator=gen)]
    new = [1, 1, 1] + [int(x) for x in torch.randint(1, 2 * block, (3,), generator=gen)]
    free = torch.randperm(num_blocks, generator=gen).tolist()
    shared = free.pop()  # sequences 0 and 3 share their first block (a prefix-cache hit)
    for i in (0, 3):  # ... which is full, so neither writes into it
        cached[i] = max(cached[i], block)
    tables, slots = [], []
    for i, (c, n) in enumerate(zip(cached, new)):
        table = [shared] if i in (0, 3) else []
        while len(table) * block < c + n:
            table.append(free.pop())
        tables.append(table)
        slots += [table[p // block] * block + p % block for p in range(c, c + n)]
    width = max(len(t) for t in tables)
    bt = torch.full((6, width), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor([c + n for c, n in zip(cached, new)], dtype=torch.int32)
    meta = AttentionMetadata(torch.tensor(slots), qsl, lens, bt, 3, max(new), int(lens.max()),
                             qsl, lens)
    total = int(qsl[-1])
    q = torch.randn(total, hq, d, generator=gen)
    k = torch.randn(total, hkv, d, generator=gen)
    v = torch.randn(total, hkv, d, generator=gen)
    before_k = k_cache.clone()
    scale = d**-0.5
    out = backend.forward(q, k, v, k_cache, v_cache, meta, scale)

    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[torch.tensor(slots)], k)  # written where the plan said
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[torch.tensor(slots)] = False
    assert torch.equal(flat_k[untouched], before_k.view(-1, hkv, d)[untouched])
    for i in range(6):
        for j in range(new[i]):
            row = int(qsl[i]) + j
            ctx = cached[i] + j + 1  # causal, bottom-right aligned
            idx = torch.tensor([tables[i][p // block] * block + p % block for p in range(ctx)])
            want = _naive(q[row], flat_k[idx], flat_v[idx], scale)
            torch.testing.assert_close(out[row], want, rtol=1e-5, atol=1e-5)

    # kv_written: k/v are already in the cache (as the fused rope_qkv kernel leaves them), so
    # the backend must not write the (here zeroed) k/v again and attends to the same keys.
    cache_k, cache_v = k_cache.clone(), v_cache.clone()
    again = backend.forward(q, torch.zeros_like(k), torch.zeros_like(v), k_cache, v_cache, meta,
                            scale, kv_written=True)
    assert torch.equal(k_cache, cache_k) and torch.equal(v_cache, cache_v)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
