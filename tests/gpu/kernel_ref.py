"""Random paged-attention batches and a plain fp32 torch reference (gather + causal softmax)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from kvserve.attention.base import AttentionMetadata
from kvserve.kernels.paged_kv import PagedKV


@dataclass
class Batch:
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D] new keys (written by the step)
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    layout: str
    meta: AttentionMetadata
    block_size: int

    def paged_kv(self) -> PagedKV:
        m = self.meta
        return PagedKV(self.k_cache, self.v_cache, self.layout, m.block_table,
                       m.query_start_loc, m.seq_lens)


def ragged_specs(rng: random.Random, max_new: int) -> list[tuple[int, int]]:
    """1 to 12 prefill rows of 1 to max_new new tokens; a third of them after a cached
    context of up to 3000 tokens (make_batch's specs)."""
    specs = []
    for _ in range(rng.randint(1, 12)):
        new = rng.randint(1, max_new)
        specs.append((new + rng.choice([0, 0, rng.randint(1, 3000)]), new))
    return specs


def seeded(seed: int) -> torch.Generator:
    """A CPU generator for make_batch's random data."""
    return torch.Generator().manual_seed(seed)


def cache_shape(layout: str, num_blocks: int, block_size: int, hkv: int, d: int) -> tuple:
    if layout == "NHD":
        return (num_blocks, block_size, hkv, d)
    return (num_blocks, hkv, block_size, d)


def make_batch(
    specs: list[tuple[int, int]],  # (context length after the step, new tokens), decodes first
    *,
    hkv: int,
    group: int = 4,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    block_size: int = 16,
    layout: str = "HND",
    shared_prefix_blocks: int = 0,  # leading blocks shared by every sequence (prefix hits)
    pad_tokens: int = 0,  # extra token rows with slot -1 (padding)
    gen: torch.Generator | None = None,
    device: str = "cuda",
) -> Batch:
    """A random batch; cache blocks are scattered randomly and every unused slot is random."""
    g = gen or torch.Generator(device="cpu").manual_seed(0)
    nblocks_per = [math.ceil(L / block_size) for L, _ in specs]
    shared = shared_prefix_blocks
    for L, n in specs:
        assert n <= L and (shared == 0 or L - n >= shared * block_size), (
            "new tokens in shared blocks"
        )
    total_blocks = shared + sum(nb - shared for nb in nblocks_per) + 3
    perm = torch.randperm(total_blocks, generator=g)
    shared_ids = perm[:shared].tolist()
    next_id = shared
    max_blocks = max(nblocks_per) + 2
    table = torch.full((len(specs), max_blocks), -1, dtype=torch.int32)
    for i, nb in enumerate(nblocks_per):
        own = perm[next_id : next_id + nb - shared].tolist()
        next_id += nb - shared
        table[i, :nb] = torch.tensor(shared_ids + own, dtype=torch.int32)
    shape = cache_shape(layout, total_blocks, block_size, hkv, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    lens_new = [n for _, n in specs]
    T = sum(lens_new) + pad_tokens
    q = torch.randn((T, hkv * group, head_dim), generator=g).to(dtype).to(device)
    k = torch.randn((T, hkv, head_dim), generator=g).to(dtype).to(device)
    v = torch.randn((T, hkv, head_dim), generator=g).to(dtype).to(device)
    slots = []
    for i, (L, n) in enumerate(specs):
        for pos in range(L - n, L):
            slots.append(int(table[i, pos // block_size]) * block_size + pos % block_size)
    slots += [-1] * pad_tokens
    qsl = torch.tensor([0, *torch.tensor(lens_new).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([L for L, _ in specs], dtype=torch.int32)
    num_decodes = 0
    for _, n in specs:
        if n != 1:
            break
        num_decodes += 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=qsl.to(device),
        seq_lens=seq_lens.to(device),
        block_table=table.to(device),
        num_decodes=num_decodes,
        max_query_len=max(lens_new),
        max_seq_len=max(L for L, _ in specs),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )
    return Batch(q, k, v, k_cache, v_cache, layout, meta, block_size)


def ref_cache_write(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches after writing the batch's new K/V, by plain indexing."""
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    slots = b.meta.slot_mapping.cpu()
    for t in range(b.k.shape[0]):
        s = int(slots[t])
        if s < 0:
            continue
        blk, off = divmod(s, b.block_size)
        if b.layout == "NHD":
            kc[blk, off], vc[blk, off] = b.k[t], b.v[t]
        else:
            kc[blk, :, off], vc[blk, :, off] = b.k[t], b.v[t]
    return kc, vc


def gather(cache: torch.Tensor, layout: str, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """[length, Hkv, D] fp32 rows of one sequence."""
    x = cache[blocks.long()]
    if layout == "HND":
        x = x.transpose(1, 2)
    return x.reshape(-1, x.shape[2], x.shape[3])[:length].float()


def ref_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: str,
    meta: AttentionMetadata,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """fp32 [T, Hq, D]; rows of padding tokens are zero."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    qsl = meta.query_start_loc_cpu.tolist()
    lens = meta.seq_lens_cpu.tolist()
    table = meta.block_table
    hq = q.shape[1]
    for i, L in enumerate(lens):
        s, e = qsl[i], qsl[i + 1]
        n = e - s
        blocks = table[i, : math.ceil(L / block_size)]
        keys = gather(k_cache, layout, blocks, L)
        vals = gather(v_cache, layout, blocks, L)
        grp = hq // keys.shape[1]
        keys = keys.repeat_interleave(grp, dim=1)
        vals = vals.repeat_interleave(grp, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), keys) * scale
        rows = torch.arange(n, device=q.device).unsqueeze(1) + (L - n)
        allowed = torch.arange(L, device=q.device).unsqueeze(0) <= rows
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def max_row_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst per-token relative error: a few wrong rows cannot hide in a large batch."""
    diff = (out.float() - ref).flatten(1).norm(dim=1)
    return float((diff / ref.flatten(1).norm(dim=1).clamp_min(1e-6)).max())


TOL = 1e-2  # relative norm error vs fp32, bf16/fp16 operands
ROW_TOL = 2e-2


def check_against_reference(b: Batch, out: torch.Tensor) -> int:
    """Every real output row written and within tolerance of the fp32 reference; -> rows."""
    n_real = int(b.meta.query_start_loc_cpu[-1])
    ref = ref_attention(
        b.q, b.k_cache, b.v_cache, b.layout, b.meta, b.block_size, b.q.shape[-1] ** -0.5
    )
    got = out[:n_real]
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) output rows remain"
    err, row_err = rel_err(got, ref[:n_real]), max_row_rel_err(got, ref[:n_real])
    assert err < TOL and row_err < ROW_TOL, f"rel err {err:.2e}, worst row {row_err:.2e}"
    return n_real
