"""Forward+backward time and memory of one MoELayer against its floor and DeepSpeed's MoE, one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/layer.py            # the shapes, both allocators
    .venv/bin/python bench/layer.py --repeats 5 --shapes coarse   # quicker
    .venv/bin/python bench/layer.py --profile                     # where the layer's time goes

Shapes (T tokens, D, F per expert, E experts, top-k): `coarse` T=4096 D=256 F=512 E=8 k=2 and
`fine` (fine-grained experts, as DeepSeek and Qwen3) T=4096 D=256 F=64 E=64 k=8; each with GELU
and SwiGLU experts, dropless and capacity factor 1.25, fp32.

Floor: the same routed (token, slot) rows, already grouped by expert, through the E expert FFNs as
plain per-expert matrix products (forward and backward, input gradients included), with the
layer's own weights and per-expert counts. Everything the layer adds (router, top-k, sort, gather,
capacity, weighted combine, losses) is overhead on it. DeepSpeed: `deepspeed.moe.layer.MoE` with the
layer's router and expert weights, ep_size=1, on gloo (`bench/peers.py`). Floor, moeflow and
DeepSpeed alternate in a fresh random order every repeat; times are medians, and each ratio
(`x floor`, `gmm x fl`, `ds/ours`) is the median over repeats of that repeat's ratio (the two
ran back to back, so a slow spell of this shared machine cancels out); `IQR` gives the 25th and
75th percentiles of the `x floor` ratios, the noise around that median. Every step ends with its
gradients set to None, as `zero_grad()` between training steps: none adds into the last step's.

Allocators, each in its own process (this script runs both): `moeflow` is what a user gets by
default: the layer's first CPU forward keeps freed memory in glibc's heap
(`moeflow.utils.cpu_alloc`); `system` leaves glibc's defaults (`MOEFLOW_CPU_ALLOC=system`). Every
contender of a process runs under the same setting.

Memory: bytes saved for the backward (activations, not weights), per token, measured with saved-
tensor hooks on each contender's step.

`gmm x fl`: the layer with `expert_kernel = "grouped_mm"` (each projection of all experts in one
`torch.nn.functional.grouped_mm` call; on CPU torch's own kernel), the same weights. `--device
cuda` runs everything in bf16 on the GPU (the floor then runs at the GPU's own GEMM rate; the
layer's default kernel there is grouped_mm), timed with synchronisation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import deepspeed_moe_like
from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.moe.ffn import apply_activation

SHAPES = {"coarse": (4096, 256, 512, 8, 2), "fine": (4096, 256, 64, 64, 8)}
ALLOCATORS = ("moeflow", "system")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--activations", nargs="+", default=["gelu", "swiglu"])
    p.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=ALLOCATORS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed comparison")
    p.add_argument("--profile", action="store_true", help="per-phase breakdown of the layer")
    p.add_argument(
        "--device",
        default="cpu",
        help="cuda: bf16 on the GPU, the floor at the GPU's own GEMM rate (no DeepSpeed, one "
        "allocator)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


class Floor:
    """Per-expert GEMMs on pre-grouped rows, forward and backward, no routing work at all."""

    def __init__(self, layer: MoELayer, counts: list[int]) -> None:
        d = layer.config.hidden_size
        self.act = layer.config.activation
        w = layer.experts.w1
        # One leaf tensor per expert matrix: no indexing cost of any kind in the floor.
        self.w1 = [w.detach().clone().requires_grad_(True) for w in layer.experts.w1]
        self.w2 = [w.detach().clone().requires_grad_(True) for w in layer.experts.w2]
        self.xs = [torch.randn(n, d, device=w.device, dtype=w.dtype, requires_grad=True)
                   for n in counts]  # fmt: skip
        self.gs = [torch.randn(n, d, device=w.device, dtype=w.dtype) for n in counts]

    def step(self) -> None:
        outs, grads = [], []
        for e, (x, g) in enumerate(zip(self.xs, self.gs, strict=True)):
            if x.shape[0]:
                outs.append(apply_activation(x @ self.w1[e], self.act) @ self.w2[e])
                grads.append(g)
        torch.autograd.backward(outs, grads)
        for p in (*self.w1, *self.w2, *self.xs):
            p.grad = None


def clear_grads(params, x: torch.Tensor) -> None:
    """`grad = None` on the parameters and the input after a step, as an optimizer's
    `zero_grad()` does between steps (and as the floor does): no contender pays for adding into
    the previous step's gradients."""
    for p in (*params, x):
        p.grad = None


