"""The routers of docs/methods.md trained head to head on the demo model
(examples/configs/tiny_cpu.toml).

    .venv/bin/python bench/routers.py [--steps 3000] [--ranks 2] [--only topk,null]

Each router trains the same model (2 MoE layers x 8 FFN experts, dim 128) for the same steps, seed
and data on the embedded corpus, on `--ranks` gloo ranks with ep = ranks (torchrun), one after the
other. Printed per router: validation bits per byte, FFN expert-tokens per token (the FFN work; 2.0
for top-2), the time inside the MoE layers per training step (forward + backward, slowest rank),
the whole step, and the ratios against top-2.

- top-2: the demo as configured.
- null (AdaMoE): 8 true + 2 null experts, top-2: balanced, 2 * 8/10 = 1.6 FFN experts per token.
- moepp (MoE++): 8 FFN + 1 copy + 1 constant expert, top-2, tau 1.0, gating residual:
  2 * 8 / (8 + 2) = 1.6 FFN experts per token after balancing. (With 1 zero + 1 copy and tau 0.75,
  1.5 FFN experts per token, 3000 steps measured +1.27% bits per byte against top-2.)
- rmoe: top-2 with a GRU router of width 64 shared by the layers.
- a2a64, a2a32 (`--only topk,a2a64,a2a32`): top-2 with the low-dimension all-to-all at r = 64 and
  32 (D/2, D/4; `MoEConfig.a2a_dim`): every all-to-all moves r of the 128 values per row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.toml"

ROUTERS = {
    "topk": [],
    "null": ["--model.moe.router.type", "null", "--model.moe.router.num_null_experts", "2"],
    "moepp": [
        "--model.moe.router.type", "moepp", "--model.moe.router.copy_experts", "1",
        "--model.moe.router.constant_experts", "1", "--model.moe.router.zc_tau", "1.0",
    ],
    "rmoe": ["--model.moe.router.type", "rmoe", "--model.moe.router.rnn_dim", "64"],
    # The low-dimension all-to-all (BigMac) at r = D/2 and D/4 (`--only topk,a2a64,a2a32`).
    "a2a64": ["--model.moe.a2a_dim", "64"],
    "a2a32": ["--model.moe.a2a_dim", "32"],
}  # fmt: skip
DEFAULT = "topk,null,moepp,rmoe"


def worker(name: str, steps: int, out_file: str, run_dir: str) -> None:
    import torch.distributed as dist

    from bench.train import MoETimer
    from moeflow.train.config import RunConfig
    from moeflow.train.distributed import init_distributed, shutdown
    from moeflow.train.trainer import Trainer

    runtime = init_distributed(600)
    world = runtime.world_size
    if True:
        tmp = run_dir  # every rank writes into the same run directory (the parent's)
        overrides = [
            *ROUTERS[name], "--parallel.ep", str(world), "--train.steps", str(steps),
            "--train.out_dir", tmp, "--train.eval_every", "0", "--metrics.plot", "false",
            "--metrics.progress", "false", "--metrics.log_every", "50",
        ]  # fmt: skip
        cfg = RunConfig.from_toml(CONFIG, overrides)
        trainer = Trainer(cfg, runtime, resume=None, overwrite=True)
        timer = MoETimer(trainer.moe_layers, training_only=True)
        t0 = time.perf_counter()
        result = trainer.run(quiet=True)
        seconds = time.perf_counter() - t0
    shares = [None] * world
    dist.all_gather_object(shares, (timer.total, seconds))
    if runtime.rank == 0:
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").open()]
        train = [r for r in records if r["kind"] == "train"]
        ffn = sum(r["ffn_experts_per_token"] for r in train) / len(train)
        ffn_last = train[-1]["ffn_experts_per_token"]
        moe_s, total_s = max(shares)
        Path(out_file).write_text(json.dumps({
            "val_bpb": result.val_bpb, "ffn_per_token": ffn, "ffn_per_token_last": ffn_last,
            "moe_ms_per_step": 1e3 * moe_s / steps, "run_s": total_s,
        }))  # fmt: skip
    shutdown(runtime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)  # ~27 min for all four on 2 cores
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--only", default=DEFAULT, help=f"of {', '.join(ROUTERS)}")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.out, args.run_dir)
        return
    results = {}
    for name in args.only.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as out, tempfile.TemporaryDirectory() as d:
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={args.ranks}", __file__, "--worker", name,
                "--steps", str(args.steps), "--out", out.name, "--run-dir", d,
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run(cmd, env=env, check=True, cwd=ROOT, capture_output=True)
            results[name] = json.loads(Path(out.name).read_text())
        print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)
    print(
        f"moeflow bench/routers.py: {CONFIG.name} (dim 128, 2 MoE layers x 8 FFN experts, top-2), "
        f"{args.steps} steps x 2 ranks x 8 x 128 tokens, seed 0, ep={args.ranks}, gloo, fp32, "
        f"OMP_NUM_THREADS=1 per rank; {platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(
        "| router | val bits/byte | vs top-2 | FFN experts/token (mean, last) | FFN work vs "
        "top-2 | MoE ms/step | vs top-2 | run s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = results.get("topk")
    for name, r in results.items():
        rel_bpb = f"{r['val_bpb'] / base['val_bpb'] - 1:+.2%}" if base else "-"
        rel_ffn = f"{r['ffn_per_token'] / base['ffn_per_token'] - 1:+.1%}" if base else "-"
        rel_ms = f"{r['moe_ms_per_step'] / base['moe_ms_per_step']:.2f}" if base else "-"
        print(
            f"| {name} | {r['val_bpb']:.4f} | {rel_bpb} | {r['ffn_per_token']:.3f}, "
            f"{r['ffn_per_token_last']:.3f} | {rel_ffn} | {r['moe_ms_per_step']:.1f} | {rel_ms} "
            f"| {r['run_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
