#!/usr/bin/env bash
# Internode normal mode on ONE GPU, in one call: build, CPU tests, the internode virtual-rank suites (emulated
# nodes 2x1 4x1 2x2 4x2 2x4 8x2), the fake-node tests (2x1, 4x1 over NCCL sockets), and optional extras:
#   OPENEP_REPEAT_OVERLAP=N   run OverlapVrank.CommScope*/EP8 N times (the rare EP8 stall of docs/DESIGN.md)
#   OPENEP_SANITIZER_PROBE=1  the tiny low-latency hook case under compute-sanitizer memcheck, timeouts x10
#   OPENEP_RUN_GPU=1          the single-GPU tests too;  OPENEP_RUN_SOAK=1  the 10,000-operation soak too
#   OPENEP_BUILD_ALL=1        build every target (benchmarks, mgpu tests) instead of the ones run here
#   OPENEP_INTERNODE_BENCH=1  bench/internode_bench.cu on 2 fake nodes of one GPU (loopback sockets: no speed claim)
#   OPENEP_PY_INTERNODE=1     pip install . and tests/python/fakenode_internode.py on 2 fake nodes, the deep_ep alias
#                             (python/deep_ep_alias: install, import deep_ep with torch) and pytest tests/python
#                             and the engine call patterns (tests/python/engines/*_pattern.py) on 2 fake nodes
#   OPENEP_VRANK_ALSO=REGEX   other virtual-rank CTest tests too (e.g. 'vrank_(intranode|runtime|overlap)')
# Logs go to $OUT (default internode_check_out); the summary is printed last.
#   OUT=<dir> OPENEP_COMMIT=<sha> bash tools/internode_gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-internode_check_out}; B=${BUILD_DIR:-build}; mkdir -p "$OUT"
declare -a names results
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? outcome=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then outcome="TIMED OUT after $limit s"; elif [ $rc -ne 0 ]; then outcome="FAILED (rc $rc)"; fi
  names+=("$name"); results+=("$outcome ($((SECONDS - t0)) s)")
  echo "== $name: $outcome ($((SECONDS - t0)) s)"; grep -E "FAILED|Failure|error:|Timeout|timed out" "$OUT/$name.log" | head -8
}
if [ "${OPENEP_SKIP_BUILD:-0}" != 1 ]; then
  step configure 120 cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DOPENEP_BUILD_PYTHON=OFF
  if [ "${OPENEP_BUILD_ALL:-0}" = 1 ]; then step build 400 cmake --build "$B" -j "$(nproc)"
  else step build 400 cmake --build "$B" -j "$(nproc)" --target openep_cpu_tests openep_vrank_tests openep_fake_node_tests \
    openep_gpu_tests openep_internode_bench; fi
fi
step cpu_tests 120 ctest --test-dir "$B" -L cpu --output-on-failure
[ "${OPENEP_RUN_GPU:-0}" = 1 ] && step gpu_tests 200 ctest --test-dir "$B" -L '^gpu$' --output-on-failure
step vrank_internode "${OPENEP_INTERNODE_LIMIT:-300}" ctest --test-dir "$B" -R vrank_internode --output-on-failure -V
step fake_nodes 300 ctest --test-dir "$B" -R 'fake_node_(2x1|4x1)' --output-on-failure -V
cp -r "$B/fake_node_logs" "$OUT/" 2>/dev/null
if [ "${OPENEP_REPEAT_OVERLAP:-0}" -gt 0 ]; then
  step overlap_ep8_repeat 240 "$B/tests/openep_vrank_tests" --gtest_filter='OverlapVrank.CommScope*/EP8' \
    --gtest_repeat="$OPENEP_REPEAT_OVERLAP"
fi
[ -n "${OPENEP_VRANK_ALSO:-}" ] && step vrank_also 400 ctest --test-dir "$B" -R "$OPENEP_VRANK_ALSO" --output-on-failure -V
[ "${OPENEP_RUN_SOAK:-0}" = 1 ] && step soak 300 ctest --test-dir "$B" -L soak -V
[ "${OPENEP_INTERNODE_BENCH:-0}" = 1 ] && step internode_bench 300 python3 tools/launch.py --nproc 2 --ranks-per-node 1 \
  --min-gpus 1 --timeout 280 --log-dir "$OUT/bench_logs" -- "$B/bench/openep_internode_bench" \
  --commit "${OPENEP_COMMIT:-unknown}" --results "$OUT/internode_results.jsonl"
