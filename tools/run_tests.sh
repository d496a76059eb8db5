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
# The Python package (openep) and its tests are built too when nanobind and pytest are installed.
PY_ARGS=(-DOPENEP_BUILD_PYTHON=OFF)
if python3 -c "import nanobind, pytest" >/dev/null 2>&1; then
  PY_ARGS=(-DOPENEP_BUILD_PYTHON=ON "-DPython_EXECUTABLE=$(command -v python3)")
else
  echo "run_tests.sh: nanobind/pytest not installed, skipping the Python package (python3 -m pip install nanobind pytest)"
fi
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "${PY_ARGS[@]}" >"$BUILD_DIR.configure.log" 2>&1 || { cat "$BUILD_DIR.configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j "$JOBS"
cd "$BUILD_DIR"
ctest --output-on-failure ${CTEST_ARGS:-}
