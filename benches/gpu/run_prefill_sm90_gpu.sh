#!/usr/bin/env bash
# One device call for the Hopper wgmma prefill (paged_prefill_sm90.cu): its tests first, the
# prefill benchmark with the baselines (copy, matmul, SDPA flash/cuDNN), the rest of the GPU
# tests, resource report + SASS summary, and one ncu profile. Logs in $OUT; short table last.
# Usage (device tool): bash benches/gpu/run_prefill_sm90_gpu.sh
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/python:$PWD/benches/gpu
export KVSERVE_KERNEL_CACHE=/tmp/kvserve-kcache
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv > "$OUT/gpu.txt" 2>&1

PYTEST="python3 -m pytest -q -p no:cacheprovider --timeout 150"
timeout 150 $PYTEST --maxfail 10 tests/gpu/test_prefill_sm90.py tests/test_kernels_compile.py \
  > "$OUT/tests_sm90.log" 2>&1
echo "pytest sm90 rc=$?" >> "$OUT/tests_sm90.log"

timeout 150 python3 benches/gpu/bench_attention.py --prefill-only --json "$OUT/bench.json" \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"

timeout 180 $PYTEST --maxfail 10 tests/gpu --ignore=tests/gpu/test_prefill_sm90.py \
  > "$OUT/tests_gpu.log" 2>&1
echo "pytest gpu rc=$?" >> "$OUT/tests_gpu.log"

{
  for f in "$KVSERVE_KERNEL_CACHE"/paged_prefill_sm90*.cubin; do
    echo "== $(basename "$f")"
    grep -E "Used|spill|serial" "${f%.cubin}.log" | sed 's/^/   /'
    cuobjdump --dump-sass "$f" > /tmp/sass.txt 2>&1
    for op in HGMMA HMMA LDGSTS STL LDL MUFU.EX2 BAR WARPSYNC; do
      printf "   %-10s %s\n" "$op" "$(grep -c "$op" /tmp/sass.txt)"
    done
  done
} > "$OUT/sass_summary.txt" 2>&1
cp /tmp/sass.txt "$OUT/sm90_kernel.sass" 2>/dev/null

if [ "${PROFILE:-1}" = 1 ]; then
  timeout 90 ncu --clock-control none -k regex:paged_prefill_sm90 -s 1 -c 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \
    --section WarpStateStats --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active \
    python3 benches/gpu/profile_prefill_sm90.py > "$OUT/ncu_prefill.txt" 2>&1
fi

echo "----- sm90 tests"; tail -n 15 "$OUT/tests_sm90.log"
echo "----- gpu tests"; tail -n 8 "$OUT/tests_gpu.log"
echo "----- sass"; cat "$OUT/sass_summary.txt" | head -40
echo "----- ncu"; grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|gmma|Registers|Issue Slots|Stall" "$OUT/ncu_prefill.txt" | head -20
echo "----- bench"; sed -n '/# summary/,$p' "$OUT/bench.log" | head -40; tail -n 3 "$OUT/bench.log"
