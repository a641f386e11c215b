#!/usr/bin/env bash
# The GPU checks of the MoE hot path, in one run of under 8 minutes on one CUDA GPU:
#   1. the GPU tests: no host synchronisation in a padded layer call
#      (torch.cuda.set_sync_debug_mode("error")), exactly one in a dropless call (its one read),
#      the compiled padded layer, grouped_mm against the per-block loop, fused AdamW from state
#      made before the first step (tests/test_gpu_hot_path.py,
#      tests/test_grouped_mm_path.py);
#   2. grouped_mm against the loop, timed (bench/gpu_checks.py kernels);
#   3. the layer against its floor at the GPU's GEMM rate (bench/layer.py --device cuda);
#   4. the all-to-all overlap, 2 processes on the GPU, then a padded layer at ep 2 whose calls
#      after the first never synchronise (bench/gpu_checks.py overlap).
#
#   bench/gpu_check.sh            # on a machine with a CUDA GPU
#   bench/gpu_check.sh --dry-run  # anywhere: checks this script and runs its parts on the CPU at
#                                 # tiny shapes; the GPU-only parts say they were skipped
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
bash -n "$0"  # this script's own syntax
"$PY" -m py_compile bench/gpu_checks.py bench/layer.py tests/test_gpu_hot_path.py
if [[ $DRY == 0 ]] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "bench/gpu_check.sh: no CUDA GPU visible; run bench/gpu_check.sh --dry-run on a CPU" >&2
  exit 2
fi
lscpu | grep -m1 "Model name" || true
"$PY" -c 'import torch; print("torch", torch.__version__, "|",
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)")'
START=$SECONDS

gpu_checks() {  # bench/gpu_checks.py CHECK: on the GPU, or tiny on the CPU in a dry run
  if [[ $DRY == 1 ]]; then
    OMP_NUM_THREADS=1 timeout 120 "$PY" bench/gpu_checks.py "$1" --dry-run --repeats 1
  else
    timeout 120 "$PY" bench/gpu_checks.py "$1" --repeats 7
  fi
}

echo "== 1/4 GPU tests"
if [[ $DRY == 1 ]]; then
  # Without a GPU every test of the file skips, naming why: the run shows the reasons.
  OMP_NUM_THREADS=1 timeout 120 "$PY" -m pytest -q -rs tests/test_gpu_hot_path.py \
    "tests/test_grouped_mm_path.py::test_grouped_mm_equals_the_loop_on_the_gpu"
else
  timeout 240 "$PY" -m pytest -q -rs tests/test_gpu_hot_path.py \
    "tests/test_grouped_mm_path.py::test_grouped_mm_equals_the_loop_on_the_gpu"
fi

echo "== 2/4 grouped_mm against the per-block loop"
gpu_checks kernels

echo "== 3/4 the layer against its floor at the GPU's GEMM rate"
if [[ $DRY == 1 ]]; then
  echo "skipped (dry run): bench/layer.py --device cuda needs a GPU (bench/layer.py benches the CPU)"
else
  timeout 150 "$PY" bench/layer.py --device cuda --repeats 5
fi

echo "== 4/4 all-to-all overlap, 2 processes on one device"
gpu_checks overlap
echo "bench/gpu_check.sh: done in $((SECONDS - START)) s$([[ $DRY == 1 ]] && echo ' (dry run)')"
