#!/usr/bin/env bash
# Every GPU check and benchmark in at most two device calls (each under the tool's 600 s):
#   bash benches/gpu/run_all_gpu.sh tests      all of tests/gpu with the defaults (the
#                                              non-prefill files first, then the Hopper
#                                              prefill file), then the prefill benchmark
#                                              and the ws switch-variant A/B with what is left
#   bash benches/gpu/run_all_gpu.sh e2e        the end-to-end decode benchmark (b1 with the
#                                              attention-path switches off, then b1..b256
#                                              with transformers beside it, b1 again)
#   bash benches/gpu/run_all_gpu.sh check      one call for a change outside the prefill
#                                              kernel: tests/gpu less the prefill file, then
#                                              the e2e table at b1, 8, 64, 256 with
#                                              transformers beside it
# Needs the wheel built here (`maturin build --release -o dist`) and carried as "dist".
# KVSERVE_SM90_PREFILL=ws|v1 picks the Hopper prefill kernel for the whole run.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --target /tmp/site dist/*.whl || exit 1
cp -r python/kvserve/. /tmp/site/kvserve/
export PYTHONPATH=/tmp/site:$PWD/benches/gpu PYTHONUNBUFFERED=1
export KVSERVE_KERNEL_CACHE=/tmp/kvserve-kcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
case ${1:-tests} in
  tests)
    timeout 240 python3 -m pytest -q -p no:cacheprovider --maxfail 20 tests/gpu \
      --ignore=tests/gpu/test_prefill_sm90.py > "$OUT/tests_gpu.log" 2>&1
    echo "pytest gpu (not prefill) rc=$? after $SECONDS s" | tee -a "$OUT/tests_gpu.log"
    tail -n 4 "$OUT/tests_gpu.log"
    # The prefill script keeps its own time budget: what is left of ~570 s.
    COMPILE_TESTS= AB=0 WAITS=0 PROFILE=0 GPUTESTS=0 BUDGET_S=$((570 - SECONDS)) \
      bash benches/gpu/run_prefill_sm90_gpu.sh ;;
  e2e)
    bash benches/gpu/run_e2e_gpu.sh ${E2E_STAGES:-final} ;;
  check)
    timeout 250 python3 -m pytest -q -p no:cacheprovider --maxfail 20 tests/gpu \
      --ignore=tests/gpu/test_prefill_sm90.py > "$OUT/tests_gpu.log" 2>&1
    echo "pytest gpu (not prefill) rc=$? after $SECONDS s" | tee -a "$OUT/tests_gpu.log"
    tail -n 4 "$OUT/tests_gpu.log"
    date -u
    timeout $((575 - SECONDS)) python3 benches/gpu/bench_e2e.py --out "$OUT/e2e_check.json" \
      --batches 1,8,64,256 2>&1 | grep -v Warning > "$OUT/e2e_check.log"
    echo "e2e rc=$? after $SECONDS s"
    tail -n 18 "$OUT/e2e_check.log" ;;
esac
