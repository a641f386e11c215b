"""The runtime tuner against every fixed candidate, one MoE layer on gloo ranks, interleaved in one
run: does `auto` find the fastest (mode, overlap degree), and what does tuning cost?

    .venv/bin/python bench/adaptive.py                      # 2 and 4 ranks, 8 shapes each
    .venv/bin/python bench/adaptive.py --ranks 2 --repeats 3

Per rank count: the cost model is calibrated on the ranks (`moeflow.parallel.calibrate`, as the
trainer does); per shape (tokens per rank small to large, E >= G and E < G, k 1 and 2, balanced
and skewed routing) one training forward + backward gives the tuner its input, `after_step` tunes
(timed: the tuning cost of one decision), then every fixed candidate and `auto` (the layer with
the tuner's choice as its default) run forward + backward interleaved; the figure is the median
over repeats of the slowest rank's time (short shapes get more repeats: `--min-seconds`).
Printed: ms per candidate; auto (its own run: the same call as its choice, so it differs from
the choice's column by noise alone) / best fixed; the choice's own column / best fixed (did the
tuner pick the fastest, on the same samples); default (`ep`, overlap 1) / auto; default / best
fixed (the most any choice could gain); the tuner's choice; and the cost model's prediction
error per candidate (predicted / measured - 1, from the calibrated figures).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ep import gloo_rank, machine_line, spawn_ranks, timed_interleaved
from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.parallel import DispatchConfig, parallelize
from moeflow.parallel.calibrate import calibrate
from moeflow.parallel.cost_model import Candidate
from moeflow.parallel.tuner import RuntimeTuner, TunerConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="more repeats for short shapes: the slowest contender runs this long",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--ranks-per-node",
        type=int,
        default=0,
        help="pretend nodes of this many ranks (two-level candidates); 0: one node",
    )
    return p.parse_args()


def shapes(world: int) -> list[dict]:
    """(experts, top-k, tokens per rank, skew): small to large, E >= G and E < G, k 1 and 2."""
    whole, sliced = max(8, world), max(world // 2, 1)
    return [
        {"experts": whole, "k": 2, "tokens": 64, "skew": 0.0},
        {"experts": whole, "k": 1, "tokens": 512, "skew": 0.0},
        {"experts": whole, "k": 2, "tokens": 2048, "skew": 0.0},
        {"experts": whole, "k": 2, "tokens": 2048, "skew": 3.0},
        {"experts": sliced, "k": 1, "tokens": 64, "skew": 0.0},
        {"experts": sliced, "k": min(2, sliced), "tokens": 512, "skew": 0.0},
        {"experts": sliced, "k": 1, "tokens": 2048, "skew": 3.0},
        {"experts": sliced, "k": min(2, sliced), "tokens": 2048, "skew": 0.0},
    ]


def measure(ctx, args, hw, shape: dict, rank: int) -> dict:
    cfg = MoEConfig(
        hidden_size=args.hidden, num_experts=shape["experts"], ffn_hidden_size=args.ffn,
        router=RouterConfig(top_k=shape["k"]),
    )  # fmt: skip
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.2)
    parallelize(layer, ctx, DispatchConfig(ranks_per_node=args.ranks_per_node or None))
    x = torch.randn(shape["tokens"], args.hidden, generator=torch.Generator().manual_seed(rank))
    if shape["skew"]:
        row = layer.router.weight.detach()[0]
        x += shape["skew"] * row / row.norm()
    x.requires_grad_(True)
    g = torch.randn_like(x)
    tuner = RuntimeTuner(layer, ctx, hw, TunerConfig())
    layer(x).backward(g)  # the step the tuner sees
    dist.barrier()
    t0 = time.perf_counter()
    (record,) = tuner.after_step(tuner.config.first_check)
    tuning_s = time.perf_counter() - t0
    tuner.close()
    fns = {}
    for label in record["predicted_ms"]:
        c = Candidate.parse(label)
        fns[label] = lambda c=c: layer(
            x, mode=c.mode, overlap_degree=c.overlap, two_level=c.two_level
        ).backward(g)
    fns["auto"] = lambda: layer(x).backward(g)  # the tuner's choice is the layer's default now
    times = timed_interleaved(fns, args.repeats, args.warmup, args.min_seconds)
    tuning = torch.tensor([tuning_s], dtype=torch.float64)
    dist.all_reduce(tuning, op=dist.ReduceOp.MAX)
    return {**shape, "record": record, "ms": times, "tuning_s": tuning.item()}


def bench_rank(rank: int, world: int, port: int, args, queue) -> None:
    with gloo_rank(rank, world, port) as ctx:
        hw = calibrate(ctx, args.hidden, args.ffn)
        rows = [measure(ctx, args, hw, shape, rank) for shape in shapes(world)]
        if rank == 0:
            queue.put((hw, rows))


def main() -> None:
    args = parse_args()
    extra = f" (at least {args.min_seconds:g} s each)" if args.min_seconds else ""
    print(machine_line(args, f"{extra}, interleaved | default = ep, overlap 1"))
    summary = []
    for world in args.ranks:
        hw, rows = spawn_ranks(bench_rank, world, args)
        print(
            f"\n{world} ranks; calibrated: GEMM {hw.gemm_flops / 1e9:.1f} GFLOP/s (half at "
            f"{hw.half_rows:.0f} rows), link {hw.intra.bandwidth / 1e9:.2f} GB/s, "
            f"alpha {hw.intra.alpha * 1e6:.0f} us"
        )
        print(f"{'E':>3}{'k':>3}{'tokens':>7}{'skew':>5}  {'fixed candidates, ms':<58}"
              f"{'auto':>7}{'auto/best':>10}{'choice/best':>12}{'default/auto':>13}"
              f"{'default/best':>13}  choice      tune s")  # fmt: skip
        for r in rows:
            ms = r["ms"]
            fixed = {k: v for k, v in ms.items() if k != "auto"}
            best = min(fixed, key=fixed.get)
            cells = " ".join(f"{k} {v:.1f}" for k, v in fixed.items())
            default, chosen = fixed["ep"], fixed[r["record"]["choice"]]
            print(
                f"{r['experts']:>3}{r['k']:>3}{r['tokens']:>7}{r['skew']:>5g}  {cells:<58}"
                f"{ms['auto']:>7.1f}{ms['auto'] / fixed[best]:>10.2f}"
                f"{chosen / fixed[best]:>12.2f}{default / ms['auto']:>13.2f}"
                f"{default / fixed[best]:>13.2f}  {r['record']['choice']:<10}{r['tuning_s']:>7.2f}"
            )
            summary.append((world, r, best))
            if chosen > 1.05 * fixed[best]:
                print(f"{'':>18}the tuner measured (ms): {r['record']['measured_ms']}")
    errors: dict[str, list[float]] = {}
    for _, r, _ in summary:
        for label, predicted in r["record"]["predicted_ms"].items():
            if label in r["ms"]:
                errors.setdefault(label.split("/")[0], []).append(predicted / r["ms"][label] - 1)
    print("\ncost model prediction error (predicted / measured - 1) per mode, over every shape:")
    for mode, errs in errors.items():
        print(f"  {mode:<8} median {statistics.median(errs):+.0%}, range "
              f"{min(errs):+.0%} .. {max(errs):+.0%} ({len(errs)} candidates)")  # fmt: skip
    ratios = [r["ms"]["auto"] / r["ms"][best] for _, r, best in summary]
    chosen = [r["ms"][r["record"]["choice"]] / r["ms"][best] for _, r, best in summary]
    not_default = [(r, best) for _, r, best in summary if best != "ep"]
    print(
        f"auto (its own run) / best fixed: worst {max(ratios):.2f}, median "
        f"{statistics.median(ratios):.2f}; the tuner's choice / best fixed (the same samples): "
        f"worst {max(chosen):.3f}, median {statistics.median(chosen):.3f}"
    )
    print(
        f"shapes where the default is not the best: {len(not_default)}; default / auto there: "
        + ", ".join(f"{r['ms']['ep'] / r['ms']['auto']:.2f}" for r, _ in not_default)
        + "; default / best fixed (the most any choice can gain): "
        + ", ".join(f"{r['ms']['ep'] / r['ms'][best]:.2f}" for r, best in not_default)
    )
    print(f"tuning cost per decision (one layer): median "
          f"{statistics.median(r['tuning_s'] for _, r, _ in summary):.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
