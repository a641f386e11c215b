"""`bench/gpu_check.sh --dry-run` on a CPU: checks its own syntax, runs its parts at tiny shapes,
and says which GPU parts it skipped (the GPU run is the script without `--dry-run`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_on_cpu():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = run.stdout
    for step in ("1/4", "2/4", "3/4", "4/4"):
        assert f"== {step}" in out
    assert "5 skipped" in out and "needs a CUDA GPU" in out  # the GPU tests, with the reason
    assert "skipped (dry run): bench/layer.py --device cuda needs a GPU" in out
    assert out.count("| coarse") == 2 and "serial / overlapped" in out
    assert "(dry run)" in out.splitlines()[-1]


def test_gpu_check_refuses_a_bad_argument_and_a_missing_gpu():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    bad = subprocess.run(["bash", "bench/gpu_check.sh", "--fast"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "usage: bench/gpu_check.sh [--dry-run]" in bad.stderr
    no_gpu = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert no_gpu.returncode == 2 and "no CUDA GPU visible" in no_gpu.stderr
