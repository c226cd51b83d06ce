"""The ws prefill kernel's build variants on the device (not a test).

python benches/gpu/sm90_ws_variants.py --smoke NAME     # one variant vs v1 on four shapes;
                                                        # exit 1 on a mismatch (run it under
                                                        # `timeout`: a hang shows as 124)
python benches/gpu/sm90_ws_variants.py --ab [NAME,...] [ROUNDS]  # interleaved timing vs ws
                                                                  # default (7 rounds)
python benches/gpu/sm90_ws_variants.py --waits [NAME,...]  # consumer cycle counters (PROF)
python benches/gpu/sm90_ws_variants.py --sass [NAME,...]   # ptxas report + SASS op counts of
                                                           # each build (GQA 4, bf16; no GPU)

NAME: a key of bench_attention.SM90_WS_SWITCH_VARIANTS (ws-v3: the V ring one stage deeper);
no list: all of them. Shape: b8 new4096 ctx4096, 32 q heads, HND.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from bench_attention import SM90_WS_SWITCH_VARIANTS
from profile_prefill_sm90 import _launch, _setup, graph_times


def _names(arg: str | None) -> list[str]:
    names = [s for s in (arg or "").split(",") if s] or list(SM90_WS_SWITCH_VARIANTS)
    unknown = [n for n in names if n not in SM90_WS_SWITCH_VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {list(SM90_WS_SWITCH_VARIANTS)}")
    return names


def smoke(name: str) -> None:
    """The shapes of profile_prefill_sm90.py --smoke, this variant against v1."""
    kw = SM90_WS_SWITCH_VARIANTS[name]
    # Lazy rescaling rounds P in another range than v1 (bf16 outputs differ by ~2e-3).
    tol = 5e-3
    ok = True
    for b, n, ctx, bs, layout, extra in (
        (1, 40, 0, 16, "HND", {}),
        (2, 300, 1000, 16, "NHD", {}),
        (2, 1024, 0, 32, "HND", {"max_ctas": 2}),
        (2, 4096, 0, 16, "HND", {}),
    ):
        args = _setup(b, n, bs=bs, layout=layout, ctx=ctx)
        t0 = time.time()
        got = _launch(args, layout, n, **kw, **extra)
        torch.cuda.synchronize()
        dt = time.time() - t0
        ref = _launch(args, layout, n, kernel="v1")
        err = float((got.float() - ref.float()).norm() / ref.float().norm())
        nan = bool(torch.isnan(got).any())
        good = err < tol and not nan
        ok &= good
        print(
            f"smoke {name} b{b} n{n} ctx{ctx or n} bs{bs} {layout} {extra}: rel err vs v1"
            f" {err:.2e} nan={nan} {'ok' if good else 'MISMATCH'} ({dt:.2f} s)",
            flush=True,
        )
    sys.exit(0 if ok else 1)


def ab(names: list[str], rounds: int = 7, calls: int = 10) -> None:
    """ws default and the variants, one CUDA graph of `calls` launches each, replayed
    round-robin `rounds` times; medians (clock drift hits every config alike)."""
    n = 4096
    pairs = 8 * (n * (n + 1) // 2)
    flops = 4 * 32 * 128 * pairs
    configs = {"ws default": {"kernel": "ws"}, **{k: SM90_WS_SWITCH_VARIANTS[k] for k in names}}
    for hkv in (8, 32):
        args = _setup(8, n, hkv=hkv)
        times = graph_times(args, n, configs, rounds, calls)
        base = statistics.median(times["ws default"])
        for name, ts in times.items():
            ms = statistics.median(ts)
            print(
                f"ab-switches 32q/{hkv}kv {name:18s} {ms * 1e3:8.1f} us"
                f" {flops / ms / 1e9:7.1f} TFLOP/s x{base / ms:.3f} vs default"
                f" (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f} us)",
                flush=True,
            )


def waits(names: list[str]) -> None:
    """Consumer-warp cycle counters of PROF builds (as profile_prefill_sm90.py --waits)."""
    labels = ["K/V full waits", "ping-pong barrier", "S wait", "softmax", "P V wait"]
    n = 4096
    args = _setup(8, n)
    configs = {"ws default": {"kernel": "ws"}, **{k: SM90_WS_SWITCH_VARIANTS[k] for k in names}}
    for name, kw in configs.items():
        buf = torch.zeros(7, dtype=torch.int64, device="cuda")
        _launch(args, "HND", n, profile_buffer=buf, **kw)  # compile, warm
        buf.zero_()
        _launch(args, "HND", n, profile_buffer=buf, **kw)
        v = buf.tolist()
        total, tiles = v[5], v[6]
        parts = ", ".join(
            f"{lb} {100 * x / total:.1f}%" for lb, x in zip(labels, v[:5], strict=True)
        )
        print(
            f"waits-switches {name}: {parts}; per tile per warp {total / tiles:.0f} cycles",
            flush=True,
        )


def sass(names: list[str]) -> None:
    """Per build (GQA 4, bf16, the ops defaults or the variant's ring depths): registers,
    spills and the SASS op counts that tell the variants apart (needs cuobjdump; compiles
    through the cache)."""
    from kvserve.kernels import compiler, ops

    base = {"GQA": 4, "KV_BF16": 1, "PROF": 0, "QBUF": ops.SM90_WS_QBUF}
    base |= {"STAGES": ops.SM90_WS_STAGES, "VSTAGES": ops.SM90_WS_VSTAGES}
    to_define = {"ws_stages": "STAGES", "ws_vstages": "VSTAGES", "ws_qbuf": "QBUF"}
    configs = {"ws default": {"kernel": "ws"}, **{k: SM90_WS_SWITCH_VARIANTS[k] for k in names}}
    tool = shutil.which("cuobjdump")
    for name, kw in configs.items():
        defines = dict(base)
        for key, define in to_define.items():
            if key in kw:
                defines[define] = kw[key]
        k = compiler.compile_source("paged_prefill_sm90_ws.cu", "sm_90a", defines)
        regs = re.findall(r"Used (\d+) registers", k.log)
        spill = re.findall(r"(\d+) bytes spill stores", k.log)
        warn = "C75" in k.log or "serialized" in k.log
        ops_n: collections.Counter[str] = collections.Counter()
        if tool:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "k.cubin")
                with open(path, "wb") as f:
                    f.write(k.cubin)
                cmd = [tool, "-sass", path]
                out = subprocess.run(cmd, check=False, capture_output=True, text=True).stdout
            for line in out.splitlines():
                m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)", line)
                if m:
                    ops_n[m.group(1)] += 1
        shown = ("HGMMA.64x128x16.F32.BF16", "MUFU.EX2", "F2FP.BF16.F32.PACK_AB", "FMUL.FTZ")
        counts = " ".join(
            f"{op.split('.')[0] if op.startswith('HGMMA') else op} {ops_n[op]}"
            for op in (*shown, "R2UR", "BRA.DIV", "VOTE.ANY", "STL", "LDL")
        )
        print(
            f"sass-switches {name:16s} regs {regs} spill {spill} wgmma-warning {warn}"
            f" instrs {sum(ops_n.values())}: {counts}",
            flush=True,
        )


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("--smoke", "--ab", "--waits", "--sass"):
        sys.exit(__doc__)
    arg = argv[1] if len(argv) > 1 else None
    if argv[0] == "--smoke":
        if arg not in SM90_WS_SWITCH_VARIANTS:
            sys.exit(f"--smoke needs one of {list(SM90_WS_SWITCH_VARIANTS)}")
        smoke(arg)
    elif argv[0] == "--ab":
        ab(_names(arg), rounds=int(argv[2]) if len(argv) > 2 else 7)
    elif argv[0] == "--sass":
        sass(_names(arg))
    else:
        waits(_names(arg))


if __name__ == "__main__":
    main()
