"""One wgmma prefill launch (b8 new4096 ctx4096, 32 q / 8 kv heads, HND) for ncu to profile."""

from __future__ import annotations

import sys

import torch
from bench_attention import paged_cache

from kvserve.kernels import ops


def main() -> None:
    stages = int(sys.argv[1]) if len(sys.argv) > 1 else ops.SM90_PREFILL_STAGES
    pipe = bool(int(sys.argv[2])) if len(sys.argv) > 2 else ops.SM90_PREFILL_PIPELINED
    b, n, hq, hkv, d = 8, 4096, 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    kc, vc, table = paged_cache(b, n, hkv, d, 16, "HND", gen)
    q = torch.randn(b * n, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = torch.empty_like(q)
    qsl = torch.arange(0, b * n + 1, n, device="cuda", dtype=torch.int32)
    lens = torch.full((b,), n, device="cuda", dtype=torch.int32)
    for _ in range(3):
        ops.paged_prefill_sm90(
            q, kc, vc, "HND", table, qsl, lens, out, d**-0.5,
            seq_begin=0, seq_end=b, max_query_len=n, stages=stages, pipelined=pipe,
        )  # fmt: skip
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
