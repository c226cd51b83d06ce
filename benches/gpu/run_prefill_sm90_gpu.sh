#!/usr/bin/env bash
# One device call for the Hopper prefill kernels (paged_prefill_sm90.cu "v1" and the
# warp-specialised paged_prefill_sm90_ws.cu "ws"): a short ws-vs-v1 smoke check first under a
# tight timeout (an mbarrier deadlock shows there, not in the long steps), their tests, the
# prefill benchmark with the baselines (copy, matmul, SDPA flash/cuDNN), optionally the rest
# of the GPU tests and one ncu profile, then the resource report + SASS summary.
# Logs in $OUT; short table last.
# Usage (device tool, carry=["dist"]): bash benches/gpu/run_prefill_sm90_gpu.sh
# Knobs: TESTS=1 BENCH=1 AB=1 WAITS=1 GPUTESTS=0 PROFILE=0 (ncu of one kernel: PROFILE=ws|v1),
# TESTS_K (pytest -k), COMPILE_TESTS= (skip the NVRTC tests), BENCH_ARGS (e.g. --no-variants).
# SWITCHES=1: the ws kernel variants (bench_attention.py SM90_WS_SWITCH_VARIANTS: ws-v3, the
# V ring one stage deeper; SW_ALL picks; the session-3 consumer switches are folded in) get
# a smoke check each (own process and timeout, so a hang costs one step); those that fail are
# left out of the tests and the bench; their tests run as a separate step after the bench;
# then an interleaved A/B against ws default (SWAB=1, SWAB_ROUNDS=7) and, with WAITS=1, their cycle counters.
# BUDGET_S=560: steps after the bench get at most what is left of it (each step's own limit
# is the cap; a step with < 30 s left is skipped and says so), so the summary is printed
# inside the device tool's 600 s (a plain run may reach it: later steps then drop); leaner:
#   COMPILE_TESTS= AB=0 WAITS=0 bash benches/gpu/run_prefill_sm90_gpu.sh
# (the NVRTC tests run on the CPU box; ab-switches times ws default beside the variants).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --target /tmp/site dist/*.whl > /tmp/setup.log 2>&1 \
  && cp -r python/kvserve/. /tmp/site/kvserve/
export PYTHONPATH=/tmp/site:$PWD/benches/gpu
export KVSERVE_KERNEL_CACHE=/tmp/kvserve-kcache
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv \
  > "$OUT/gpu.txt" 2>&1
date -u +"%Y-%m-%d %H:%M UTC" >> "$OUT/gpu.txt"

PYTEST="python3 -m pytest -q -p no:cacheprovider"
# Seconds a step may run: its cap ($1), or what is left of BUDGET_S less 15 s for the summary
# and $2 s kept for later steps.
tlim() {
  local t=$(( ${BUDGET_S:-560} - SECONDS - 15 - ${2:-0} ))
  [ $t -gt "$1" ] && t=$1
  echo $t
}
# (At most 8 files come back from $OUT: small logs share gpu.txt and ab_waits.log.)
timeout 120 python3 benches/gpu/profile_prefill_sm90.py --smoke > /tmp/smoke.log 2>&1
SMOKE=$?
echo "smoke rc=$SMOKE" >> /tmp/smoke.log
cat /tmp/smoke.log >> "$OUT/gpu.txt"

# The switch variants: smoke each (default ws passed first). GOOD / BAD: bench names;
# NEW_K: their test ids in tests/gpu/test_prefill_sm90.py (ws-lazy-only has none), run in
# their own step.
SW_ALL="${SW_ALL:-ws-v3}"
GOOD=""; BAD=""; SW_RAN=0
rm -f /tmp/smoke_sw.log /tmp/sass_sw.log  # a warm machine keeps /tmp between calls
if [ "${SWITCHES:-1}" = 1 ] && [ $SMOKE = 0 ]; then
  SW_RAN=1
  for v in $SW_ALL; do
    [ $(tlim 60 300) -lt 30 ] && { BAD="$BAD $v"; echo "smoke $v: skipped (time)" >> /tmp/smoke_sw.log; continue; }
    timeout $(tlim 60 300) python3 benches/gpu/sm90_ws_variants.py --smoke "$v" >> /tmp/smoke_sw.log 2>&1
    rc=$?
    echo "smoke $v rc=$rc" >> /tmp/smoke_sw.log
    if [ $rc = 0 ]; then GOOD="$GOOD $v"; else BAD="$BAD $v"; fi
  done
  { cat /tmp/smoke_sw.log; echo "switch variants good:$GOOD bad:$BAD"; } >> "$OUT/gpu.txt"