if [ "${OPENEP_PY_INTERNODE:-0}" = 1 ]; then
  step pip_install 400 python3 -m pip install . --no-build-isolation --no-deps
  step python_internode 300 python3 tools/launch.py --nproc 2 --ranks-per-node 1 --min-gpus 1 --timeout 280 \
    --log-dir "$OUT/py_internode_logs" -- python3 tests/python/fakenode_internode.py
  step deep_ep_alias 200 bash -c 'python3 -m pip install ./python/deep_ep_alias --no-build-isolation --no-deps --no-index &&
    python3 -c "import openep, deep_ep, deep_ep.buffer, deep_ep.utils, deep_ep_cpp, torch
from deep_ep import Buffer, EventOverlap, Config
from deep_ep.utils import EventHandle
assert deep_ep.Buffer is openep.Buffer and deep_ep.buffer.Buffer is openep.Buffer and Config is openep.Config
assert deep_ep.topk_idx_t == torch.int64
print(\"import deep_ep: ok\", deep_ep.Buffer)"'
  for engine in megatron sglang vllm; do  # normal mode as internode mode; their decode parts report SKIPPED
    step "engine_${engine}_fake_nodes" 300 python3 tools/launch.py --nproc 2 --ranks-per-node 1 --min-gpus 1 \
      --timeout 280 --log-dir "$OUT/engine_${engine}_logs" -- python3 "tests/python/engines/${engine}_pattern.py"
  done
  step pytest 600 python3 -m pytest -rs -p no:cacheprovider tests/python
  python3 -m pip uninstall -y openep-deep-ep-alias >/dev/null 2>&1
fi
if [ "${OPENEP_SANITIZER_PROBE:-0}" = 1 ]; then
  OPENEP_TEST_TIMEOUT_SCALE=10 step sanitizer_hook_probe 200 compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$B/tests/openep_vrank_tests" --gtest_filter='LowLatencyVrank.HookModeAndZeroCopy/tokens33*/EP4'
fi
echo
echo "================ internode GPU check: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), commit ${OPENEP_COMMIT:-?} ================"
for i in "${!names[@]}"; do printf "%-22s %s\n" "${names[$i]}" "${results[$i]}"; done
for f in cpu_tests gpu_tests vrank_internode vrank_also fake_nodes soak; do
  [ -f "$OUT/$f.log" ] && grep -hE "tests passed|tests failed" "$OUT/$f.log" | sed "s/^/$f: /"
done
[ -f "$OUT/soak.log" ] && grep -E "^soak:|SoakVrank.*OK|mismatch" "$OUT/soak.log" | tail -4
grep -hE "^\[  PASSED  \]|^\[  FAILED  \]" "$OUT"/vrank_internode.log 2>/dev/null | sort | uniq -c | head
[ -f "$OUT/overlap_ep8_repeat.log" ] && { echo -n "overlap EP8 repeat: "; grep -c "^\[       OK \]" "$OUT/overlap_ep8_repeat.log" | tr -d '\n'; echo -n " ok, "; grep -c "^\[  FAILED  \] OverlapVrank" "$OUT/overlap_ep8_repeat.log"; }
[ -f "$OUT/internode_results.jsonl" ] && cat "$OUT/internode_results.jsonl"
[ -f "$OUT/deep_ep_alias.log" ] && grep -E "import deep_ep|Error" "$OUT/deep_ep_alias.log" | head -3
for engine in megatron sglang vllm; do
  cat "$OUT/engine_${engine}_logs"/rank*.log 2>/dev/null | grep -E "pattern on .*(ok|FAILED) \(|SKIPPED" | sort -u
done
[ -f "$OUT/pytest.log" ] && tail -n 1 "$OUT/pytest.log"
[ -f "$OUT/sanitizer_hook_probe.log" ] && grep -E "ERROR SUMMARY|OK \]|FAILED" "$OUT/sanitizer_hook_probe.log" | head -4
exit 0