def saved_bytes(step, params) -> int:
    """Bytes of the tensors one `step()` saves for its backward, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def init_deepspeed_single_process() -> None:
    import deepspeed

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="gloo")


def build(
    shape: str, activation: str, capacity: float | None, kernel: str = "auto", device="cpu"
) -> tuple[MoELayer, torch.Tensor]:
    t, d, f, e, k = SHAPES[shape]
    cfg = MoEConfig(hidden_size=d, num_experts=e, ffn_hidden_size=f, activation=activation,
                    expert_kernel=kernel,
                    router=RouterConfig(top_k=k, capacity_factor=capacity))  # fmt: skip
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.2)  # a trained-looking, uneven router
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return layer.to(device=device, dtype=dtype), torch.randn(t, d).to(device, dtype)


def measure(args, shape: str, activation: str, capacity: float | None) -> dict:
    """One configuration: medians (ms) and saved bytes per token of every contender."""
    layer, x = build(shape, activation, capacity, device=args.device)
    # The grouped_mm expert path, the same weights (on CPU: torch's own grouped_mm kernel).
    grouped, _ = build(shape, activation, capacity, "grouped_mm", args.device)
    grouped.load_state_dict(layer.state_dict())
    g = torch.randn_like(x)
    xin = x.clone().requires_grad_(True)
    layer(xin)  # applies the allocator setting (moeflow) before anything is timed
    counts = layer.last_stats.tokens_per_expert.tolist()
    floor = Floor(layer, counts)

    def ours():
        layer(xin).backward(g)
        clear_grads(layer.parameters(), xin)

    def ours_grouped():
        grouped(xin).backward(g)
        clear_grads(grouped.parameters(), xin)

    steps = {
        "floor": (floor.step, [*floor.w1, *floor.w2]),
        "moeflow": (ours, layer.parameters()),
        "grouped_mm": (ours_grouped, grouped.parameters()),
    }
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if not args.no_deepspeed and args.device == "cpu":
        init_deepspeed_single_process()
        ds = deepspeed_moe_like(layer, ep_size=1, capacity_factor=capacity)
        xb = x.clone().view(1, *x.shape).requires_grad_(True)

        def deepspeed_step():
            out, _, _ = ds(xb)
            out.backward(g.view_as(out))
            clear_grads(ds.parameters(), xb)

        steps["deepspeed"] = (deepspeed_step, ds.parameters())
    memory = {k: saved_bytes(fn, list(p)) / x.shape[0] for k, (fn, p) in steps.items()}
    times = {k: [] for k in steps}
    order = list(steps)
    for _ in range(args.warmup):
        for key in order:
            steps[key][0]()
    rng = random.Random(0)
    for _ in range(args.repeats):
        rng.shuffle(order)
        for key in order:
            sync()
            t0 = time.perf_counter()
            steps[key][0]()
            sync()
            times[key].append(time.perf_counter() - t0)
    stats = layer.last_stats
    return {
        "shape": shape, "activation": activation, "capacity": capacity,
        "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "ratio": {k: paired_ratio(times[k], times[base])
                  for k, base in (("moeflow", "floor"), ("grouped_mm", "floor"),
                                  ("deepspeed", "moeflow")) if k in times},
        "spread": paired_quartiles(times["moeflow"], times["floor"]),
        "bytes_per_token": memory, "dropped": stats.dropped_fraction.item(),
    }  # fmt: skip


def paired_ratio(times: list[float], base: list[float]) -> float:
    """The median over repeats of one repeat's time over the other's: both ran back to back in
    that repeat, so a slow spell of the machine slows both and cancels out of the ratio."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def paired_quartiles(times: list[float], base: list[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles of the same per-repeat ratios: how far this machine's noise
    moves the median."""
    q1, _, q3 = statistics.quantiles([t / b for t, b in zip(times, base, strict=True)], n=4)
    return q1, q3


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    for shape in args.shapes:
        for activation in args.activations:
            for capacity in (None, 1.25):
                print(json.dumps(measure(args, shape, activation, capacity)), flush=True)
    if args.profile:
        from bench.layer_profile import print_profile, profile_step

        for shape in args.shapes:
            layer, x = build(shape, args.activations[0], None)
            x.requires_grad_(True)
            print(f"profile: {shape} {args.activations[0]} dropless, one step")
            print_profile(profile_step(layer, x, torch.randn_like(x)))


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} | torch {torch.__version__} | "
        f"threads {args.threads} | fp32 | median of {args.repeats} | forward+backward"
    )
    passthrough = [a for a in sys.argv[1:] if a not in ("--profile",)]
    results = []
    for alloc in args.allocators:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if alloc == "system":
            env["MOEFLOW_CPU_ALLOC"] = "system"
        else:
            env.pop("MOEFLOW_CPU_ALLOC", None)
        profile = ["--profile"] if args.profile and alloc == args.allocators[0] else []
        done = subprocess.run(
            [sys.executable, __file__, *passthrough, *profile, "--worker", alloc],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode:
            sys.exit(f"worker ({alloc}) failed:\n{done.stderr[-3000:]}")
        results += [{**json.loads(line), "alloc": alloc}
                    for line in done.stdout.splitlines() if line.startswith("{")]  # fmt: skip
        if profile:
            print(f"\nwhere the layer's step goes ({alloc} allocator):")
            print("\n".join(line for line in done.stdout.splitlines() if not line.startswith("{")))
    print_table(results, not args.no_deepspeed)


def print_table(results: list[dict], deepspeed: bool) -> None:
    head = f"\n{'allocator':<10}{'shape':<7}{'act':<7}{'setting':<10}{'floor ms':>9}{'moeflow':>9}"
    head += f"{'x floor':>8}{'IQR':>12}{'gmm x fl':>9}" + (
        f"{'deepspeed':>10}{'ds/ours':>8}" if deepspeed else ""
    )
    print(head + f"{'B/token ours':>13}{'floor':>7}" + (f"{'ds':>7}" if deepspeed else ""))
    for r in results:
        ms, mem = r["ms"], r["bytes_per_token"]
        setting = "dropless" if r["capacity"] is None else f"cap {r['capacity']}"
        line = f"{r['alloc']:<10}{r['shape']:<7}{r['activation']:<7}{setting:<10}"
        ratio, (q1, q3) = r["ratio"], r["spread"]
        line += f"{ms['floor']:>9.1f}{ms['moeflow']:>9.1f}{ratio['moeflow']:>8.3f}"
        line += f"{f'{q1:.3f}-{q3:.3f}':>12}"
        line += f"{ratio['grouped_mm']:>9.3f}"
        if deepspeed and "deepspeed" in ms:
            line += f"{ms['deepspeed']:>10.1f}{ratio['deepspeed']:>8.2f}"
        line += f"{mem['moeflow']:>13.0f}{mem['floor']:>7.0f}"
        line += f"{mem['deepspeed']:>7.0f}" if deepspeed and "deepspeed" in mem else ""
        print(line + (f"  (dropped {r['dropped']:.1%})" if r["dropped"] else ""))


if __name__ == "__main__":
    main()