else
  BAD="$SW_ALL"
fi
test_id() { case "$1" in ws-v3) echo "" ;; *) echo "$1" ;; esac; }  # variants with test ids
NEW_K=""
for v in $GOOD; do
  t=$(test_id "$v"); [ -n "$t" ] && NEW_K="${NEW_K:+$NEW_K or }$t"
done
SKIP=$(echo $BAD | tr ' ' ',')

# Smoke passed: every test (less the new switch variants: their own step below). Wrong
# results: the ws tests alone (which cases fail). A hang: none (each ws test could hang again).
if [ "${TESTS:-1}" = 1 ] && [ $SMOKE != 124 ]; then
  K="${TESTS_K:-}"; [ $SMOKE != 0 ] && K="ws"
  T=$(tlim 240 150)  # keep 150 s for the bench
  [ $T -lt 30 ] && T=30
  timeout $T $PYTEST --maxfail 30 tests/gpu/test_prefill_sm90.py ${COMPILE_TESTS-tests/test_kernels_compile.py} \
    -k "$K" > "$OUT/tests_sm90.log" 2>&1
  echo "pytest sm90 rc=$? (limit $T s)" >> "$OUT/tests_sm90.log"
fi

if [ "${BENCH:-1}" = 1 ] && [ $SMOKE = 0 ]; then
  T=$(tlim 240); [ $T -lt 60 ] && T=60
  timeout $T python3 benches/gpu/bench_attention.py --prefill-only --no-mma ${BENCH_ARGS:-} \
    ${SKIP:+--skip-variants "$SKIP"} --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?" >> "$OUT/bench.log"
fi

# The switch variants' tests (those whose smoke passed), after the bench: a hang here costs
# only this step.
T=$(tlim 200)
if [ "${TESTS:-1}" = 1 ] && [ -n "$NEW_K" ]; then
  if [ $T -ge 30 ]; then
    timeout $T $PYTEST --maxfail 20 tests/gpu/test_prefill_sm90.py -k "$NEW_K" \
      >> "$OUT/tests_sm90.log" 2>&1
    echo "pytest sm90 switch variants ($NEW_K) rc=$? (limit $T s)" >> "$OUT/tests_sm90.log"
  else
    echo "pytest sm90 switch variants: skipped (time budget)" >> "$OUT/tests_sm90.log"
  fi
fi

# The interleaved A/B of the switch variants vs ws default (the comparison that counts: the
# bench rows drift by +-5% over a run), then their builds' SASS counts.
GOOD_CSV=$(echo $GOOD | tr ' ' ',')
T=$(tlim 150)
if [ "${SWAB:-1}" = 1 ] && [ -n "$GOOD_CSV" ]; then
  if [ $T -ge 30 ]; then
    timeout $T python3 benches/gpu/sm90_ws_variants.py --ab "$GOOD_CSV" ${SWAB_ROUNDS:-7} \
      >> "$OUT/ab_waits.log" 2>&1
    echo "ab-switches rc=$? (limit $T s)" >> "$OUT/ab_waits.log"
  else
    echo "ab-switches: skipped (time budget)" >> "$OUT/ab_waits.log"
  fi
fi
T=$(tlim 60)
if [ "${SWITCHES:-1}" = 1 ] && [ $T -ge 20 ]; then
  timeout $T python3 benches/gpu/sm90_ws_variants.py --sass > /tmp/sass_sw.log 2>&1
  echo "sass-switches rc=$?" >> /tmp/sass_sw.log
fi

