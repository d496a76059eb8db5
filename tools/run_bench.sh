#!/usr/bin/env bash
# OpenEP's main job: builds the benchmark and runs it on all local GPUs (one process per GPU).
#   bash tools/run_bench.sh [openep_bench arguments...]     e.g. --tokens 4096 --hidden 7168
# Needs at least 2 GPUs; without them it says so and exits non-zero. Results are printed as a table and
# as JSON lines; pass --results FILE.jsonl to append them to a file (and get the SM sweep plotted next to it,
# FILE_<commit>.png, by tools/plot_bench.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
if [ "${num_gpus:-0}" -lt 2 ]; then
  echo "run_bench.sh: the benchmark needs at least 2 GPUs on this machine; found ${num_gpus:-0}." >&2
  exit 1
fi
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DOPENEP_BUILD_TESTS=OFF >"$BUILD_DIR.configure.log" 2>&1 || { cat "$BUILD_DIR.configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j "$JOBS" --target openep_bench
commit=${OPENEP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
python3 tools/launch.py --min-gpus 2 --timeout 540 --log-dir "$BUILD_DIR/bench_logs" -- \
  "$BUILD_DIR/bench/openep_bench" --commit "$commit" "$@"
# With --results FILE: the SM sweep of this run as a PNG next to FILE (tools/plot_bench.py, needs matplotlib).
results=""
prev=""
for a in "$@"; do [ "$prev" = "--results" ] && results=$a; prev=$a; done
if [ -n "$results" ] && [ -s "$results" ]; then
  python3 tools/plot_bench.py "$results" --commit "$commit" || echo "run_bench.sh: no plot (see above)" >&2
fi
