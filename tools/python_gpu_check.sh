#!/usr/bin/env bash
# GPU check of the Python package on a lent 2-GPU machine: `pip install .` (no build isolation, no index: the
# machine's nanobind, scikit-build-core, torch and NCCL wheel), then the Python tests (CPU and 2-GPU parts).
#   OUT=<dir> bash tools/python_gpu_check.sh [pytest -k expression, e.g. low_latency]
# Logs go to $OUT (default ./python_gpu_check_out); the summary is printed last. A skipped GPU test is listed
# with its reason (-rs) and is not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-python_gpu_check_out}
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/gpus.txt"
python3 -c "import torch, nanobind, scikit_build_core; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'nanobind', nanobind.__version__, 'scikit-build-core', scikit_build_core.__version__)" | tee "$OUT/versions.txt"
t0=$SECONDS
if ! python3 -m pip install -v . --no-build-isolation --no-deps --no-index >"$OUT/pip_install.log" 2>&1; then
  grep -E "error|Error" -A3 "$OUT/pip_install.log" | head -60
  echo "== pip install FAILED ($((SECONDS - t0)) s)"
  exit 1
fi
echo "== pip install ok ($((SECONDS - t0)) s)"
python3 -c "import openep; print('openep NCCL compiled', openep.compiled_nccl_version(), 'loaded', openep.loaded_nccl_version())" \
  | tee -a "$OUT/versions.txt"
t0=$SECONDS
args=(-v -rs -p no:cacheprovider tests/python)
[ $# -gt 0 ] && args+=(-k "$1")
python3 -m pytest "${args[@]}" >"$OUT/pytest.log" 2>&1
rc=$?
echo "== pytest rc $rc ($((SECONDS - t0)) s)"
grep -E "(PASSED|FAILED|ERROR|SKIPPED)" "$OUT/pytest.log" | grep -E "test_gpu|FAILED|ERROR" | head -60
grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/pytest.log" | head -40
tail -n 1 "$OUT/pytest.log"
exit $rc
