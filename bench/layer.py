"""Forward+backward time of one MoELayer against its floor and against DeepSpeed's MoE, in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/layer.py            # the issue's shapes
    .venv/bin/python bench/layer.py --tokens 1024 --repeats 5    # quicker

Floor: the same routed (token, slot) rows, already grouped by expert, through the E expert FFNs as
plain per-expert matrix products (forward and backward), with the layer's own weights and per-expert
counts. Everything the layer adds (router, top-k, sort, gather, capacity, weighted combine) is
overhead on it. DeepSpeed: `deepspeed.moe.layer.MoE` with the layer's router and expert weights,
ep_size=1, on gloo. Prints medians over interleaved repeats and the ratios, plus machine, threads
and shapes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import deepspeed_moe_like
from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.moe.ffn import apply_activation
from moeflow.utils import keep_freed_memory


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--activation", default="swiglu", choices=["swiglu", "gelu", "relu"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed comparison")
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's defaults (freed memory returned to the OS, re-faulted every step)",
    )
    return p.parse_args()


def time_it(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Floor:
    """Per-expert GEMMs on pre-grouped rows, forward and backward, no routing work at all."""

    def __init__(self, layer: MoELayer, counts: list[int]) -> None:
        d = layer.config.hidden_size
        self.act = layer.config.activation
        # One leaf tensor per expert matrix: no indexing cost of any kind in the floor.
        self.w1 = [w.detach().clone().requires_grad_(True) for w in layer.experts.w1]
        self.w2 = [w.detach().clone().requires_grad_(True) for w in layer.experts.w2]
        self.xs = [torch.randn(n, d, requires_grad=True) for n in counts]
        self.gs = [torch.randn(n, d) for n in counts]

    def step(self) -> None:
        outs, grads = [], []
        for e, (x, g) in enumerate(zip(self.xs, self.gs, strict=True)):
            if x.shape[0]:
                outs.append(apply_activation(x @ self.w1[e], self.act) @ self.w2[e])
                grads.append(g)
        torch.autograd.backward(outs, grads)


def init_deepspeed_single_process() -> None:
    import deepspeed

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend="gloo")


def main() -> None:
    args = parse_args()
    kept = False if args.system_malloc else keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = [("dropless", None), ("capacity 1.25", 1.25)]
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} | torch {torch.__version__} | "
        f"threads {torch.get_num_threads()} | fp32 | T={args.tokens} D={args.hidden} F={args.ffn} "
        f"E={args.experts} k={args.top_k} act={args.activation} | median of {args.repeats}\n"
        f"allocator: {'glibc keeps freed memory (keep_freed_memory)' if kept else 'glibc defaults'}"
        " for every contender"
    )
    x = torch.randn(args.tokens, args.hidden)
    g = torch.randn(args.tokens, args.hidden)
    rows = []
    for name, cf in settings:
        cfg = MoEConfig(
            hidden_size=args.hidden,
            num_experts=args.experts,
            ffn_hidden_size=args.ffn,
            activation=args.activation,
            router=RouterConfig(top_k=args.top_k, capacity_factor=cf),
        )
        layer = MoELayer(cfg)
        with torch.no_grad():
            layer.router.weight.normal_(0, 0.2)  # a trained-looking, uneven router
        xin = x.clone().requires_grad_(True)
        layer(xin)
        counts = layer.last_stats.tokens_per_expert.tolist()
        floor = Floor(layer, counts)

        def ours(layer=layer, xin=xin):
            layer(xin).backward(g)

        candidates = {"floor": floor.step, "moeflow": ours}
        if not args.no_deepspeed:
            init_deepspeed_single_process()
            ds = deepspeed_moe_like(layer, ep_size=1, capacity_factor=cf)
            xb = x.clone().view(1, args.tokens, args.hidden).requires_grad_(True)

            def deepspeed_step(ds=ds, xb=xb):
                out, _, _ = ds(xb)
                out.backward(g.view_as(out))

            candidates["deepspeed"] = deepspeed_step
        times = {k: [] for k in candidates}
        for _ in range(args.warmup):
            for fn in candidates.values():
                fn()
        for _ in range(args.repeats):
            for key, fn in candidates.items():
                times[key].append(time_it(fn))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        load = layer.last_stats.max_load_violation.item()
        rows.append((name, med, layer.last_stats.dropped_fraction.item(), load))

    print(f"{'setting':<15}{'floor ms':>10}{'moeflow ms':>12}{'x floor':>9}", end="")
    print(
        f"{'deepspeed ms':>14}{'ds/moeflow':>12}{'ds x floor':>12}" if not args.no_deepspeed else ""
    )
    for name, med, dropped, load in rows:
        line = f"{name:<15}{med['floor']:>10.1f}{med['moeflow']:>12.1f}"
        line += f"{med['moeflow'] / med['floor']:>9.3f}"
        if "deepspeed" in med:
            line += f"{med['deepspeed']:>14.1f}{med['deepspeed'] / med['moeflow']:>12.2f}"
            line += f"{med['deepspeed'] / med['floor']:>12.2f}"
        print(line + f"   (dropped {dropped:.1%}, max load +{load:.0%} over mean)")


if __name__ == "__main__":
    main()
