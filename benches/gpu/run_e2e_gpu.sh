#!/usr/bin/env bash
# One device call: `bash benches/gpu/run_e2e_gpu.sh [tests] [profile] [ab] [base] [full] [attn]
# [attnsplit] [attnprof] [attntests] [newtests] [final] [mbuab] [mbuprof] [mbutests]`
# (default: tests full). Needs the prebuilt wheel carried
# as "dist"; the working tree's python/ is laid over it. Everything is logged to $OUT/run.log;
# JSON per benchmark; the tables print last.
#   tests    GPU tests of the fused ops, CUDA graphs and the engine (cuda vs torch backend)
#   profile  benches/gpu/profile_e2e.py: ceilings, GEMV vs cuBLAS, per-kernel step profile
#   ab       bench_e2e (graphs, no transformers) at b1: fused ops off, GEMV unroll 8 for the
#            small weights, no PDL; then the defaults at b1,8,64 and b1 again
#   base     bench_e2e b1,64 with the fused ops off (the torch ops and cuBLAS of before)
#   full     bench_e2e b1..256 with transformers, then eager b1,8,64,256
#   final    b1 with the attention-path switches off, the defaults b1..256 with
#            transformers, b1 with the defaults again (fits one device call)
#   attn     b1 A/B of the decode attention path (each switch defaults on): both off
#            (KVSERVE_PDL_ATTN=0 KVSERVE_ROPE_CACHE_WRITE=0, the code before), both on, each
#            alone, both off again, both on again (b1,64): look at "step ms" of b1
#   attnsplit b1 with KVSERVE_DECODE_SPLIT_MIN_TOKENS=256 and 512 (fewer split-KV splits)
#   attnprof profile_e2e.py b1 (8 layers, no GEMV table) with both switches off, then on
#   attntests GPU tests of the attention kernels and the cuda backend (the PDL-launched path)
#   newtests just the tests of the attention-path switches (rope_qkv cache store, PDL attention
#            chain under graph capture, engine output with the switches on vs off) + backend
#   ahead    the decode run-ahead's GPU tests, then b1 (and b64) with KVSERVE_DECODE_AHEAD=0
#            and on, interleaved, and the graphs table at b1..b256 with it on
#   aheadb1  b1 with the run-ahead off and on, three times interleaved
#   mbuab    b1 A/B of model/fused_ops.py switches (default: KVSERVE_GEMV_EVEN_GRID off / qkv
#            / all; MBU_AB overrides; unnamed switches keep their defaults): two
#            processes (bench_e2e --ab), each cycling every variant 4 times with re-captured
#            graphs, the second in reverse order; copy bandwidth and the 90% step threshold
#            measured in each
#   mbuprof  profile_e2e.py b1 (8 layers, no GEMV table) with even grids off, then with
#            MBU_PROF_ON (default: the defaults)
#   mbutests the GEMV grid tests (MBU_TESTS_K="": all of test_fused_ops.py), then
#            test_cuda_graphs + test_engine_cuda (defaults)
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
LOG="$OUT/run.log"
python3 -m pip install -q --no-deps --target /tmp/site dist/*.whl || exit 1
cp -r python/kvserve/. /tmp/site/kvserve/
export PYTHONPATH=/tmp/site:$PWD/benches/gpu PYTHONUNBUFFERED=1
export KVSERVE_KERNEL_CACHE=/tmp/kvserve-kcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
date -u | tee -a "$LOG"
e2e() {  # e2e NAME TIMEOUT ARGS...: one bench_e2e run, its table kept for the summary
  local name=$1 limit=$2
  shift 2
  echo "== e2e $name: $*" | tee -a "$LOG"
  timeout "$limit" python3 benches/gpu/bench_e2e.py --out "$OUT/e2e_$name.json" "$@" 2>&1 \
    | grep -v Warning | tee -a "$LOG" | tail -12 >> /tmp/summary.txt
}
: > /tmp/summary.txt
for stage in ${@:-tests full}; do
  case $stage in
    tests)
      timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_ops.py \
        tests/gpu/test_cuda_graphs.py tests/gpu/test_engine_cuda.py 2>&1 | tee -a "$LOG" \
        | tail -6 >> /tmp/summary.txt ;;
    profile)
      timeout 300 python3 benches/gpu/profile_e2e.py --gemv-m 1,2 --out "$OUT/profile.json" 2>&1 \
        | grep -v Warning | tee -a "$LOG" | sed -n '/^GEMV/,$p' >> /tmp/summary.txt ;;
    ab)
      KVSERVE_FUSED_OPS=0 e2e unfused 200 --skip-hf --batches 1
      KVSERVE_GEMV_UNROLL_SMALL=8 e2e fused_unroll8 200 --skip-hf --batches 1
      KVSERVE_PDL=0 e2e fused_nopdl 200 --skip-hf --batches 1
      e2e fused 200 --skip-hf --batches 1,8,64
      e2e fused_again 200 --skip-hf --batches 1 ;;
    base)
      KVSERVE_FUSED_OPS=0 e2e unfused 200 --skip-hf --batches 1,64 ;;
    attn)
      KVSERVE_PDL_ATTN=0 KVSERVE_ROPE_CACHE_WRITE=0 e2e attn_off 200 --skip-hf --batches 1
      e2e attn_on 200 --skip-hf --batches 1
      KVSERVE_ROPE_CACHE_WRITE=0 e2e attn_pdl_only 200 --skip-hf --batches 1
      KVSERVE_PDL_ATTN=0 e2e attn_ropecw_only 200 --skip-hf --batches 1
      KVSERVE_PDL_ATTN=0 KVSERVE_ROPE_CACHE_WRITE=0 e2e attn_off_again 200 --skip-hf --batches 1
      e2e attn_on_again 200 --skip-hf --batches 1,64 ;;
    attnsplit)
      KVSERVE_DECODE_SPLIT_MIN_TOKENS=256 e2e split256 200 --skip-hf --batches 1
      KVSERVE_DECODE_SPLIT_MIN_TOKENS=512 e2e split512 200 --skip-hf --batches 1
      e2e split_default 200 --skip-hf --batches 1 ;;
    attnprof)
      for v in off on; do
        if [ $v = off ]; then sw="KVSERVE_PDL_ATTN=0 KVSERVE_ROPE_CACHE_WRITE=0"; else sw=""; fi
        echo "== profile attn $v" | tee -a "$LOG" >> /tmp/summary.txt
        env $sw timeout 240 python3 benches/gpu/profile_e2e.py --skip-gemv --batches 1 \
          --out "$OUT/profile_attn_$v.json" 2>&1 | grep -v Warning | tee -a "$LOG" \
          | sed -n '/^switches/,$p' >> /tmp/summary.txt
      done ;;
    newtests)
      timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_ops.py \
        -k "cache_write or chain_under_pdl or switches_off or mismatched" 2>&1 \
        | tee -a "$LOG" | tail -6 >> /tmp/summary.txt
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_backend.py 2>&1 \
        | tee -a "$LOG" | tail -6 >> /tmp/summary.txt ;;
    attntests)
      timeout 400 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_attention_kernels.py \
        tests/gpu/test_cuda_backend.py 2>&1 | tee -a "$LOG" | tail -6 >> /tmp/summary.txt ;;
    mbuab)  # MBU_AB="name:ATTR=v,...;..." overrides the variants
      v="even0:GEMV_EVEN_GRID=0;evenqkv:GEMV_EVEN_GRID=1;evenall:GEMV_EVEN_GRID=31"
      v=${MBU_AB:-$v}
      rev=$(echo "$v" | tr ';' '\n' | tac | paste -sd';')
      e2e ab1 240 --ab "$v" --ab-rounds 4
      e2e ab2 240 --ab "$rev" --ab-rounds 4 ;;
    mbuprof)  # MBU_PROF_ON="KVSERVE_...=v ..." sets the "on" profile's switches
      for v in off on; do
        sw="KVSERVE_GEMV_EVEN_GRID=0"
        if [ $v = on ]; then sw=${MBU_PROF_ON:-"KVSERVE_GEMV_EVEN_GRID=1"}; fi
        echo "== profile mbu $v" | tee -a "$LOG" >> /tmp/summary.txt
        env $sw timeout 180 python3 benches/gpu/profile_e2e.py --skip-gemv --batches 1 \
          --out "$OUT/profile_mbu_$v.json" 2>&1 | grep -v Warning | tee -a "$LOG" \
          | sed -n '/^switches/,$p' >> /tmp/summary.txt
      done ;;
    mbutests)  # MBU_TESTS_K="" runs the whole of test_fused_ops.py
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_ops.py \
        -k "${MBU_TESTS_K-even_grid or gemv_switches}" 2>&1 \
        | tee -a "$LOG" | tail -6 >> /tmp/summary.txt
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_graphs.py \
        tests/gpu/test_engine_cuda.py 2>&1 | tee -a "$LOG" | tail -6 >> /tmp/summary.txt ;;
    ahead)  # decode run-ahead (cuda_graphs.py): its tests, then b1 off / on interleaved
      timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_graphs.py \
        tests/gpu/test_engine_cuda.py tests/gpu/test_fused_ops.py -k "not fused_ops or advance" \
        2>&1 | tee -a "$LOG" | tail -6 >> /tmp/summary.txt
      KVSERVE_DECODE_AHEAD=0 e2e ahead_off 150 --skip-hf --batches 1,64
      e2e ahead_on 200 --skip-hf --batches 1,8,64,256
      KVSERVE_DECODE_AHEAD=0 e2e ahead_off_again 110 --skip-hf --batches 1
      e2e ahead_on_again 110 --skip-hf --batches 1 ;;
    aheadb1)  # b1 only, run-ahead off / on, three times interleaved
      for i in 1 2 3; do
        KVSERVE_DECODE_AHEAD=0 e2e ahead_off_$i 100 --skip-hf --batches 1
        e2e ahead_on_$i 100 --skip-hf --batches 1
      done ;;
    full)
      e2e graphs 420
      e2e eager 300 --enforce-eager --skip-hf --batches 1,8,64,256 ;;
    final)  # one call: the attention-path switches off vs on at b1, the full graphs table
      KVSERVE_PDL_ATTN=0 KVSERVE_ROPE_CACHE_WRITE=0 e2e attn_off 150 --skip-hf --batches 1
      e2e graphs 330
      e2e attn_on_again 110 --skip-hf --batches 1 ;;
  esac
done
echo "================ summary"
cat /tmp/summary.txt
