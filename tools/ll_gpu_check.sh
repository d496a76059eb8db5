#!/usr/bin/env bash
# Light GPU check of the low-latency path: builds only the multi-GPU tests and the benchmark, runs the
# low-latency tests (gtest filter, default LowLatency*) and the low-latency benchmark ops.
#   OUT=<dir> bash tools/ll_gpu_check.sh [--filter 'LowLatency*'] [--no-tests] [openep_bench arguments...]
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-ll_gpu_check_out}
mkdir -p "$OUT"
BUILD_DIR=${BUILD_DIR:-build}
filter='LowLatency*'
tests=1
while [ $# -gt 0 ]; do
  case "$1" in
    --filter) filter=$2; shift 2 ;;
    --no-tests) tests=0; shift ;;
    *) break ;;
  esac
done
commit=${OPENEP_COMMIT:-$(cat .commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi -L | tee "$OUT/gpus.txt"
t0=$SECONDS
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j "$(nproc)" --target openep_mgpu_tests openep_bench >"$OUT/build.log" 2>&1 || { grep -E "error" -A3 "$OUT/build.log" | head -60; exit 1; }
echo "== build ok ($((SECONDS - t0)) s)"
rc=0
if [ $tests -eq 1 ]; then
  t0=$SECONDS
  python3 tools/launch.py --min-gpus 2 --timeout 300 --log-dir "$OUT/mgpu_logs" -- \
    "$BUILD_DIR/tests/openep_mgpu_tests" --gtest_filter="$filter" >"$OUT/mgpu.log" 2>&1
  rc=$?
  echo "== mgpu tests rc $rc ($((SECONDS - t0)) s)"
  grep -hE "^\[  (PASSED|FAILED) |^\[       OK|^\[  FAILED|Failure|error|Expected|Which is|got|rank" "$OUT/mgpu.log" "$OUT"/mgpu_logs/* 2>/dev/null | head -60
fi
t0=$SECONDS
python3 tools/launch.py --min-gpus 2 --timeout 240 --log-dir "$OUT/bench_logs" -- \
  "$BUILD_DIR/bench/openep_bench" --commit "$commit" --results "$OUT/results.jsonl" "$@" >"$OUT/bench.log" 2>&1
echo "== bench rc $? ($((SECONDS - t0)) s)"
grep -E "^(OpenEP|ll_|op )|error|failed" "$OUT/bench.log" | head -40
tail -5 "$OUT"/bench_logs/* 2>/dev/null | grep -iE "error|fail" | head
exit $rc
