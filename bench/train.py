"""End-to-end training throughput of the demo model (examples/configs/tiny_cpu.toml).

    .venv/bin/python bench/train.py [--steps 30] [--warmup 5] [--repeats 3]

Runs the real trainer step (`Trainer.train_step`: forward, backward, GradSync, clipping, AdamW) on
the embedded corpus in these layouts on this machine: 1 rank with 1 thread, 1 rank with 2 threads,
and 2 ranks with 1 thread each as ep=2 and as dp=2 (ep=1), each with the gradient sync overlapped
with the backward (`parallel.overlap_grad_sync`, the default) and after it; then replicated
against sharded (FSDP2, `parallel.dp_shard`) at 2 ranks (dp 2) and 4 ranks (dp 2 x ep 2, dp 4),
launched by torchrun.
`--compile` instead times the same steps with `train.compile = true` (each block compiled with
inductor; the compile happens in the warm-up steps) against eager, at 1 rank and at 2 ranks
(ep 2), interleaved.
Prints tokens/s (all ranks together, median over interleaved repeats), the scaling against 1 rank
x 1 thread, the step time, and the share of the step spent inside the MoE layers (forward and
backward, timed by module hooks on the slowest rank).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.toml"


class MoETimer:
    """Wall time spent inside every MoELayer, forward and backward (module hooks)."""

    def __init__(self, layers, training_only: bool = False) -> None:
        self.total = 0.0
        self.training_only = training_only  # leave evaluation forwards out
        self._start: dict[int, float] = {}
        for layer in layers:
            layer.register_forward_pre_hook(self._begin)
            layer.register_forward_hook(self._end)
            layer.register_full_backward_pre_hook(self._begin)
            layer.register_full_backward_hook(self._end)

    def _begin(self, module, *args) -> None:
        if module.training or not self.training_only:
            self._start[id(module)] = time.perf_counter()

    def _end(self, module, *args) -> None:
        start = self._start.pop(id(module), None)
        if start is not None:
            self.total += time.perf_counter() - start


def worker(
    steps: int,
    warmup: int,
    out_file: str,
    ep: int | None,
    overlap: bool,
    dp_shard: int,
    compiled: bool = False,
) -> None:
    import torch
    import torch.distributed as dist

    from moeflow.train.config import RunConfig
    from moeflow.train.distributed import init_distributed, shutdown
    from moeflow.train.trainer import Trainer

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    runtime = init_distributed(120)
    world = runtime.world_size
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig.from_toml(
            CONFIG,
            [
                "--parallel.ep",
                str(ep or world),
                "--train.out_dir",
                tmp,
                "--train.steps",
                "100000",
                "--parallel.overlap_grad_sync",
                "true" if overlap else "false",
                "--parallel.dp_shard",
                str(dp_shard),
                "--train.compile",
                "true" if compiled else "false",
            ],
        )
        trainer = Trainer(cfg, runtime, resume=None, overwrite=True)
        timer = MoETimer(trainer.moe_layers)
        acc = trainer.new_metrics()
        for _ in range(warmup):
            trainer.train_step(acc)
        dist.barrier()
        timer.total = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(acc)
        dist.barrier()
        seconds = time.perf_counter() - t0
    t = cfg.train
    tokens = steps * t.micro_batch_size * t.grad_accum_steps * t.seq_len * world
    shares = [None] * world
    dist.all_gather_object(shares, (seconds, timer.total))
    if runtime.rank == 0:
        slowest = max(shares)
        Path(out_file).write_text(
            json.dumps(
                {
                    "tokens_per_s": tokens / slowest[0],
                    "moe_share": slowest[1] / slowest[0],
                    "step_ms": slowest[0] / steps * 1e3,
                }
            )
        )
    shutdown(runtime)


def run_layout(
    ranks: int,
    threads: int,
    ep: int,
    overlap: bool,
    dp_shard: int,
    steps: int,
    warmup: int,
    compiled: bool = False,
) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={ranks}", __file__, "--worker", "--steps", str(steps),
            "--warmup", str(warmup), "--out", out.name, "--ep", str(ep), "--dp-shard",
            str(dp_shard),
            *([] if overlap else ["--no-overlap"]), *(["--compile"] if compiled else []),
        ]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, cwd=ROOT, capture_output=True)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-overlap", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dp-shard", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help="compiled (train.compile) vs eager")
    args = p.parse_args()
    if args.worker:
        worker(args.steps, args.warmup, args.out, args.ep, not args.no_overlap, args.dp_shard,
               args.compile)  # fmt: skip
        return
    if args.compile:
        compare_compile(args.steps, args.warmup, args.repeats)
        return
    # (ranks, threads, ep, overlapped gradient sync, dp_shard)
    layouts = [(1, 1, 1, True, 1), (1, 2, 1, True, 1)]
    layouts += [(2, 1, ep, overlap, 1) for ep in (2, 1) for overlap in (True, False)]
    # Replicated (the CPU default) against sharded, at 2 and 4 ranks.
    layouts += [(2, 1, 1, True, 2), (4, 1, 2, True, 1), (4, 1, 2, True, 2)]
    layouts += [(4, 1, 1, True, 1), (4, 1, 1, True, 4)]
    results: dict[tuple, list[dict]] = {layout: [] for layout in layouts}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every layout
        for layout in layouts:
            results[layout].append(run_layout(*layout, args.steps, args.warmup))
    print(
        f"moeflow bench/train.py: {CONFIG.name} (dim 128, 2 MoE layers x 8 experts, top-2, "
        f"8 x 128 tokens per rank per step), {args.steps} steps after {args.warmup} "
        f"warm-up, median of {args.repeats}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, fp32, gloo"
    )
    print(
        "| ranks x threads | layout | state | grad sync | tokens/s | vs 1x1 | vs replicated | "
        "step ms | MoE share |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = statistics.median(r["tokens_per_s"] for r in results[layouts[0]])
    for (ranks, threads, ep, overlap, shard), runs in results.items():
        tok = statistics.median(r["tokens_per_s"] for r in runs)
        ms = statistics.median(r["step_ms"] for r in runs)
        share = statistics.median(r["moe_share"] for r in runs)
        layout = f"dp{ranks // ep} x ep{ep}"
        state = f"sharded (dp_shard {shard})" if shard > 1 else "replicated"
        sync = "-" if ranks == 1 else ("overlapped" if overlap else "after backward")
        if shard > 1:
            sync = "FSDP reduce-scatter"
        replicated = results.get((ranks, threads, ep, overlap, 1))
        ratio = tok / statistics.median(r["tokens_per_s"] for r in replicated) if shard > 1 else 1
        print(
            f"| {ranks} x {threads} | {layout} | {state} | {sync} | {tok:,.0f} | "
            f"{tok / base:.2f} | {ratio:.2f} | {ms:.1f} | {share:.0%} |"
        )


def compare_compile(steps: int, warmup: int, repeats: int) -> None:
    """`train.compile = true` against eager, interleaved, at 1 rank x 1 thread and at ep 2."""
    layouts = [(1, 1, 1), (2, 1, 2)]
    runs: dict[tuple, list[dict]] = {(*lay, c): [] for lay in layouts for c in (False, True)}
    for _ in range(repeats):
        for ranks, threads, ep, compiled in runs:
            runs[(ranks, threads, ep, compiled)].append(
                run_layout(ranks, threads, ep, True, 1, steps, warmup, compiled)
            )
    print(
        f"moeflow bench/train.py --compile: {CONFIG.name}, {steps} steps after {warmup} warm-up "
        f"(the compile included there), median of {repeats}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, fp32, gloo"
    )
    print("| ranks x threads | layout | eager step ms | compiled step ms | eager / compiled |")
    print("|---|---|---|---|---|")
    for ranks, threads, ep in layouts:
        eager, comp = (statistics.median(r["step_ms"] for r in runs[(ranks, threads, ep, c)])
                       for c in (False, True))  # fmt: skip
        print(f"| {ranks} x {threads} | dp{ranks // ep} x ep{ep} | {eager:.1f} | {comp:.1f} | "
              f"{eager / comp:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
