"""The GPU benches of `bench/gpu_check.sh`: the expert kernels and the all-to-all overlap.

    .venv/bin/python bench/gpu_checks.py kernels            # on the GPU, bf16
    .venv/bin/python bench/gpu_checks.py overlap            # 2 processes on one GPU
    .venv/bin/python bench/gpu_checks.py kernels --dry-run  # tiny shapes on the CPU, fp32

- `kernels`: one MoE layer's forward + backward with `expert_kernel = "loop"` (one GEMM per
  expert block) against `"grouped_mm"` (one `torch.nn.functional.grouped_mm` per projection),
  the same weights, dropless and padded to capacity; median over interleaved repeats, timed with
  the device synchronised (`moeflow.utils.device_clock`). Ratio loop / grouped_mm (> 1: grouped
  is faster).
- `overlap`: 2 processes share the GPU (NCCL, or gloo where NCCL refuses one device twice),
  expert-parallel at ep 2; the layer step with overlap degree 1 against 2 (chunk i+1's
  all-to-all in flight while chunk i computes), and with a shared expert computing while the
  tokens travel. Ratio serial / overlapped (> 1: the overlap hides communication). Two processes
  on one GPU share its SMs, so this checks that the overlap runs and never waits for nothing;
  the speed-up across GPUs is larger.
`--dry-run` runs the same code on the CPU at tiny shapes (gloo): it checks the script, not a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.parallel import ParallelDims, parallelize
from moeflow.train.distributed import free_port, local_rank_env
from moeflow.utils.device_clock import elapsed

# (tokens, hidden, ffn per expert, experts, top-k): a Mixtral-like and a fine-grained layer.
SHAPES = {"coarse": (8192, 1024, 2816, 8, 2), "fine": (8192, 1024, 512, 64, 8)}
TINY = {"coarse": (256, 64, 128, 8, 2), "fine": (256, 64, 32, 16, 4)}


def setting(dry: bool) -> tuple[torch.device, torch.dtype, dict]:
    if dry:
        return torch.device("cpu"), torch.float32, TINY
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: pass --dry-run to check the script on a CPU")
    return torch.device("cuda"), torch.bfloat16, SHAPES


def build(shape, kernel: str, padded: bool, device, dtype, shared: int = 0):
    _, d, f, e, k = shape
    router = RouterConfig(top_k=k, capacity_factor=1.25 if padded else None,
                          pad_to_capacity=padded)  # fmt: skip
    cfg = MoEConfig(hidden_size=d, num_experts=e, ffn_hidden_size=f, router=router,
                    expert_kernel=kernel, shared_expert_ffn_hidden_size=shared)  # fmt: skip
    torch.manual_seed(0)
    return MoELayer(cfg).to(device=device, dtype=dtype)


def timed_step(layer: MoELayer, x: torch.Tensor, **call):
    def run() -> None:
        layer(x, **call).float().square().mean().backward()
        for p in (*layer.parameters(), x):
            p.grad = None

    return run


def kernels(dry: bool, repeats: int) -> None:
    device, dtype, shapes = setting(dry)
    print(f"| shape | padded | loop ms | grouped_mm ms | loop / grouped_mm |  ({device}, {dtype})")
    print("|---|---|---|---|---|")
    for name, shape in shapes.items():
        for padded in (False, True):
            x = torch.randn(shape[0], shape[1], device=device, dtype=dtype, requires_grad=True)
            steps = {kern: timed_step(build(shape, kern, padded, device, dtype), x)
                     for kern in ("loop", "grouped_mm")}  # fmt: skip
            times: dict[str, list[float]] = {kern: [] for kern in steps}
            for step in steps.values():
                step()  # warm-up
            for _ in range(repeats):
                for kern, step in steps.items():  # interleaved
                    times[kern].append(elapsed(step, device, calls=3))
            loop, gmm = (statistics.median(times[k]) * 1e3 for k in ("loop", "grouped_mm"))
            print(f"| {name} {shape} | {padded} | {loop:.2f} | {gmm:.2f} | {loop / gmm:.2f} |")


def _overlap_rank(rank: int, world: int, port: int, dry: bool, repeats: int, out) -> None:
    os.environ.update(local_rank_env(rank, world, port))
    device, dtype, shapes = setting(dry)
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(0)  # both processes on the one GPU
        try:
            dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
            dist.barrier()
            backend = "nccl"
        except Exception:  # NCCL refuses two ranks on one device in some versions
            if dist.is_initialized():
                dist.destroy_process_group()
            os.environ["MASTER_PORT"] = str(port + 1)
            dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo")
    ctx = ParallelDims(ep=world).build()
    rows = []
    for shared in (0, shapes["coarse"][2] // 2):
        layer = parallelize(build(shapes["coarse"], "auto", False, device, dtype, shared), ctx)
        x = torch.randn(shapes["coarse"][0], shapes["coarse"][1], device=device, dtype=dtype,
                        requires_grad=True)  # fmt: skip
        steps = {deg: timed_step(layer, x, overlap_degree=deg) for deg in (1, 2)}
        times: dict[int, list[float]] = {deg: [] for deg in steps}
        for step in steps.values():
            step()
        for _ in range(repeats):
            for deg, step in steps.items():
                dist.barrier()
                t = torch.tensor(elapsed(step, device, calls=3))
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's
                times[deg].append(t.item())
        serial, overlapped = (statistics.median(times[d]) * 1e3 for d in (1, 2))
        rows.append((shared, serial, overlapped))
    padded = _padded_never_waits(ctx, shapes["coarse"], device, dtype)
    if rank == 0:
        out.put((backend, rows, padded))
    dist.destroy_process_group()


def _padded_never_waits(ctx, shape, device, dtype) -> str:
    """A padded layer at ep 2: its first call checks the ranks' agreement (one read), and the
    next calls' forward and backward never synchronise (`set_sync_debug_mode("error")` raises
    at any synchronising call on a GPU; on a CPU it only runs them)."""
    layer = parallelize(build(shape, "auto", True, device, dtype), ctx)
    x = torch.randn(shape[0], shape[1], device=device, dtype=dtype, requires_grad=True)
    step = timed_step(layer, x)
    step()  # the first call of its kind: the agreement is read
    if device.type != "cuda":
        step()
        return "padded ep 2: ran (no synchronisation check without a GPU)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    except RuntimeError as exc:
        return f"padded ep 2: SYNCHRONISED: {str(exc).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "padded ep 2: no synchronisation in 2 steps after the first call"


def overlap(dry: bool, repeats: int) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_overlap_rank, args=(r, 2, port, dry, repeats, queue))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    backend, rows, padded = queue.get(timeout=600)
    for p in procs:
        p.join()
    device, dtype, shapes = setting(dry)
    print(f"ep 2, 2 processes on one {device.type} device, {backend}, {dtype}, "
          f"{shapes['coarse']} (tokens per rank, D, F, E, k), dropless")  # fmt: skip
    print("| shared expert F | overlap 1 ms | overlap 2 ms | serial / overlapped |")
    print("|---|---|---|---|")
    for shared, serial, over in rows:
        print(f"| {shared} | {serial:.2f} | {over:.2f} | {serial / over:.2f} |")
    print(padded)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("check", choices=["kernels", "overlap"])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    {"kernels": kernels, "overlap": overlap}[args.check](args.dry_run, args.repeats)


if __name__ == "__main__":
    main()
