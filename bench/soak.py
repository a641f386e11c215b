"""Soak: the demo for thousands of steps on 2 ranks, watching each rank's memory and open files.

    .venv/bin/python bench/soak.py                    # 3,000 steps, sampled every 100
    .venv/bin/python bench/soak.py --steps 600 --warmup 200

Runs `moeflow launch --nproc 2 -- train examples/configs/tiny_cpu.toml` (ep=2, 1 thread per rank)
with a checkpoint and a validation every 500 steps (so saving, rotation and evaluation are soaked
too) and samples, from outside the job, every rank's resident memory (`VmRSS`) and open file
descriptors (`/proc/<pid>/fd`) each time `metrics.jsonl` reaches a multiple of `--every` steps.
Prints the samples and the growth from the first sample at or after `--warmup` to the last (the
target: under 5%). Linux only (reads `/proc`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow.launch.local import rank_pids

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.toml"


def sample(pid: int) -> tuple[float, int]:
    """(resident MiB, open file descriptors) of one process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def last_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()[-3:]]
    return max(steps, default=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--warmup", type=int, default=500)
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="moeflow-soak-"))
    cmd = [
        sys.executable, "-m", "moeflow", "launch", "--nproc", "2", "--", "train", str(CONFIG),
        "--train.out_dir", str(out), "--train.steps", str(args.steps),
        "--train.eval_every", "500", "--checkpoint.every", "500", "--checkpoint.keep", "2",
        "--metrics.log_every", str(args.every), "--metrics.progress", "false",
        "--metrics.plot", "false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    samples: dict[int, dict[int, tuple[float, int]]] = {}
    seen = 0
    print(f"{'step':>6}" + "".join(f"{f'rank {r} MiB':>14}{'fds':>6}" for r in range(2)))
    while job.poll() is None:
        step = last_step(out / "metrics.jsonl")
        if step >= seen + args.every and step < args.steps:
            seen = step - step % args.every
            pids = rank_pids(job.pid)
            try:
                samples[seen] = {r: sample(pid) for r, pid in sorted(pids.items())}
            except (OSError, StopIteration):
                continue
            row = "".join(f"{m:>14.1f}{f:>6}" for m, f in samples[seen].values())
            print(f"{seen:>6}{row}", flush=True)
        time.sleep(0.2)
    log = job.stdout.read().decode(errors="replace")
    seconds = time.perf_counter() - started
    if job.returncode != 0:
        print(log[-3000:])
        raise SystemExit(f"the soak run failed (exit {job.returncode})")
    base = min((s for s in samples if s >= args.warmup), default=None)
    last = max(samples, default=None)
    if base is None or last is None or base == last:
        raise SystemExit("too few samples after warm-up; raise --steps")
    print(f"\n{args.steps} steps on 2 ranks in {seconds:.0f} s; growth from step {base} to {last}:")
    for r in sorted(samples[last]):
        (m0, f0), (m1, f1) = samples[base][r], samples[last][r]
        print(f"  rank {r}: RSS {m0:.1f} -> {m1:.1f} MiB ({m1 / m0 - 1:+.1%}), open fds {f0} -> "
              f"{f1} ({f1 - f0:+d})")  # fmt: skip


if __name__ == "__main__":
    main()
