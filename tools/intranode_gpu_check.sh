#!/usr/bin/env bash
# Intranode normal mode on ONE GPU in one device call (< 10 minutes): build, CPU tests, the whole virtual-rank
# intranode and overlap/graph suites at EP2/4/8 (rounds and DeepEP-sized windows included) next to the soak, then
# the one-GPU SM-cost probe (bench/vrank_bench.cu) at EP2/4/8 with OpenEP's and DeepEP's window sizes.
#   OUT=<dir> OPENEP_COMMIT=<sha> bash tools/intranode_gpu_check.sh
# OPENEP_STEPS (default build,cpu,vrank,bench) picks steps; logs go to $OUT, the summary is printed last.
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
  run build 300 cmake --build build -j "$(nproc)"
fi
want cpu && run cpu 120 ctest --test-dir build -L cpu --output-on-failure
if want vrank; then
  run vrank_intranode 380 ctest --test-dir build -L vrank -LE soak -R 'intranode|overlap' -V &
  run soak 380 ctest --test-dir build -L soak -V &
  wait
fi
if want bench; then
  for spec in "2 full" "2 deepep" "4 full" "4 deepep" "8 full" "8 deepep"; do
    set -- $spec
    [ $((SECONDS - t0)) -lt 540 ] || { echo "bench EP$1 $2: not run (time)" >>"$summary"; continue; }
    run "bench_ep$1_$2" 90 build/bench/openep_vrank_bench --ranks "$1" --window "$2" --sms 4,8,12,16,24 \
      --commit "$commit" --results "$OUT/vrank_bench.jsonl"
  done
fi
echo
echo "================ intranode GPU check: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), commit $commit, $((SECONDS - t0)) s ================"
cat "$summary"
for f in "$OUT"/vrank_intranode.log "$OUT"/soak.log; do
  [ -f "$f" ] || continue
  echo "--- $(basename "$f")"
  grep -E "tests passed|tests failed|\*\*\*Failed|Timeout|FAILED  |^soak:" "$f" | head -20
  grep -E "^\[  FAILED  \]" "$f" | sort -u | head -20
done
grep -hE "\[       OK \] .*(DeepEPSized|Rounds)" "$OUT"/vrank_intranode.log 2>/dev/null | head -30
for f in "$OUT"/bench_ep*.log; do
  [ -f "$f" ] && { echo "--- $(basename "$f" .log)"; sed -n '/virtual-rank SM cost/,$p' "$f"; grep -h "openep_vrank_bench:" "$f"; }
done
exit 0
