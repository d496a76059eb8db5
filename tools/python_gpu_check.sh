#!/usr/bin/env bash
# GPU check of the Python package on a lent 2-GPU machine: `pip install .` (no build isolation, no index: the
# machine's nanobind, scikit-build-core, torch and NCCL wheel), then `pip install ./python/deep_ep_alias` (the engine
# call-pattern tests import deep_ep), then the Python tests (CPU and 2-GPU parts, the engine patterns of
# tests/python/test_engine_patterns.py on 2 GPUs and on 2 fake nodes included), then an `import deep_ep` probe; the
# alias is uninstalled again afterwards.
#   OUT=<dir> bash tools/python_gpu_check.sh [pytest -k expression, e.g. low_latency]
# With OPENEP_PYTEST_SHARE_GPU=1 the two-rank tests run as processes sharing the GPU(s) (IPC test fabric), so one
# GPU runs them all (docs/PYTHON.md "Processes sharing a GPU").
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
if python3 -m pip install -v ./python/deep_ep_alias --no-build-isolation --no-deps --no-index \
     >"$OUT/alias_install.log" 2>&1; then alias_ok=1; echo "== pip install ./python/deep_ep_alias ok"
else alias_ok=0; echo "== pip install ./python/deep_ep_alias FAILED (the engine-pattern tests will fail)"; fi
t0=$SECONDS
args=(-v -rs -p no:cacheprovider tests/python)
[ $# -gt 0 ] && args+=(-k "$1")
python3 -m pytest "${args[@]}" >"$OUT/pytest.log" 2>&1
rc=$?
echo "== pytest rc $rc ($((SECONDS - t0)) s)"
grep -E "(PASSED|FAILED|ERROR|SKIPPED)" "$OUT/pytest.log" | grep -E "test_gpu|test_engine_pattern_on|FAILED|ERROR" | head -70
grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/pytest.log" | head -40
tail -n 1 "$OUT/pytest.log"
# The documented step that makes `import deep_ep` give OpenEP (python/deep_ep_alias), checked in this Python (with
# torch) from outside the repository, then undone so that the environment is left as it was.
probe="import deep_ep, deep_ep_cpp, openep, torch
from deep_ep import Buffer, EventOverlap, Config
from deep_ep.utils import EventHandle
import deep_ep.buffer
assert Buffer is openep.Buffer is deep_ep.buffer.Buffer and EventOverlap is openep.EventOverlap
assert Config is openep.Config is deep_ep_cpp.Config and EventHandle is openep.EventHandle is deep_ep_cpp.EventHandle
assert deep_ep.topk_idx_t is torch.int64 is deep_ep_cpp.topk_idx_t
print('import deep_ep: OpenEP', deep_ep.__openep_version__, deep_ep.__file__)"
if [ "$alias_ok" = 1 ] &&
   (cd "$OUT" && python3 -W error::RuntimeWarning -c "$probe") 2>&1 | tee -a "$OUT/versions.txt"; then
  echo "== import deep_ep after pip install ./python/deep_ep_alias: ok"
else
  echo "== import deep_ep after pip install ./python/deep_ep_alias: FAILED (see $OUT/alias_install.log)"
  [ $rc -eq 0 ] && rc=1
fi
python3 -m pip uninstall -y openep-deep-ep-alias >/dev/null 2>&1
exit $rc
