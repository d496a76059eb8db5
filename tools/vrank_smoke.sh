#!/usr/bin/env bash
# Quick virtual-rank smoke on one GPU (a few cases of every suite, EP2..EP16) and a probe of whether
# compute-sanitizer can run virtual ranks, for a first look before the full tools/gpu_check.sh.
#   OUT=<dir> bash tools/vrank_smoke.sh [build dir]
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-vrank_smoke_out}; B=${1:-build}; mkdir -p "$OUT"
f='VirtualFabric.*:BufferVrank.BarrierRoundTripsManyTimes/EP4:BufferVrank.StalledPeer*/EP2:IntranodeVrank.MatchesReference/tokens127*/EP4'
f+=':IntranodeVrank.MatchesReference/tokens4096_hidden7168*fp8*/EP8:IntranodeVrank.MatchesReference/tokens8192_hidden7168*/EP2'
f+=':LowLatencyVrank.MatchesReference/tokens128_T128_hidden7168*/EP16:LowLatencyVrank.HookModeAndZeroCopy/tokens64*/EP4'
f+=':LowLatencyVrank.GraphReplays*/EP2:LowLatencyVrank.TwoHooked*/EP16:GraphVrank.*/EP4:OverlapVrank.CommScope*/EP8'
t0=$SECONDS
timeout 300 "$B/tests/openep_vrank_tests" --gtest_filter="$f" >"$OUT/smoke.log" 2>&1; echo "smoke rc $? ($((SECONDS-t0)) s)"
grep -E "^\[       OK \]|^\[  FAILED  \]|Failure|error|Error" "$OUT/smoke.log" | head -60
t0=$SECONDS
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$B/tests/openep_vrank_tests" \
  --gtest_filter='IntranodeVrank.MatchesReference/tokens127*/EP4' >"$OUT/san_probe.log" 2>&1
echo "sanitizer probe rc $? ($((SECONDS-t0)) s)"; grep -E "OK \]|FAILED|ERROR SUMMARY|timeout|waited" "$OUT/san_probe.log" | head
