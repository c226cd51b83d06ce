#!/usr/bin/env bash
# One device call (a few minutes on an H200): `kvserve calibrate` on a Llama-3-8B-shaped
# random bf16 model (the profile `kvserve sim` and `kvserve plan` take).
#   bash benches/gpu/calibrate_h200.sh
# Needs the built core: carry the prebuilt wheel as "dist", or python/kvserve/_core.abi3.so
# (then the working tree's python/ is imported as is). Writes $OUT/llama3-8b-h200.json (the
# profile) and $OUT/calibrate.log.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
LOG="$OUT/calibrate.log"
if ls dist/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --target /tmp/site dist/*.whl || exit 1
  cp -r python/kvserve/. /tmp/site/kvserve/
  export PYTHONPATH=/tmp/site
else
  export PYTHONPATH=$PWD/python
fi
export PYTHONUNBUFFERED=1 KVSERVE_KERNEL_CACHE=/tmp/kvserve-kcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
date -u | tee -a "$LOG"
MODEL=/tmp/llama3-8b-random
timeout 240 python3 benches/gpu/make_random_llama.py "$MODEL" 2>&1 | tee -a "$LOG"
timeout 420 python3 -m kvserve.cli calibrate --model "$MODEL" --out "$OUT/llama3-8b-h200.json" \
  --max-model-len 8192 --max-num-batched-tokens 8192 --max-num-seqs 256 \
  --decode-batches "${DECODE_BATCHES:-1,8,32,64,128,256}" --contexts "${CONTEXTS:-256,1024,4096}" \
  --prefill-lens 128,512,2048,4096,8192 --cached-prefixes 1024,4096 --mixed-chunks 256,1024 \
  --decode-steps 8 --repeats 2 --no-progress 2>&1 | grep -v Warning | tee -a "$LOG"
date -u | tee -a "$LOG"
