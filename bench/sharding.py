"""Sharded (FSDP2, `parallel.dp_shard`) against replicated training of the demo model
(examples/configs/tiny_cpu.toml): every step's loss, what each rank holds, and the dry run's
predictions of it.

    .venv/bin/python bench/sharding.py [--steps 30]

Layouts: 2 ranks with dp_shard 2; 4 ranks with dp_shard 2 x ep 2, dp_shard 4, and dp_replicate 2 x
dp_shard 2. Each runs plain (mode "ep"), with re-placement every 10 steps and 1 replica slot (where
ep > 1), with mode "auto", and with 2 accumulation steps and selective activation checkpointing,
against the replicated run of the same layout and variant (dp_shard 1), launched by torchrun, one
process group per world size. Prints the largest relative difference of a step's loss, then for
dp_shard 4 and 2 x 2 the state per rank against a quarter of the fully replicated run's, and the
dry run's state and activation predictions against the `start` record the ranks measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.toml"
PLAIN = ["--parallel.mode", "ep", "--parallel.overlap_degree", "1", "--parallel.two_level",
         "false", "--placement.every", "0"]  # fmt: skip
VARIANTS = {
    "plain": [],
    "re-placed + 1 replica": ["--placement.every", "10", "--placement.min_steps", "10",
                              "--placement.replica_slots", "1", "--placement.min_gain", "0"],
    "mode auto": ["--parallel.mode", "auto", "--tuner.first_check", "5"],
    "accum 2 + selective ckpt": ["--train.grad_accum_steps", "2",
                                 "--train.activation_checkpointing", "selective"],
}  # fmt: skip
# (world, ep, dp_shard)
LAYOUTS = {2: [(1, 2)], 4: [(2, 2), (1, 4), (1, 2)]}


def overrides(out: str, steps: int, ep: int, shard: int, variant: str) -> list[str]:
    return [*PLAIN, "--train.out_dir", out, "--train.steps", str(steps), "--train.eval_every",
            "0", "--checkpoint.every", "0", "--parallel.ep", str(ep), "--parallel.dp_shard",
            str(shard), "--metrics.plot", "false", "--metrics.progress", "false",
            "--metrics.log_every", "1", *VARIANTS[variant]]  # fmt: skip


def worker(steps: int, out_file: str) -> None:
    from moeflow.train.config import RunConfig
    from moeflow.train.distributed import init_distributed, shutdown
    from moeflow.train.trainer import Trainer

    runtime = init_distributed(300)
    world, found, rank0 = runtime.world_size, {}, runtime.rank == 0
    tmp = f"{out_file}.runs"  # the same directory on every rank

    def start_record(out: str) -> dict:  # written by rank 0
        lines = Path(out, "metrics.jsonl").read_text().splitlines() if rank0 else []
        return next((json.loads(x) for x in lines if '"start"' in x), {})

    try:
        for ep, shard in LAYOUTS[world]:
            for variant in VARIANTS:
                if variant.startswith("re-placed") and ep == 1:
                    continue
                for s in (1, shard):
                    out = f"{tmp}/{ep}-{shard}-{s}-{len(found)}"
                    cfg = RunConfig.from_toml(CONFIG, overrides(out, steps, ep, s, variant))
                    with Trainer(cfg, runtime, None, True) as trainer:
                        losses = trainer.run(quiet=True).losses
                    found[f"{ep} {shard} {s} {variant}"] = {
                        "losses": losses,
                        "start": start_record(out),
                    }
        if world == 4:  # the fully replicated run: every rank holds the whole state
            cfg = RunConfig.from_toml(CONFIG, overrides(f"{tmp}/full", 1, 1, 1, "plain"))
            with Trainer(cfg, runtime, None, True) as trainer:
                trainer.run(quiet=True)
            found["full"] = {"start": start_record(f"{tmp}/full")}
        if rank0:
            Path(out_file).write_text(json.dumps(found))
    finally:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        shutdown(runtime)


def run(world: int, steps: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", __file__, "--worker", "--steps", str(steps),
               "--out", out.name]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, env=env, check=True, cwd=ROOT, capture_output=True)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.steps, args.out)
        return
    from moeflow.train.config import RunConfig
    from moeflow.train.dry_run import dry_run

    print(
        f"moeflow bench/sharding.py: {CONFIG.name}, {args.steps} steps, fp32, gloo; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print("| world | layout | variant | max rel. loss difference, sharded vs replicated |")
    print("|---|---|---|---|")
    results = {world: run(world, args.steps) for world in LAYOUTS}
    for world, found in results.items():
        for ep, shard in LAYOUTS[world]:
            rep = world // ep // shard
            layout = f"dp_replicate {rep} x dp_shard {shard} x ep {ep}"
            for variant in VARIANTS:
                key = f"{ep} {shard} {{}} {variant}"
                if key.format(1) not in found:
                    continue
                a, b = found[key.format(1)]["losses"], found[key.format(shard)]["losses"]
                worst = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
                print(f"| {world} | {layout} | {variant} | {worst:.2e} ({len(a)} steps) |")
    full = results[4]["full"]["start"]["state_bytes"]
    whole = sum(full[k][0] for k in ("params", "grads", "optimizer"))
    print("\n| 4 ranks | state per rank (max) | / (replicated / 4) | dry run state | dry run "
          "activations |")  # fmt: skip
    print("|---|---|---|---|---|")
    for ep, shard, variant in (
        (1, 4, "plain"),
        (2, 2, "plain"),
        (2, 2, "accum 2 + selective ckpt"),
    ):
        start = results[4][f"{ep} {shard} {shard} {variant}"]["start"]
        held = max(sum(start["state_bytes"][k][r] for k in ("params", "grads", "optimizer"))
                   for r in range(4))  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            cfg = RunConfig.from_toml(CONFIG, overrides(tmp, 1, ep, shard, variant))
            report = dry_run(cfg, world_size=4, device="cpu")
        predicted = sum(report["state_bytes_per_rank"].values())
        acts = report["memory"]["activations"]
        measured = max(start["activation_bytes"])
        print(
            f"| dp_shard {shard} x ep {ep}, {variant} | {held:,} B | {held / (whole / 4):.3f} | "
            f"{predicted:,} B ({predicted / held - 1:+.1%}) | {acts:,.0f} B vs measured "
            f"{measured:,} B ({acts / measured - 1:+.1%}) |"
        )


if __name__ == "__main__":
    main()
