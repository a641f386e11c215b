"""Every parallel mode of one MoE layer (ep, sharded, dp) on gloo ranks, over a sweep of tokens per
rank, with more experts than ranks (E >= G: whole experts per rank) and fewer (E < G: F-slices),
interleaved in one run.

    .venv/bin/python bench/modes.py                          # 2 and 4 ranks, OMP_NUM_THREADS=1
    .venv/bin/python bench/modes.py --ranks 2 --tokens 256 2048 --repeats 3

Per shape (forward + backward of one layer; every rank times every step, the step time is the
slowest rank's, the figure the median over repeats):
- floor: the slowest rank's own routed (token, slot) rows, grouped by expert, through whole expert
  FFNs as plain per-expert matrix products (what one process holding every expert computes for
  that rank's tokens); every mode does at least this work per rank on average;
- ep / sharded / dp: the layer in that mode, from the same layout (`moeflow.parallel`), ms and x
  floor;
- bytes moved per step by rank 0: tokens (forward dispatch rows sent off-rank, x4 for dispatch and
  combine, forward and backward) and expert weights (received by the gathers, x2: forward and the
  backward's re-gather; the gradient's reduce-scatter moves as many again, not counted).
Ranks share this machine's cores (OMP_NUM_THREADS=1 each, 2 cores): with 4 ranks on 2 cores the
collectives compete with compute for the CPU; read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ep import gloo_rank, machine_line, spawn_ranks, timed_interleaved
from bench.layer import Floor
from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.parallel import MODES, parallelize


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 512, 2048], help="per rank")
    p.add_argument(
        "--skew", type=float, nargs="+", default=[0.0, 3.0],
        help="inputs pushed along expert 0's router row by this many standard deviations",
    )  # fmt: skip
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8, help="E >= G shapes (E < G uses G / 2)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    return p.parse_args()


def measure(ctx, args, experts: int, tokens: int, skew: float, rank: int) -> dict:
    k = min(args.top_k, experts)
    cfg = MoEConfig(
        hidden_size=args.hidden, num_experts=experts, ffn_hidden_size=args.ffn,
        router=RouterConfig(top_k=k),
    )  # fmt: skip
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.2)
    whole = MoELayer(cfg)  # every expert whole, for the floor
    whole.load_state_dict(layer.state_dict())
    parallelize(layer, ctx)
    x = torch.randn(tokens, args.hidden, generator=torch.Generator().manual_seed(rank))
    if skew:  # every rank's tokens lean towards expert 0 (and its neighbours in score)
        row = layer.router.weight.detach()[0]
        x += skew * row / row.norm()
    x.requires_grad_(True)
    g = torch.randn(tokens, args.hidden)
    # With one shard per expert, `sharded` is `ep` (the same path): timed once, as `ep`.
    modes = [m for m in MODES if m != "sharded" or layer.layout.shards > 1]
    moved = {}
    for mode in modes:
        layer(x, mode=mode)
        t = layer.last_stats.traffic
        moved[mode] = (4 * t.sent_bytes, 2 * t.gathered_bytes)
    counts = layer.last_stats.tokens_per_expert
    load = (counts.max() / counts.float().mean()).item()
    fns = {"floor": Floor(whole, counts.tolist()).step}
    for mode in modes:
        fns[mode] = lambda mode=mode: layer(x, mode=mode).backward(g)
    times = timed_interleaved(fns, args.repeats, args.warmup)
    return {"experts": experts, "tokens": tokens, "k": k, "ms": times, "moved": moved,
            "shards": layer.layout.shards, "skew": skew, "load": load}  # fmt: skip


def bench_rank(rank: int, world: int, port: int, args, queue) -> None:
    with gloo_rank(rank, world, port) as ctx:
        rows = []
        for experts in (max(args.experts, world), max(world // 2, 1)):
            for tokens in args.tokens:
                for skew in args.skew:
                    rows.append(measure(ctx, args, experts, tokens, skew, rank))
        if rank == 0:
            queue.put(rows)


def main() -> None:
    args = parse_args()
    print(machine_line(args, " | allocator keeps freed memory"))
    wins: dict[str, list[str]] = {m: [] for m in MODES}
    for world in args.ranks:
        rows = spawn_ranks(bench_rank, world, args)
        print(f"\n{world} ranks (expert group G = {world}); ms per forward+backward, x floor; "
              "MB moved per step by rank 0 (tokens / weights)")  # fmt: skip
        head = f"{'E':>3}{'k':>3}{'S':>3}{'tokens':>7}{'max/mean':>9}{'floor':>8}"
        head += "".join(f"{m + ' ms':>12}{'x':>6}{'MB tok/w':>12}" for m in MODES) + "  fastest"
        print(head)
        for r in rows:
            ms = r["ms"]
            line = f"{r['experts']:>3}{r['k']:>3}{r['shards']:>3}{r['tokens']:>7}"
            line += f"{r['load']:>9.2f}{ms['floor']:>8.2f}"
            for m in MODES:
                if m not in ms:
                    line += f"{'= ep':>12}{'':>6}{'':>12}"
                    continue
                tok, w = (b / 2**20 for b in r["moved"][m])
                line += f"{ms[m]:>12.2f}{ms[m] / ms['floor']:>6.2f}{f'{tok:.2f}/{w:.2f}':>12}"
            timed = [m for m in MODES if m in ms]
            best = min(timed, key=lambda m: ms[m])
            margin = min(ms[m] for m in timed if m != best) / ms[best]
            print(line + f"  {best} ({margin:.2f}x next)")
            wins[best].append(f"G={world} E={r['experts']} T={r['tokens']} skew={r['skew']:g}")
    print("\nwhere each mode is fastest:")
    for m in MODES:
        print(f"  {m:<8} {len(wins[m]):>2} shapes: {', '.join(wins[m]) or '-'}")


if __name__ == "__main__":
    main()
