#!/usr/bin/env bash
# compute-sanitizer on ONE GPU, in one call, two ways:
#  - virtual ranks (openep_vrank_tests): racecheck and memcheck over EP4 intranode and low latency and internode at
#    2x2 emulated nodes. All ranks are threads of ONE process there, and the tool does not keep their kernels running
#    side by side: the tiny hook-mode case (LowLatencyVrank.HookModeAndZeroCopy/tokens33*/EP4) cannot make progress
#    under it and ends in the bounded-wait timeout error (measured 2026-12-02, 9b5ce90; docs/DESIGN.md), so it is
#    checked the second way instead;
#  - fake nodes (openep_mgpu_tests under tools/launch.py, 2 nodes x 1 rank on the one GPU): every rank is its own
#    process under its own sanitizer, so the ranks' kernels do run concurrently. Internode over the socket rail, and
#    under the loopback GIN plugin (tests/gin_loopback) low latency over GIN (the hook case) and internode over the
#    GIN rail. The tool also reports CUDA API errors that NCCL itself provokes and handles (kernel-image probing in
#    ncclInitKernelsForDevice, cuMemCreate of fabric handles, unmapping in ncclDevrFinalize); those lines ("Program
#    hit ...") are counted apart from device memory errors, which must be 0.
# Waits stay bounded (timeouts scaled by OPENEP_TEST_TIMEOUT_SCALE, default 5 here), so a tool that stalls a rank
# shows as a timeout error, not as a hang.
#   OUT=<dir> BUILD_DIR=build [OPENEP_SANITIZER_SUITES="intranode low_latency internode fake_nodes fake_nodes_gin"]
#   [OPENEP_SANITIZER_LIMIT=seconds per tool and suite] bash tools/sanitizer_check.sh
# Needs openep_vrank_tests (and for the fake-node suites openep_mgpu_tests, openep_gin_loopback) built. Logs in $OUT;
# the summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OPENEP_TEST_TIMEOUT_SCALE=${OPENEP_TEST_TIMEOUT_SCALE:-5}
OUT=${OUT:-sanitizer_check_out}; B=${BUILD_DIR:-build}; LIMIT=${OPENEP_SANITIZER_LIMIT:-120}; mkdir -p "$OUT"
SUITES=${OPENEP_SANITIZER_SUITES:-intranode low_latency internode fake_nodes fake_nodes_gin}
declare -A filters=(
  [intranode]='IntranodeVrank.MatchesReference/tokens127*/EP4:IntranodeVrank.MatchesReference/tokens300*/EP4:IntranodeVrank.MatchesReference/tokens513*/EP4'
  [low_latency]='LowLatencyVrank.MatchesReference/tokens128_T128_hidden2048*/EP4:LowLatencyVrank.HookModeAndZeroCopy/tokens64*/EP4'
  [internode]='InternodeVrank.MatchesReference/tokens127_hidden7168*/N2xM2'
  [fake_nodes]='InternodeMgpu.MatchesReference/tokens300_hidden2048_topk8_epr8_fp8_notopk_emptynode*:InternodeMgpu.MatchesReference/tokens33_hidden2048_topk4_epr8_bf16_emptynode_align1_chunks16'
  [fake_nodes_gin]='LowLatencyMgpu.HookModeAndZeroCopy/tokens33*:InternodeMgpu.MatchesReference/tokens257_hidden2048_topk8_epr8_fp8_uniform_bias_align1_chunks3'
)
declare -a lines
outcome_of() {  # outcome_of RC
  if [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then echo "TIMED OUT after $LIMIT s"; elif [ "$1" -ne 0 ]; then echo "FAILED (rc $1)"; else echo ok; fi
}
for suite in $SUITES; do
  case $suite in fake_nodes*) tools="memcheck" ;; *) tools="racecheck memcheck" ;; esac
  for tool in $tools; do
    log="$OUT/${suite}_$tool.log"; t0=$SECONDS
    if [[ $suite == fake_nodes* ]]; then
      launch=(python3 tools/launch.py --nproc 2 --ranks-per-node 1 --min-gpus 1 --timeout $((LIMIT - 10))
              --log-dir "$OUT/${suite}_$tool")
      [ "$suite" = fake_nodes_gin ] && launch+=(--gin-loopback "$B/tests/gin_loopback/libopenep_gin_loopback.so")
      env $([ "$suite" = fake_nodes_gin ] && echo OPENEP_TEST_INTERNODE_BACKEND=gin OPENEP_TEST_LL_NETWORK=1) \
        timeout --kill-after=10 "$LIMIT" "${launch[@]}" -- compute-sanitizer --tool "$tool" \
        "$B/tests/openep_mgpu_tests" "--gtest_filter=${filters[$suite]}" >"$log" 2>&1
      rc=$?
      for r in 0 1; do
        rl="$OUT/${suite}_$tool/rank$r.log"
        ok=$(grep -c "^\[       OK \]" "$rl" 2>/dev/null); failed=$(grep -c "^\[  FAILED  \] .* ms)" "$rl" 2>/dev/null)
        total=$(grep -oE "ERROR SUMMARY: [0-9]+" "$rl" 2>/dev/null | grep -oE "[0-9]+$" | tail -1)
        api=$(grep -c "^========= Program hit " "$rl" 2>/dev/null)
        device=$(( ${total:-0} - ${api:-0} ))
        [ -z "$total" ] && device="?"
        lines+=("$(printf '%-15s %-10s rank %d %s: %d cases ok, %d failed; device memory errors %s (API errors NCCL handles: %s) (%d s)' \
          "$suite" "$tool" "$r" "$(outcome_of $rc)" "${ok:-0}" "${failed:-0}" "$device" "${api:-0}" $((SECONDS - t0)))")
        echo "${lines[-1]}"
      done
      continue
    fi
    timeout --kill-after=10 "$LIMIT" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      "$B/tests/openep_vrank_tests" "--gtest_filter=${filters[$suite]}" >"$log" 2>&1
    rc=$?
    ok=$(grep -c "^\[       OK \]" "$log"); failed=$(grep -c "^\[  FAILED  \] .* ms)" "$log")
    summary=$(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
    lines+=("$(printf '%-15s %-10s %s: %d cases ok, %d failed; %s (%d s)' "$suite" "$tool" "$(outcome_of $rc)" "$ok" "$failed" "$summary" $((SECONDS - t0)))")
    echo "${lines[-1]}"
  done
done
echo
echo "================ sanitizer check: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), commit ${OPENEP_COMMIT:-?}, timeouts x$OPENEP_TEST_TIMEOUT_SCALE ================"
printf '%s\n' "${lines[@]}"
exit 0
