#!/usr/bin/env bash
# Processes sharing a GPU through CUDA IPC (openep/testing.hpp IpcFabric) in one device call: build the IPC test
# binary, then every CTest test of label ipc (the low-latency and intranode suites on 2 processes, and the two tests
# that SIGKILL a rank's process, on 4), each under a time limit.
#   OUT=<dir> bash tools/ipc_gpu_check.sh
# OPENEP_IPC_TESTS: a CTest regex of the ipc tests to run (default all); logs go to $OUT (rank logs under
# $OUT/ipc_logs, packed into $OUT/logs.tgz), the summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_MODULE_LOADING=EAGER
OUT=${OUT:-ipc_check_out}
mkdir -p "$OUT"
t0=$SECONDS
summary="$OUT/summary.txt"
: >"$summary"
run() {  # run NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc ($((SECONDS - t)) s)" >>"$summary"
  return $rc
}
if [ "${OPENEP_SKIP_BUILD:-0}" != 1 ]; then
  run configure 120 cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DOPENEP_BUILD_PYTHON=OFF
  run build 400 cmake --build build -j "$(nproc)" --target openep_ipc_tests
fi
for t in $(ctest --test-dir build -N -L ipc | awk '/Test +#/ {print $3}'); do
  [[ "$t" =~ ${OPENEP_IPC_TESTS:-.} ]] || continue
  run "$t" "${OPENEP_IPC_LIMIT:-300}" ctest --test-dir build -R "^$t\$" --output-on-failure
done
mkdir -p "$OUT/ipc_logs" && cp -r build/ipc_logs/. "$OUT/ipc_logs/" 2>/dev/null
{
  echo
  echo "================ IPC GPU check: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $((SECONDS - t0)) s ================"
  for f in "$OUT"/ipc_*.log; do
    echo "--- $(basename "$f" .log)"
    grep -hE "tests passed|\[  PASSED  \]|\[  FAILED  \]|\[  SKIPPED \]|launch.py" "$f" | sort | uniq -c | head -12
  done
  for d in "$OUT"/ipc_logs/*/; do
    [ -d "$d" ] || continue
    echo "--- $(basename "$d") rank 0 (IpcKill lines, failures)"
    grep -hE "\[ipc rank|Failure|error|rror:" "$d"/rank0.log 2>/dev/null | head -12
  done
} >>"$summary"
tar czf "$OUT/logs.tgz" -C "$OUT" --exclude=logs.tgz . 2>/dev/null
cat "$summary"
