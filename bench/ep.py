"""Expert-parallel MoE layer on gloo ranks: all-to-all, expert compute, serial, overlapped, and
DeepSpeed's MoE with the same ep_size, in one run.

    .venv/bin/python bench/ep.py                       # 2 and 4 ranks, OMP_NUM_THREADS=1 each
    .venv/bin/python bench/ep.py --ranks 2 --tokens 2048 --repeats 5 --activation gelu

Per configuration (forward + backward of one layer; every rank times every step, the step time is
the slowest rank's, the figure the median over repeats):
- a2a: the four all-to-alls of a step (dispatch and combine, forward and backward) on the layer's
  real split sizes, nothing else;
- floor: the per-rank floor, as in `bench/layer.py`: the local experts' plain per-expert matrix
  products (forward and backward, input gradients included) on as many rows per expert as this
  rank receives, already grouped, no routing or exchange of any kind;
- compute: the local experts' grouped FFN forward+backward on the rows this rank receives, as the
  layer runs it (its router-weight column and block bookkeeping included);
- serial: the whole layer, overlap degree 1; overlapped: the same with overlap degree n;
- efficiency = (serial - overlapped) / min(a2a, compute): the share of the hideable time hidden;
- best/floor: the layer's best time (serial or overlapped) over the floor, the slowest rank's each;
- deepspeed: `deepspeed.moe.layer.MoE(ep_size=ranks, drop_tokens=False)` with the same router and
  expert weights (`bench/peers.py`), so it routes the same tokens to the same experts.
Ranks share this machine's cores (OMP_NUM_THREADS=1 each), so with more ranks than cores the
"communication" competes with compute for the CPU; read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.layer import Floor, clear_grads
from bench.peers import deepspeed_moe_like
from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.parallel import ParallelDims, parallelize
from moeflow.train.distributed import free_port, local_rank_env
from moeflow.utils import keep_freed_memory


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--activation", choices=["swiglu", "gelu"], default="swiglu")
    p.add_argument("--overlap", type=int, nargs="+", default=[2, 4])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-deepspeed", action="store_true")
    return p.parse_args()


def timed_interleaved(
    fns: dict, repeats: int, warmup: int, min_seconds: float = 0.0
) -> dict[str, float]:
    """Median over repeats of the slowest rank's time, the contenders interleaved within each
    repeat so that drift of the machine hits them all alike, in a new random order each repeat
    (the same on every rank), so none always runs right after the same one (after a `dp` weight
    gather, the next call is slower on CPUs). With `min_seconds`, short contenders get more
    repeats: enough that the slowest one runs for `min_seconds` (the same count on every rank)."""
    slowest = 0.0
    for _ in range(max(warmup, 1 if min_seconds else 0)):
        for fn in fns.values():
            t0 = time.perf_counter()
            fn()
            slowest = max(slowest, time.perf_counter() - t0)
    if min_seconds:
        t = torch.tensor([slowest], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        repeats = max(repeats, math.ceil(min_seconds / max(t.item(), 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        order = list(fns.items())
        shuffle(order)
        for name, fn in order:
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[name].append(t.item())
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def measure(ctx, args, tokens: int, rank: int, world: int):
    """One configuration on this rank: returns (tokens, {name: ms}, rows rank sent off-rank)."""
    cfg = MoEConfig(
        hidden_size=args.hidden,
        num_experts=args.experts,
        ffn_hidden_size=args.ffn,
        activation=args.activation,
        router=RouterConfig(top_k=args.top_k),
    )
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.2)
    parallelize(layer, ctx)
    x = torch.randn(tokens, args.hidden, generator=torch.Generator().manual_seed(rank))
    x.requires_grad_(True)
    g = torch.randn(tokens, args.hidden)

    def step(n: int) -> None:
        layer(x, overlap_degree=n).backward(g)
        clear_grads(layer.parameters(), x)

    fns = {"serial": lambda: step(1)}
    for n in args.overlap:
        fns[f"overlap{n}"] = lambda n=n: step(n)
    layer(x, overlap_degree=1)
    plan = layer.last_stats.traffic.dispatch
    send, recv = plan.input_splits[0], plan.output_splits[0]

    def a2a_only():
        for s, r in ((send, recv), (recv, send), (send, recv), (recv, send)):
            out = torch.empty(sum(r), args.hidden)
            dist.all_to_all_single(out, torch.ones(sum(s), args.hidden), r, s, group=ctx.ep_group)

    fns["a2a"] = a2a_only
    blocks = plan.chunk_meta[0]
    params = (layer.experts.w1.detach(), layer.experts.w2.detach())
    _, compute = layer.expert_dispatch.path("ep")
    # Received rows: D values, and the router weight where the experts apply it (F <= D).
    xr = torch.randn(sum(recv), args.hidden + compute.weighted)
    gr = torch.randn(sum(recv), args.hidden)

    def compute_only():  # exactly what the layer runs on the received rows, without the exchange
        _, saved = compute.forward(params, xr, blocks)
        acc = compute.new_grads(params)
        compute.backward(params, saved, gr, blocks, acc)
        compute.finish(acc)

    fns["compute"] = compute_only
    counts = [0] * layer.experts.w1.shape[0]
    for slot, first, end in blocks:
        counts[slot] += end - first
    fns["floor"] = Floor(layer, counts).step
    if not args.no_deepspeed:
        ds = deepspeed_moe_like(layer, world, capacity_factor=None)
        xb = x.detach().view(1, tokens, args.hidden).clone().requires_grad_(True)

        def ds_step():
            out, _, _ = ds(xb)
            out.backward(g.view_as(out))
            clear_grads(ds.parameters(), xb)

        fns["deepspeed"] = ds_step
    res = timed_interleaved(fns, args.repeats, args.warmup)
    return tokens, res, sum(send) - send[rank]


def bench_rank(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(local_rank_env(rank, world, port))
    torch.set_num_threads(1)
    keep_freed_memory()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    if args.no_deepspeed:
        dist.init_process_group("gloo")
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    ctx = ParallelDims(ep=world).build()
    rows = [measure(ctx, args, tokens, rank, world) for tokens in args.tokens]
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int) -> Iterator:
    """This process as rank `rank` of a gloo job on this machine (one thread, freed memory kept):
    yields the `ParallelContext` of one expert group over every rank; tears the group down."""
    os.environ.update(local_rank_env(rank, world, port))
    torch.set_num_threads(1)
    keep_freed_memory()
    dist.init_process_group("gloo")
    try:
        yield ParallelDims(ep=world).build()
    finally:
        dist.barrier()
        dist.destroy_process_group()


def machine_line(args, extra: str) -> str:
    return (
        f"machine: {platform.machine()} {os.cpu_count()} cores | torch {torch.__version__} | "
        f"gloo, OMP_NUM_THREADS=1 per rank | fp32 | D={args.hidden} F={args.ffn} "
        f"{getattr(args, 'activation', 'swiglu')} "
        f"dropless | median of {args.repeats}{extra}"
    )


def spawn_ranks(target, world: int, args) -> list:
    """Run `target(rank, world, port, args, queue)` on `world` spawned ranks; rank 0's result."""
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    port = free_port()
    procs = [spawn.Process(target=target, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=3600)
    for p in procs:
        p.join()
    return rows


def main() -> None:
    args = parse_args()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores | torch {torch.__version__} | "
        f"OMP_NUM_THREADS=1 per rank | fp32 | D={args.hidden} F={args.ffn} E={args.experts} "
        f"k={args.top_k} {args.activation} dropless | median of {args.repeats} | "
        "allocator keeps freed memory"
    )
    for world in args.ranks:
        rows = spawn_ranks(bench_rank, world, args)
        print(f"\nep={world} ranks (tokens per rank; times in ms per forward+backward)")
        head = f"{'tokens':>7}{'a2a':>8}{'floor':>8}{'compute':>9}{'serial':>8}"
        head += "".join(f"{'ovl' + str(n):>8}{'eff' + str(n):>7}" for n in args.overlap)
        head += f"{'best/floor':>11}"
        head += f"{'deepspeed':>11}{'ds/best':>9}" if not args.no_deepspeed else ""
        print(head)
        for tokens, r, remote in rows:
            line = f"{tokens:>7}{r['a2a']:>8.1f}{r['floor']:>8.1f}{r['compute']:>9.1f}"
            line += f"{r['serial']:>8.1f}"
            hideable = min(r["a2a"], r["compute"])
            for n in args.overlap:
                eff = (r["serial"] - r[f"overlap{n}"]) / hideable if hideable > 0 else 0.0
                line += f"{r[f'overlap{n}']:>8.1f}{eff:>7.0%}"
            best = min([r["serial"]] + [r[f"overlap{n}"] for n in args.overlap])
            line += f"{best / r['floor']:>11.2f}"
            if "deepspeed" in r:
                line += f"{r['deepspeed']:>11.1f}{r['deepspeed'] / best:>9.2f}"
            print(line + f"   ({remote} rows sent off-rank by rank 0)")


if __name__ == "__main__":
    main()
