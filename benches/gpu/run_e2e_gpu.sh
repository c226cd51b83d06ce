#!/usr/bin/env bash
# One device call: decode CUDA-graph tests, then the end-to-end decode benchmark (graphs and
# eager) with its in-run baselines. Needs the wheel built here (`maturin build --release -o
# dist`) and carried as "dist". Logs and JSON go to $OUT; the tables print last.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --target /tmp/site dist/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_graphs.py tests/gpu/test_engine_cuda.py \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python3 benches/gpu/bench_e2e.py --out "$OUT/e2e_graphs.json" 2>&1 | tee "$OUT/e2e_graphs.log" \
  | grep -v Warning
python3 benches/gpu/bench_e2e.py --enforce-eager --skip-hf --batches 1,8,64,256 \
  --out "$OUT/e2e_eager.json" 2>&1 | tee "$OUT/e2e_eager.log" | grep -v Warning
