#!/usr/bin/env bash
# One-call GPU check for a lent GPU machine: configure and build with all cores, then the test steps, then a
# short summary table (printed last). Every step has a time limit and logs to $OUT/<step>.log.
#   OPENEP_COMMIT=<sha> OUT=<dir> [OPENEP_STEPS=...] [OPENEP_PIP_CHECK=1] bash tools/gpu_check.sh [openep_bench args...]
# Steps (OPENEP_STEPS, comma-separated; default: all of them except sanitizer):
#   build      configure + build (incremental when the build folder is already there)
#   cpu        CPU tests (label cpu)
#   gpu        single-GPU tests (label gpu)
#   vrank      virtual-rank suites on ONE GPU: runtime, intranode, overlap/graph at EP2/4/8, low latency at
#              EP2/4/8/16, the fabric itself (label vrank, without the soak)
#   soak       the randomized virtual-rank soak (>= 10,000 operations against the reference)
#   fakenode   fake NCCL nodes: 2x1 and 4x1 on one GPU, 2x2 with 2+ GPUs (label fakenode)
#   mgpu       one process per GPU (needs 2+ GPUs; skipped otherwise)
#   ipc        processes sharing the GPU(s) through the IPC test fabric: every multi-rank suite on 2 and 4 processes
#              and the tests that SIGKILL a rank (label ipc)
#   probe      the two-GPU NVLink copy probe (needs 2+ GPUs and its source at OPENEP_P2P_PROBE, default
#              .deps/probe/copy_probe_p2p.cu: copy ../shared/tools/copy_probe_p2p.cu there and carry it), one
#              time-limited run per variant family, so a family that hangs is recorded and the others still run
#   sanitizer  compute-sanitizer racecheck and memcheck over virtual-rank tests at EP4 (OPENEP_SANITIZER_FILTER)
#   bench      the benchmark (needs 2+ GPUs; with --pool: window-backed dispatch outputs timed too, rows "openep-pool")
# OPENEP_PIP_CHECK=1 also runs `pip install .` and the Python tests.
# Subsets (a session splitting the check over several device calls): OPENEP_VRANK_REGEX / OPENEP_FAKENODE_REGEX
# (ctest -R of the vrank / fakenode steps), OPENEP_VRANK_LIMIT / OPENEP_FAKENODE_LIMIT (their time limits, s),
# OPENEP_LAUNCH_TIMEOUT_CAP (tools/launch.py: caps each fake-node world's own timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
BUILD_DIR=${BUILD_DIR:-build}
STEPS=",${OPENEP_STEPS:-build,cpu,gpu,vrank,soak,fakenode,mgpu,ipc,probe,bench},"
commit=${OPENEP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
declare -a names results
want() { [[ "$STEPS" == *",$1,"* ]]; }
step() {  # step NAME SECONDS COMMAND...: runs under a time limit, logs to $OUT/NAME.log, records the outcome
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local outcome="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then outcome="TIMED OUT after $limit s"
  elif [ $rc -ne 0 ]; then outcome="FAILED (rc $rc)"; fi
  if [ $rc -eq 0 ] && grep -q "0 tests failed" "$OUT/$name.log" 2>/dev/null && grep -q "(Skipped)" "$OUT/$name.log" &&
     ! grep -qE "Test +#[0-9]+: .* Passed" "$OUT/$name.log"; then outcome="SKIPPED"; fi
  names+=("$name"); results+=("$outcome ($((SECONDS - t0)) s)")
  echo "== $name: $outcome ($((SECONDS - t0)) s)"; tail -n 15 "$OUT/$name.log"
  return $rc
}
nvidia-smi -L | tee "$OUT/gpus.txt"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
num_gpus=$(nvidia-smi -L | grep -c '^GPU ')
if want build; then
  step configure 120 cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release
  step build 900 cmake --build "$BUILD_DIR" -j "$(nproc)"
fi
want cpu && step cpu_tests 120 ctest --test-dir "$BUILD_DIR" -L cpu --output-on-failure
want gpu && step gpu_tests 300 ctest --test-dir "$BUILD_DIR" -L '^gpu$' -V
want vrank && step vrank_tests "${OPENEP_VRANK_LIMIT:-1500}" ctest --test-dir "$BUILD_DIR" -L vrank -LE soak \
  -R "${OPENEP_VRANK_REGEX:-.}" -V
want soak && step soak 900 ctest --test-dir "$BUILD_DIR" -L soak -V
want fakenode && { step fake_node_tests "${OPENEP_FAKENODE_LIMIT:-1500}" ctest --test-dir "$BUILD_DIR" -L fakenode \
  -R "${OPENEP_FAKENODE_REGEX:-.}" -V;
                   cp -r "$BUILD_DIR/fake_node_logs" "$OUT/" 2>/dev/null; }
want mgpu && { step mgpu_tests 700 ctest --test-dir "$BUILD_DIR" -L mgpu -V; cp -r "$BUILD_DIR/mgpu_logs" "$OUT/" 2>/dev/null; }
want ipc && { step ipc_tests "${OPENEP_IPC_LIMIT:-900}" ctest --test-dir "$BUILD_DIR" -L ipc -V;
              cp -r "$BUILD_DIR/ipc_logs" "$OUT/" 2>/dev/null; }
probe_src=${OPENEP_P2P_PROBE:-.deps/probe/copy_probe_p2p.cu}
if want probe && [ "$num_gpus" -ge 2 ] && [ -f "$probe_src" ]; then
  step probe_build 180 nvcc -O3 -std=c++17 -arch=sm_90a -o "$BUILD_DIR/copy_probe_p2p" "$probe_src" -lcuda
  for fam in push_ pull_ bidir_push ce_ ep2_ p2p_; do  # p2p_ last: its single-GPU twin's flag round trip hung
    step "probe_$fam" "${OPENEP_PROBE_LIMIT:-120}" "$BUILD_DIR/copy_probe_p2p" --reps 20 --only "$fam"
  done
elif want probe; then
  echo "== probe: not run (needs 2+ GPUs and $probe_src; found $num_gpus GPU(s))"
fi
if want sanitizer; then
  # EP4 virtual ranks under the sanitizer. Waits stay bounded (timeout_seconds), so a tool that serialised the
  # ranks' kernels would show as timeout errors, not as a hang.
  filter=${OPENEP_SANITIZER_FILTER:-'IntranodeVrank.MatchesReference/tokens127*/EP4:IntranodeVrank.MatchesReference/tokens300*/EP4:IntranodeVrank.MatchesReference/tokens513*/EP4:LowLatencyVrank.MatchesReference/tokens128_T128_hidden2048*/EP4:LowLatencyVrank.HookModeAndZeroCopy/tokens64*/EP4:LowLatencyVrank.HookModeAndZeroCopy/tokens33*/EP4'}
  for tool in racecheck memcheck; do
    step "sanitizer_$tool" 600 compute-sanitizer --tool "$tool" --error-exitcode 3 \
      "$BUILD_DIR/tests/openep_vrank_tests" "--gtest_filter=$filter"
  done
fi
if [ "${OPENEP_PIP_CHECK:-0}" = 1 ]; then
  step pip_install 900 python3 -m pip install -v . --no-build-isolation --no-deps --no-index
  step python_tests 900 python3 -m pytest -v -rs tests/python
fi
want bench && step bench 450 python3 tools/launch.py --min-gpus 2 --timeout 400 --log-dir "$OUT/bench_logs" -- \
  "$BUILD_DIR/bench/openep_bench" --commit "$commit" --results "$OUT/results.jsonl" --pool "$@"
# The SM sweep as a PNG next to the JSON lines (tools/plot_bench.py; matplotlib is on the GPU machines' image).
want bench && [ -s "$OUT/results.jsonl" ] && step plot 60 python3 tools/plot_bench.py "$OUT/results.jsonl" --commit "$commit"
echo
echo "================ OpenEP GPU check: $num_gpus x $card, commit $commit ================"
for f in cpu_tests gpu_tests vrank_tests soak fake_node_tests mgpu_tests ipc_tests; do
  [ -f "$OUT/$f.log" ] && grep -E "tests passed|tests failed" "$OUT/$f.log" | sed "s/^/$f: /"
done
for f in vrank_tests fake_node_tests; do
  # Lines of `ctest -V` carry a "NN: " prefix; count the gtest cases themselves.
  [ -f "$OUT/$f.log" ] && awk -v f=$f '/\[       OK \]/{p++} /\[  FAILED  \] .* \([0-9]+ ms\)/{x++} END{printf "%s: gtest cases ok %d, failed %d\n", f, p, x}' \
    "$OUT/$f.log"
done
[ -f "$OUT/soak.log" ] && grep -E "^soak:" "$OUT/soak.log" | tail -12
for t in racecheck memcheck; do
  [ -f "$OUT/sanitizer_$t.log" ] && grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|tests ran|PASSED|FAILED" "$OUT/sanitizer_$t.log" |
    tail -4 | sed "s/^/sanitizer $t: /"
done
# gtest cases that skipped inside a passing CTest test (e.g. the multi-node GIN test on one node): named here
skipped=$(cat "$OUT"/gpu_tests.log "$OUT"/vrank_tests.log "$OUT"/mgpu_tests.log "$OUT"/fake_node_tests.log 2>/dev/null |
          grep -oE '\[  SKIPPED \] [A-Za-z0-9_./]+ \(' | sed -E 's/^\[  SKIPPED \] //; s/ \($//' | sort -u | tr '\n' ' ')
[ -n "$skipped" ] && echo "gtest cases skipped (by design or missing hardware): $skipped"
grep -hE "^\[  FAILED  \] [A-Za-z]" "$OUT"/*.log 2>/dev/null | sort -u | head -30
[ -f "$OUT/python_tests.log" ] && grep -E "passed|failed" "$OUT/python_tests.log" | tail -1 | sed "s/^/python_tests: /"
[ -f "$OUT/bench.log" ] && { grep -E "^(layout|dispatch|combine|ll_|op )" "$OUT/bench.log" || true; }
for f in "$OUT"/probe_*.log; do  # the probe's CSV lines (name,sms,bytes,us,GB/s)
  [ -f "$f" ] && [ "$(basename "$f")" != probe_build.log ] && grep -E "^[a-z0-9_]+,[0-9]+," "$f" | head -40
done
printf '%-18s %s\n' "step" "result"
for i in "${!names[@]}"; do printf '%-18s %s\n' "${names[$i]}" "${results[$i]}"; done
