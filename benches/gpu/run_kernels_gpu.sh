#!/usr/bin/env bash
# One device call: GPU tests, the attention benchmark, the compiler resource report and a SASS
# summary of every compiled kernel. Logs go to $OUT; a short table is printed last.
# Usage (device tool): bash benches/gpu/run_kernels_gpu.sh [engine]
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/python:$PWD/benches/gpu
export KVSERVE_KERNEL_CACHE=/tmp/kvserve-kcache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, cuda.bindings; print(torch.__version__, torch.version.cuda, cuda.bindings.__version__)" >> "$OUT/gpu.txt" 2>&1

TESTS="tests/gpu/test_attention_kernels.py tests/gpu/test_cuda_backend.py tests/gpu/test_prefill_sm90.py tests/test_kernels_compile.py"
timeout 200 python3 -m pytest -q -p no:cacheprovider --timeout 150 --maxfail 15 $TESTS > "$OUT/tests.log" 2>&1
echo "pytest rc=$?" >> "$OUT/tests.log"
if [ "${1:-}" = engine ]; then
  # The engine needs the Rust core: run it from the wheel built by `maturin build -o dist`
  # (carried; it holds the whole Python package, kernels included).
  pip install -q --no-deps --target /tmp/site dist/*.whl > "$OUT/engine.log" 2>&1
  PYTHONPATH=/tmp/site timeout 200 python3 -m pytest -q -p no:cacheprovider --timeout 180 \
    -s tests/gpu/test_engine_cuda.py >> "$OUT/engine.log" 2>&1
  echo "engine pytest rc=$?" >> "$OUT/engine.log"
fi

timeout 200 python3 benches/gpu/bench_attention.py --variants --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"

# Stall reasons of the default decode tiling and of the best alternative, one launch each.
if [ "${PROFILE:-1}" = 1 ]; then
  for cfg in "" "${PROFILE_CFG:-32 2 1 1}"; do
    timeout 90 ncu --clock-control none -k regex:paged_attention -s 2 -c 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
      python3 benches/gpu/profile_decode.py $cfg >> "$OUT/ncu_decode.txt" 2>&1
  done
fi

# Resource report + SASS: tensor-core instructions, 16-byte loads, cp.async, local memory.
{
  for f in "$KVSERVE_KERNEL_CACHE"/*.cubin; do
    echo "== $(basename "$f")"
    grep -E "Used|spill" "${f%.cubin}.log" | sed 's/^/   /'
    cuobjdump --dump-sass "$f" > /tmp/sass.txt 2>&1
    for op in HMMA HGMMA LDGSTS LDG.E.128 LDSM STL LDL MUFU.EX2 BAR; do
      printf "   %-10s %s\n" "$op" "$(grep -c "$op" /tmp/sass.txt)"
    done
  done
} > "$OUT/sass_summary.txt" 2>&1
cp /tmp/sass.txt "$OUT/last_kernel.sass" 2>/dev/null

echo "----- tests"; tail -n 25 "$OUT/tests.log"
[ -f "$OUT/engine.log" ] && { echo "----- engine"; tail -n 15 "$OUT/engine.log"; }
echo "----- bench"; sed -n '/# summary/,$p' "$OUT/bench.log" | head -70; tail -n 3 "$OUT/bench.log"
