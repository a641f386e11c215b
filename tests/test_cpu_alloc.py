"""The layer's CPU allocator setting: the first CPU forward keeps freed memory in glibc's heap (no
page faults when a step's large buffers come back), and `MOEFLOW_CPU_ALLOC=system` leaves glibc
alone. Each case runs in a fresh process (the setting is process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import resource, torch
from moeflow import MoEConfig, MoELayer
from moeflow.utils import cpu_alloc
MoELayer(MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=8))(torch.randn(4, 8))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(40 << 20, dtype=torch.uint8)  # 40 MB, above glibc's largest mmap threshold
before = faults()
for _ in range(5):
    torch.ones(40 << 20, dtype=torch.uint8)
print(cpu_alloc._applied, faults() - before)
"""


def probe(env: dict) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    applied, faults = done.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_first_forward_keeps_freed_memory_unless_told_not_to():
    env = {k: v for k, v in os.environ.items() if k != "MOEFLOW_CPU_ALLOC"}
    applied, faults = probe({**env, "MOEFLOW_CPU_ALLOC": ""})
    # 40 MB are 10,240 pages: kept in the heap, at most the first of the five faults them in
    assert applied == "True" and faults < 12_000, faults
    applied, faults = probe({"MOEFLOW_CPU_ALLOC": "system"})
    assert applied == "False" and faults > 45_000, faults  # mmapped and faulted every time
