#!/usr/bin/env bash
# Builds OpenEP and runs its test suite: CPU tests everywhere; GPU and multi-GPU tests where GPUs exist
# (without GPUs CTest reports them as "Skipped", never as passed).
#   bash tools/run_tests.sh            # build in ./build, run everything CTest knows
# Environment: BUILD_DIR (default build), JOBS (default: all cores), CTEST_ARGS (extra ctest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release >"$BUILD_DIR.configure.log" 2>&1 || { cat "$BUILD_DIR.configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j "$JOBS"
cd "$BUILD_DIR"
ctest --output-on-failure ${CTEST_ARGS:-}
