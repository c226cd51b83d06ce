#!/usr/bin/env bash
# GPU tests and benchmarks on any CUDA machine, against the kvserve installed in this Python
# (for instance `pip install "$(ls dist/kvserve-*.whl)[cuda,test]"` after
# `maturin build --release -o dist`):
#   benches/gpu/run.sh tests [pytest args]    tests/gpu (what the device cannot run skips)
#   benches/gpu/run.sh bench [bench_e2e args] the attention table (bench_attention.py), the
#                                             end-to-end decode table (bench_e2e.py), then the
#                                             pytest-benchmark suite (bench_gpu_suite.py;
#                                             SUITE=0 leaves it out)
# WHEEL=path installs that wheel (without dependencies) into $OUT/site and uses it instead.
# OUT (default bench_out) gets the logs and JSON; benches/RESULTS.md records the tables.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-}
shift || true
if [ "$mode" != tests ] && [ "$mode" != bench ]; then
  echo "usage: $0 tests [pytest args] | bench [bench_e2e.py args]" >&2
  exit 2
fi
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if [ -n "${WHEEL:-}" ]; then
  python3 -m pip install -q --no-deps --upgrade --target "$OUT/site" "$WHEEL"
  export PYTHONPATH="$PWD/$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch

import kvserve
from kvserve.kernels import cuda_unavailable_reason

print(f"kvserve {kvserve.__path__[0]}; torch {torch.__version__} (CUDA {torch.version.cuda})")
reason = cuda_unavailable_reason()
if reason is not None:
    raise SystemExit(f"the cuda kernels cannot run here: {reason}")
print(torch.cuda.get_device_name())
PY
date -u +"%Y-%m-%d %H:%M UTC"
case $mode in
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/gpu "$@" 2>&1 | tee "$OUT/tests_gpu.log" ;;
  bench)
    export PYTHONPATH="$PWD/benches/gpu${PYTHONPATH:+:$PYTHONPATH}"
    python3 benches/gpu/bench_attention.py --json "$OUT/attention.json" 2>&1 \
      | tee "$OUT/attention.log"
    python3 benches/gpu/bench_e2e.py --out "$OUT/e2e.json" "$@" 2>&1 | tee "$OUT/e2e.log"
    if [ "${SUITE:-1}" != 0 ]; then
      python3 -m pytest -q -p no:cacheprovider benches/gpu/bench_gpu_suite.py --benchmark-only \
        --benchmark-json "$OUT/suite.json" 2>&1 | tee "$OUT/suite.log"
    fi ;;
esac
