"""One decode attention launch (b64 ctx4096 32q/8kv d128, HND) to profile under ncu.

    PYTHONPATH=benches/gpu ncu -k regex:paged_attention -s 2 -c 1 python tools/profile_decode.py
    [BN STAGES WARPS_M WARPS_N MT]   (another tiling than the default, paged_attention.AttnConfig)
"""

from __future__ import annotations

import sys

import torch
from bench_attention import paged_cache

from kvserve.kernels.paged_attention import DECODE_CONFIG, AttnConfig, paged_attention
from kvserve.kernels.paged_kv import PagedKV

b, ctx, hq, hkv, d = 64, 4096, 32, 8, 128
gen = torch.Generator(device="cuda").manual_seed(0)
kc, vc, table = paged_cache(b, ctx, hkv, d, 16, "HND", gen)
q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
out = torch.empty_like(q)
qsl = torch.arange(b + 1, device="cuda", dtype=torch.int32)
lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
kv = PagedKV(kc, vc, "HND", table, qsl, lens)
cfg = DECODE_CONFIG if len(sys.argv) < 2 else AttnConfig(*map(int, sys.argv[1:]))
for _ in range(3):
    paged_attention(
        q, kv, out, d**-0.5, seq_begin=0, seq_end=b, max_query_len=1, max_seq_len=ctx, config=cfg
    )
torch.cuda.synchronize()
