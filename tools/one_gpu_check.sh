#!/usr/bin/env bash
# Everything one GPU can check, in two device calls of under 10 minutes each (a lent machine allows 10 minutes a
# command; it goes back 30 s after a call, so issue part 2 right after part 1 returns and the build is still there).
# Steps of one part run side by side on the one GPU (fake-node worlds and the Python checks next to the virtual-rank
# suites: they wait on sockets and the host most of the time). Logs go to $OUT/<part>/..., packed into
# $OUT/logs<part>.tgz (one file comes back, not hundreds); the summary is printed last.
#   OUT=<dir> OPENEP_COMMIT=<sha> bash tools/one_gpu_check.sh 1     build, cpu, gpu; then together: the GIN and
#                                                                    recovery fake-node worlds and the 2x1 ones, vrank
#                                                                    runtime / internode / low latency EP2-4, Python
#                                                                    (pytest subset, then fakenode_internode.py)
#   OUT=<dir> OPENEP_COMMIT=<sha> bash tools/one_gpu_check.sh 2     together: vrank fabric / intranode / overlap /
#                                                                    low latency EP8-16, the soak, the 4x1 fake-node
#                                                                    worlds; then memcheck on 2 fake nodes (sockets
#                                                                    rail; low latency and internode over GIN)
# OPENEP_LAUNCH_TIMEOUT_CAP (default 300) caps each fake-node world (the GIN worlds of the multi-GPU binary take
# an estimated ~150 s with 2 nodes and ~300 s with 4 under the loopback plugin, from the pieces timed on 2026-12-02:
# every case is a new Buffer over slow sockets).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
part=${1:?usage: one_gpu_check.sh 1|2}
OUT=${OUT:-one_gpu_check_out}
commit=${OPENEP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export OPENEP_LAUNCH_TIMEOUT_CAP=${OPENEP_LAUNCH_TIMEOUT_CAP:-300}
P="$OUT/part$part"
mkdir -p "$P"
check() {  # check NAME SECONDS STEPS [VAR=VALUE...]: tools/gpu_check.sh with those steps, into $P/NAME
  local name=$1 limit=$2 steps=$3
  shift 3
  env "$@" OUT="$P/$name" OPENEP_COMMIT="$commit" OPENEP_STEPS="$steps" timeout --kill-after=10 "$limit" \
    bash tools/gpu_check.sh >"$P/$name.txt" 2>&1
  echo "$name: rc $?" >>"$P/rc.txt"
}
t0=$SECONDS
if [ "$part" = 1 ]; then
  check build 240 build,cpu,gpu
  check fakenode 520 fakenode OPENEP_FAKENODE_LIMIT=500 \
    OPENEP_FAKENODE_REGEX='fake_node_(2x1|mgpu_internode_2x1|gin_2x1|gin_mgpu_2x1|recovery_4x1)$' &
  check vrank 520 vrank OPENEP_VRANK_LIMIT=500 OPENEP_VRANK_REGEX='runtime|internode|low_latency_ep(2|4)$' &
  (OUT="$P/python" timeout --kill-after=10 300 bash tools/python_gpu_check.sh "fake_nodes or without_weights or tools" \
     >"$P/python.txt" 2>&1; echo "python: rc $?" >>"$P/rc.txt"
   # DeepEP-style internode code from Python (layout, dispatch, combine, cached dispatch) on 2 fake nodes
   timeout --kill-after=10 200 python3 tools/launch.py --nproc 2 --ranks-per-node 1 --min-gpus 1 --timeout 180 \
     --log-dir "$P/py_internode_logs" -- python3 tests/python/fakenode_internode.py >"$P/py_internode.txt" 2>&1
   echo "py_internode: rc $?" >>"$P/rc.txt") &
  wait
elif [ "$part" = 2 ]; then
  check vrank 540 vrank OPENEP_VRANK_LIMIT=520 OPENEP_VRANK_REGEX='fabric|intranode|overlap|low_latency_ep(8|16)$' &
  check soak 400 soak &
  check fakenode 480 fakenode OPENEP_FAKENODE_LIMIT=460 \
    OPENEP_FAKENODE_REGEX='fake_node_(4x1|mgpu_internode_4x1|gin_4x1)$' &
  check fakenode_gin 480 fakenode OPENEP_FAKENODE_LIMIT=460 OPENEP_FAKENODE_REGEX='fake_node_gin_mgpu_4x1$' &
  wait
  if [ $((SECONDS - t0)) -lt 470 ]; then  # memcheck with every rank its own process (tools/sanitizer_check.sh)
    OUT="$P/sanitizer" OPENEP_COMMIT="$commit" OPENEP_SANITIZER_SUITES="fake_nodes fake_nodes_gin" \
      OPENEP_SANITIZER_LIMIT=60 timeout --kill-after=10 120 bash tools/sanitizer_check.sh >"$P/sanitizer.txt" 2>&1
    echo "sanitizer: rc $?" >>"$P/rc.txt"
  fi
else
  echo "one_gpu_check.sh: part must be 1 or 2, got $part" >&2
  exit 2
fi
cp -r build/fake_node_logs "$P/" 2>/dev/null
tar czf "$OUT/logs$part.tgz" -C "$OUT" "part$part" 2>/dev/null
echo
echo "================ one_gpu_check part $part: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), commit $commit, $((SECONDS - t0)) s ================"
cat "$P/rc.txt"
for f in "$P"/*.txt; do
  case "$f" in */rc.txt) continue ;; esac
  echo "--- $(basename "$f" .txt)"
  sed -n '/================ OpenEP GPU check/,$p' "$f" | grep -vE "^step |^={5,}" | head -30
done
grep -hE "== pip install|== pytest|passed|failed" "$P/python.txt" 2>/dev/null | tail -4
sed -n '/================ sanitizer check/,$p' "$P/sanitizer.txt" 2>/dev/null
exit 0
