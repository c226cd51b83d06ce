"""Compile the shipped kernel configurations from two source trees and compare the code.

For a change to python/kvserve/kernels/cuda/ that should not change the default kernels:

    git archive REV python/kvserve/kernels/cuda | tar -x -C /tmp/base
    python tools/compare_cubins.py /tmp/base/python/kvserve/kernels/cuda \\
        python/kvserve/kernels/cuda [--alias decoder_kernels.cu=fused_ops.cu] [--only a.cu,b.cu]

Needs NVRTC only (no GPU). Every configuration the launchers build by default (both dtypes,
GQA 1/4/8, head_dim 64/128, each GEMV size and prologue) is compiled for sm_90a from both
trees; a cubin that differs is disassembled with cuobjdump (when one is found) to say whether
only its metadata (e.g. the parameter table) or the instructions changed. --define-base
NAME=V adds a define to the base tree's builds only (a switch the new tree no longer has).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kvserve.kernels import compiler, decoder_kernels, prefill_sm90
from kvserve.kernels.paged_attention import DECODE_CONFIG, PREFILL_CONFIG


def configurations() -> list[tuple[str, dict[str, int]]]:
    jobs: list[tuple[str, dict[str, int]]] = [("cache_write.cu", {})]
    for bf16 in (1, 0):
        for gqa in (1, 4, 8):
            for head_dim in (64, 128):
                for c in (PREFILL_CONFIG, DECODE_CONFIG):
                    jobs.append(("paged_attention.cu", {
                        "BN": c.bn, "GQA": gqa, "HEAD_DIM": head_dim, "KV_BF16": bf16,
                        "MT": c.mt, "STAGES": c.stages, "WARPS_M": c.warps_m,
                        "WARPS_N": c.warps_n}))
            jobs.append(("paged_prefill_sm90.cu",
                         {"GQA": gqa, "KV_BF16": bf16, "STAGES": prefill_sm90.V1_STAGES}))
            jobs.append(("paged_prefill_sm90_ws.cu", {
                "GQA": gqa, "KV_BF16": bf16, "QBUF": prefill_sm90.WS_QBUF,
                "STAGES": prefill_sm90.WS_STAGES, "VSTAGES": prefill_sm90.WS_VSTAGES}))
        for m in decoder_kernels.GEMV_SIZES:
            for prologue in (0, 1, 2):
                jobs.append(("decoder_kernels.cu", {
                    "BF16": bf16, "GEMV_M": m, "GEMV_UNROLL": decoder_kernels.GEMV_UNROLL,
                    "PROLOGUE": prologue}))
    return jobs


def compile_from(src_dir: Path, name: str, defines: dict[str, int]) -> bytes:
    compiler.SOURCE_DIR = src_dir  # read_source() and its header inlining look here
    return compiler.compile_source(name, "sm_90a", defines, use_cache=False).cubin


def sass(cuobjdump: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                             check=True).stdout
    # Instruction lines only, without their addresses.
    return "\n".join(re.sub(r"/\*[0-9a-f]{4,}\*/", "", line).strip()
                     for line in out.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="the base tree's kernels/cuda directory")
    ap.add_argument("new", type=Path, help="the new tree's kernels/cuda directory")
    ap.add_argument("--alias", action="append", default=[],
                    help="NEW=OLD: a source's name in the base tree")
    ap.add_argument("--define-base", action="append", default=[],
                    help="NAME=VALUE added to the base builds only")
    ap.add_argument("--only", default="", help="comma-separated sources to compare")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump"))
    args = ap.parse_args()
    alias = dict(a.split("=", 1) for a in args.alias)
    extra = {k: int(v) for k, v in (d.split("=", 1) for d in args.define_base)}
    only = set(filter(None, args.only.split(",")))
    same = differ = code_differ = 0
    for name, defines in configurations():
        if only and name not in only:
            continue
        base_name = alias.get(name, name)
        base = compile_from(args.base, base_name, {**defines, **extra} if extra else defines)
        new = compile_from(args.new, name, defines)
        label = f"{name} " + " ".join(f"{k}={v}" for k, v in sorted(defines.items()))
        if base == new:
            same += 1
            print(f"identical  {label}  {hashlib.sha256(new).hexdigest()[:12]}", flush=True)
            continue
        differ += 1
        if args.cuobjdump is None:
            print(f"DIFFERENT  {label}  (no cuobjdump to compare the instructions)", flush=True)
            code_differ += 1
        elif sass(args.cuobjdump, base) == sass(args.cuobjdump, new):
            print(f"metadata   {label}  (cubins differ, SASS identical)", flush=True)
        else:
            code_differ += 1
            print(f"DIFFERENT  {label}  (SASS differs)", flush=True)
    print(f"{same} identical, {differ - code_differ} differing in metadata only, "
          f"{code_differ} with different code")
    return 1 if code_differ else 0


if __name__ == "__main__":
    sys.exit(main())