if [ "${GPUTESTS:-0}" = 1 ]; then
  T=$(tlim 200); [ $T -lt 30 ] && T=30
  timeout $T $PYTEST --maxfail 10 tests/gpu --ignore=tests/gpu/test_prefill_sm90.py \
    > "$OUT/tests_gpu.log" 2>&1
  echo "pytest gpu rc=$?" >> "$OUT/tests_gpu.log"
fi

{
  cat /tmp/sass_sw.log 2>/dev/null
  for f in "$KVSERVE_KERNEL_CACHE"/paged_prefill_sm90*.cubin; do
    [ $(tlim 100) -lt 30 ] && { echo "(cut short: time budget)"; break; }
    echo "== $(basename "$f") $(grep -o 'D[A-Z_0-9]*=[0-9]*' "${f%.cubin}.log" | tr '\n' ' ')"
    grep -E "Used|spill|serial|C75" "${f%.cubin}.log" | sed 's/^/   /'
    cuobjdump --dump-sass "$f" > /tmp/sass.txt 2>&1
    for op in HGMMA HMMA LDGSTS UTMALDG SYNCS STL LDL MUFU.EX2 BAR WARPSYNC; do
      printf "   %-10s %s\n" "$op" "$(grep -c "$op" /tmp/sass.txt)"
    done
    case "$f" in *sm90_ws*)
      grep -E "STL|LDL" /tmp/sass.txt | head -12 | sed 's/^ */   /' ;;
    esac
  done
} > "$OUT/sass_summary.txt" 2>&1

T=$(tlim 120)
if [ "${AB:-1}" = 1 ] && [ $SMOKE = 0 ] && [ $T -ge 30 ]; then
  timeout $T python3 benches/gpu/profile_prefill_sm90.py --ab >> "$OUT/ab_waits.log" 2>&1
fi

T=$(tlim 90)
if [ "${WAITS:-1}" = 1 ] && [ $SMOKE = 0 ] && [ $T -ge 30 ]; then
  timeout $T python3 benches/gpu/profile_prefill_sm90.py --waits >> "$OUT/ab_waits.log" 2>&1
fi
T=$(tlim 90)
if [ "${WAITS:-1}" = 1 ] && [ -n "$GOOD_CSV" ] && [ $T -ge 30 ]; then
  timeout $T python3 benches/gpu/sm90_ws_variants.py --waits "$GOOD_CSV" >> "$OUT/ab_waits.log" 2>&1
  echo "waits-switches rc=$? (limit $T s)" >> "$OUT/ab_waits.log"
fi
echo "elapsed before the summary: $SECONDS s" >> "$OUT/gpu.txt"

T=$(tlim 120)
if [ "${PROFILE:-0}" != 0 ] && [ $SMOKE = 0 ] && [ $T -ge 30 ]; then
  timeout $T ncu --clock-control none -k regex:paged_prefill_sm90 -s 1 -c 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \
    --section WarpStateStats --section MemoryWorkloadAnalysis \
    --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active \
    python3 benches/gpu/profile_prefill_sm90.py "$PROFILE" > "$OUT/ncu_prefill.txt" 2>&1
fi

echo "----- gpu + smoke"; cat "$OUT/gpu.txt"
echo "----- sm90 tests"; grep -E "passed|failed|rc=|^FAILED|Error" "$OUT/tests_sm90.log" 2>/dev/null | tail -n 30
echo "----- gpu tests"; tail -n 6 "$OUT/tests_gpu.log" 2>/dev/null
echo "----- sass (ws)"; grep -E "^sass-switches|rc=" "$OUT/sass_summary.txt"
grep -A14 "sm90_ws" "$OUT/sass_summary.txt" | grep -v "^   [A-Z.]* *0$" | head -24
if [ -f "$OUT/ncu_prefill.txt" ]; then
  echo "----- ncu"
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L2 Hit|gmma|Registers|Issue Slots|Stall|Warp Cycles" \
    "$OUT/ncu_prefill.txt" | head -24
fi
echo "----- ab / waits"; grep -E "^ab|^waits|rc=" "$OUT/ab_waits.log" 2>/dev/null | tail -n 30
echo "----- bench"; grep -E "^#|^prefill" "$OUT/bench.log" 2>/dev/null | grep -v "n/a" | head -64
tail -n 2 "$OUT/bench.log" 2>/dev/null
