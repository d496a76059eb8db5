#!/usr/bin/env bash
# Diagnose a fake-node world under the loopback GIN plugin that does not finish. Runs CMD through
#   tools/launch.py --nproc NPROC --ranks-per-node 1 --gin-loopback <plugin>
# with NCCL's INFO log (NCCL_DEBUG_SUBSYS, default INIT,NET) and the plugin's own debug lines in every rank's log;
# if the world still runs after DUMP_AFTER seconds, prints the host stacks of every rank process (gdb, else
# cuda-gdb) to $OUT/<name>/stacks.<pid>.txt, then leaves the end to launch.py's --timeout (TIMEOUT).
#   OUT=<dir> [NPROC=2] [DUMP_AFTER=45] [TIMEOUT=75] [BUILD_DIR=build] bash tools/gin_probe.sh NAME -- CMD [ARGS...]
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
name=$1; shift
[ "${1:-}" = -- ] && shift
B=${BUILD_DIR:-build}; OUT=${OUT:-gin_probe_out}; NPROC=${NPROC:-2}
DUMP_AFTER=${DUMP_AFTER:-45}; TIMEOUT=${TIMEOUT:-75}
log="$OUT/$name"; mkdir -p "$log"
NCCL_DEBUG=${NCCL_DEBUG:-INFO} NCCL_DEBUG_SUBSYS=${NCCL_DEBUG_SUBSYS:-INIT,NET} OPENEP_GIN_LB_DEBUG=1 \
  python3 tools/launch.py --nproc "$NPROC" --ranks-per-node 1 --min-gpus 1 --timeout "$TIMEOUT" --quiet \
  --gin-loopback "$B/tests/gin_loopback/libopenep_gin_loopback.so" --log-dir "$log" -- "$@" >"$log/launch.txt" 2>&1 &
lp=$!
t0=$SECONDS
while kill -0 "$lp" 2>/dev/null && [ $((SECONDS - t0)) -lt "$DUMP_AFTER" ]; do sleep 1; done
if kill -0 "$lp" 2>/dev/null; then
  dbg=$(command -v gdb || command -v cuda-gdb || ls /usr/local/cuda/bin/cuda-gdb 2>/dev/null || true)
  echo "gin_probe $name: still running after $DUMP_AFTER s; stacks with ${dbg:-no debugger found}"
  for pid in $(pgrep -P "$lp"); do
    [ -n "$dbg" ] && timeout 90 "$dbg" -p "$pid" -batch -ex "thread apply all bt 25" >"$log/stacks.$pid.txt" 2>&1
    grep -E "^#[0-9]+ .* in (openep|ncclDevComm|ncclComm|ncclGin|gin|ncclMem|cuda|std::this_thread)" "$log/stacks.$pid.txt" 2>/dev/null |
      head -12 | sed "s/^/  pid $pid: /"
  done
fi
wait "$lp"; rc=$?
echo "gin_probe $name: launch.py rc $rc after $((SECONDS - t0)) s"
for f in "$log"/rank*.log; do
  echo "--- $f (last lines)"; grep -vE "NCCL INFO (Channel|Connected|P2P|NVLS|Trees|[0-9]+ coll)" "$f" | tail -n 12
done
