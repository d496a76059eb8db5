#!/usr/bin/env bash
# Intranode normal mode on ONE GPU in one device call (< 10 minutes): build, CPU tests, the whole virtual-rank
# intranode and overlap/graph suites at EP2/4/8 (rounds and DeepEP-sized windows included) next to the soak, then
# the one-GPU SM-cost probe (bench/vrank_bench.cu) at EP2/4/8 with OpenEP's and DeepEP's window sizes.
#   OUT=<dir> OPENEP_COMMIT=<sha> bash tools/intranode_gpu_check.sh
# OPENEP_STEPS (default build,cpu,vrank,bench; add python for tools/python_gpu_check.sh next to the vrank suites);
# OPENEP_BENCH_DEADLINE (default 540): no bench run starts after this many seconds; OPENEP_BENCH_SPECS: the probe
# runs, comma-separated "EP window [pool]" (default: EP2/4/8 x full, full pool, deepep).
# picks steps; logs go to $OUT (packed into logs.tgz), the summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-intranode_check_out}
mkdir -p "$OUT"
commit=${OPENEP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
STEPS=",${OPENEP_STEPS:-build,cpu,vrank,bench},"
want() { [[ "$STEPS" == *",$1,"* ]]; }
t0=$SECONDS
summary="$OUT/summary.txt"
: >"$summary"
run() {  # run NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc ($((SECONDS - t)) s)" >>"$summary"
}
if want build; then
  run configure 120 cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DOPENEP_BUILD_PYTHON=OFF
  # OPENEP_BUILD_TARGETS: only these targets (e.g. "openep_vrank_tests openep_vrank_bench"), default all
  run build 300 cmake --build build -j "$(nproc)" ${OPENEP_BUILD_TARGETS:+--target $OPENEP_BUILD_TARGETS}
fi
want cpu && run cpu 120 ctest --test-dir build -L cpu --output-on-failure
if want vrank; then
  run vrank_intranode "${OPENEP_VRANK_LIMIT:-380}" ctest --test-dir build -L vrank -LE soak -R 'intranode|overlap' -V &
  run soak "${OPENEP_VRANK_LIMIT:-380}" ctest --test-dir build -L soak -V &
  # Python: pip install + pytest (its 1-GPU and fake-node parts on this machine) next to the suites
  want python && run python 380 env OUT="$OUT/python" bash tools/python_gpu_check.sh &
  wait
fi
if want bench; then
  IFS=, read -r -a specs <<<"${OPENEP_BENCH_SPECS:-2 full,2 full pool,2 deepep,4 full,4 full pool,4 deepep,8 full,8 full pool,8 deepep}"
  for spec in "${specs[@]}"; do
    set -- $spec
    [ $((SECONDS - t0)) -lt "${OPENEP_BENCH_DEADLINE:-540}" ] || { echo "bench EP$1 $2 ${3:-}: not run (time)" >>"$summary"; continue; }
    run "bench_ep$1_$2${3:+_$3}" 90 build/bench/openep_vrank_bench --ranks "$1" --window "$2" ${3:+--pool} \
      --sms 4,8,12,16,24 --commit "$commit" --results "$OUT/vrank_bench.jsonl"
  done
fi
{
  echo
  echo "================ intranode GPU check: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), commit $commit, $((SECONDS - t0)) s ================"
  for f in "$OUT"/bench_ep*.log; do
    [ -f "$f" ] || continue
    # the 8, 12 and 24-SM rows (the whole table is in the JSON lines and the log)
    echo "--- $(basename "$f" .log): $(grep -o 'window [a-z]* (num_nvl_bytes [0-9]*), outputs [a-z() -]*' "$f")"
    awk '$3 == 8 || $3 == 12 || $3 == 24' "$f" | grep -E "^(dispatch|combine)"; grep -h "openep_vrank_bench:" "$f"
  done
  for f in "$OUT"/cpu.log "$OUT"/vrank_intranode.log "$OUT"/soak.log; do
    [ -f "$f" ] || continue
    echo "--- $(basename "$f")"
    grep -hE "tests passed|tests failed|\*\*\*Failed|\*\*\*Timeout|^soak:|PASSED|FAILED TEST" "$f" | sort | uniq -c | head -20
    grep -hE "^([0-9]+: )?\[  FAILED  \]" "$f" | sed 's/^[0-9]*: //' | sort -u | head -20
  done
  [ -f "$OUT/python.log" ] && { echo "--- python"; grep -E "^== |passed|failed" "$OUT/python.log" | tail -8; }
  echo "--- steps"
  cat "$summary"
} >"$OUT/report.txt"
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls -d *.log *.jsonl python 2>/dev/null) 2>/dev/null
rm -rf "$OUT"/*.log "$OUT/python"
cat "$OUT/report.txt"
exit 0
