#!/usr/bin/env bash
# compute-sanitizer racecheck and memcheck over EP4 virtual ranks (intranode, low latency) and internode at 2x2
# emulated nodes, on ONE GPU, in one call. Waits stay bounded (timeouts scaled by OPENEP_TEST_TIMEOUT_SCALE, default
# 5 here), so a tool that stalls a rank shows as a timeout error, not as a hang.
#   OUT=<dir> BUILD_DIR=build [OPENEP_SANITIZER_LIMIT=seconds per tool and suite] bash tools/sanitizer_check.sh
# Needs openep_vrank_tests built. Logs in $OUT; the summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OPENEP_TEST_TIMEOUT_SCALE=${OPENEP_TEST_TIMEOUT_SCALE:-5}
OUT=${OUT:-sanitizer_check_out}; B=${BUILD_DIR:-build}; LIMIT=${OPENEP_SANITIZER_LIMIT:-120}; mkdir -p "$OUT"
declare -A filters=(
  [intranode]='IntranodeVrank.MatchesReference/tokens127*/EP4:IntranodeVrank.MatchesReference/tokens300*/EP4:IntranodeVrank.MatchesReference/tokens513*/EP4'
  [low_latency]='LowLatencyVrank.MatchesReference/tokens128_T128_hidden2048*/EP4:LowLatencyVrank.HookModeAndZeroCopy/tokens64*/EP4'
  [internode]='InternodeVrank.MatchesReference/tokens127_hidden7168*/N2xM2'
)
declare -a lines
for suite in intranode low_latency internode; do
  for tool in racecheck memcheck; do
    log="$OUT/${suite}_$tool.log"; t0=$SECONDS
    timeout --kill-after=10 "$LIMIT" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      "$B/tests/openep_vrank_tests" "--gtest_filter=${filters[$suite]}" >"$log" 2>&1
    rc=$?; outcome=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then outcome="TIMED OUT after $LIMIT s"; elif [ $rc -ne 0 ]; then outcome="FAILED (rc $rc)"; fi
    ok=$(grep -c "^\[       OK \]" "$log"); failed=$(grep -c "^\[  FAILED  \] .* ms)" "$log")
    summary=$(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
    lines+=("$(printf '%-12s %-10s %s: %d cases ok, %d failed; %s (%d s)' "$suite" "$tool" "$outcome" "$ok" "$failed" "$summary" $((SECONDS - t0)))")
    echo "${lines[-1]}"
  done
done
echo
echo "================ sanitizer check: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), commit ${OPENEP_COMMIT:-?}, timeouts x$OPENEP_TEST_TIMEOUT_SCALE ================"
printf '%s\n' "${lines[@]}"
exit 0
