"""Expert placement: round-robin, greedy (EPLB) and the ILP on recorded and synthetic routing, and
the measured MoE step time on 4 gloo ranks before and after re-placement.

    .venv/bin/python bench/placement.py                  # everything (~6 min on 2 cores)
    .venv/bin/python bench/placement.py --skip-record --skip-step-time

1. Traces.
   - demo: recorded by the real trainer (`placement.stats`) on the demo model
     (examples/configs/tiny_cpu.toml, 1 process) with E experts of FFN size max(32, 2048 / E)
     (fine-grained, so the expert parameters stay those of the demo), `--record-steps` steps,
     no decay; cached under runs/bench_placement/ (`--rerecord` to redo).
   - synthetic: Zipf(1.0) expert loads, hot experts differing per layer, 80% of the tokens of
     expert i go on to i's partner in the next layer (`synthetic_trace`), 4 MoE layers,
     65,536 tokens x top-2; plus the same with no affinity as a control.
2. Placement table for (E, ranks) in (16, 4), (64, 8), (128, 16), (256, 64), with 2, 4, 8, 8 ranks
   per node: max/mean rank load (summed over layers), tokens crossing ranks and nodes between
   consecutive layers (fraction of all), the objective (sum of max loads + 0.1 x (intra-node
   crossings + 4 x inter-node crossings)), the ILP's gain over greedy, solve time and status.
   The synthetic rows also run with 25% replica slots (EPLB's hot-expert replication).
3. Step time: 4 gloo ranks (OMP_NUM_THREADS=1 each), two MoE layers (D=256, F=512, E=16, top-2,
   T=2048 tokens per rank) whose routers prefer a Zipf-skewed set of experts that the default
   contiguous placement puts on the same ranks. Routing statistics from 8 forwards; greedy and ILP
   placements applied with `apply_placement`, also on the same layers built with one replica slot
   per rank (20 slots for 16 experts: the hot experts get copies); forward+backward of both
   layers timed, the placements interleaved within each repeat (migration not timed), the step
   time the slowest rank's, median over repeats. Also the cost of `RoutingStats.observe` +
   `end_step` per step.
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
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.parallel import ParallelDims, RoutingStats, parallelize
from moeflow.parallel.replace import apply_placement, placement_slots
from moeflow.placement import PlacementConfig, RoutingTrace, plan, synthetic_trace
from moeflow.train.distributed import free_port, local_rank_env

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(16, 4, 2), (64, 8, 4), (128, 16, 8), (256, 64, 8)]
METHODS = ("round_robin", "greedy", "ilp")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--record-steps", type=int, default=100)
    p.add_argument("--rerecord", action="store_true")
    p.add_argument("--skip-record", action="store_true", help="no demo traces")
    p.add_argument("--skip-step-time", action="store_true")
    p.add_argument("--time-limit", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=9)
    return p.parse_args()


# -- 1. traces -------------------------------------------------------------------------------------
def demo_trace(experts: int, steps: int, rerecord: bool) -> RoutingTrace:
    """Routing recorded by `moeflow train` on the demo model with `experts` experts."""
    out = ROOT / "runs" / "bench_placement" / f"demo_e{experts}"
    path = out / "routing_stats.json"
    if path.is_file() and not rerecord:
        trace = RoutingTrace.load(path)
        if trace.meta.get("steps") == steps:
            return trace
    from moeflow.train.config import RunConfig
    from moeflow.train.trainer import train

    overrides = [
        "--model.moe.num_experts", str(experts),
        "--model.moe.ffn_hidden_size", str(max(32, 2048 // experts)),
        "--parallel.ep", "1", "--train.steps", str(steps), "--train.out_dir", str(out),
        "--train.eval_every", "0", "--metrics.progress", "false", "--metrics.plot", "false",
        "--placement.decay", "1.0", "--checkpoint.keep", "1",
    ]  # fmt: skip
    cfg = RunConfig.from_toml(ROOT / "examples" / "configs" / "tiny_cpu.toml", overrides)
    start = time.perf_counter()
    train(cfg, overwrite=True, quiet=True)
    seconds = time.perf_counter() - start
    print(f"  recorded demo routing, E={experts}: {steps} steps in {seconds:.0f} s")
    return RoutingTrace.load(path)


# -- 2. placement table ----------------------------------------------------------------------------
def placement_rows(name: str, trace: RoutingTrace, ranks: int, rpn: int, args, replicas=0.0):
    e = trace.num_experts
    num_slots = e + int(e * replicas) if replicas else None
    slots = -(-num_slots // ranks) if num_slots else None
    cfg = PlacementConfig(
        num_ranks=ranks, ranks_per_node=rpn, num_slots=num_slots, slots_per_rank=slots,
        time_limit_s=args.time_limit,
    )  # fmt: skip
    results = {m: plan(trace, cfg, m) for m in METHODS}
    greedy_obj = results["greedy"].metrics.objective
    label = name + (f" +{replicas:.0%} replicas" if replicas else "")
    for m, r in results.items():
        d = r.metrics.as_dict()
        status = r.status + (f" gap {r.gap:.1%}" if r.gap else "")
        if r.status == "time_limit" and r.gap is None:
            status += " (gap unknown)"
        if r.decomposition == "per-layer":
            status += ", per-layer"
        print(
            f"{label:<38}{e:>5}{ranks:>4}{rpn:>4} {m:<12}{d['max_mean_load']:>9.3f}"
            f"{d['cross_rank_fraction']:>8.1%}{d['cross_node_fraction']:>8.1%}"
            f"{r.metrics.objective:>12.0f}{r.metrics.objective / greedy_obj - 1:>+9.1%}"
            f"{r.seconds:>8.2f}  {status}"
        )
    return results


# -- 3. step time on gloo ranks --------------------------------------------------------------------
def skewed_layer(seed: int, hot_first: bool, hidden: int, ffn: int, experts: int) -> MoELayer:
    # The selection bias (aux-loss-free balancing's, with a negligible update rate that is never
    # applied here) makes the router prefer a Zipf-skewed set of experts; hot experts are the
    # first ids (layer 1) or every 4th id from 1 (layer 2): contiguous blocks put them together.
    cfg = MoEConfig(
        hidden_size=hidden, num_experts=experts, ffn_hidden_size=ffn,
        router=RouterConfig(top_k=2, bias_update_rate=1e-12),
    )  # fmt: skip
    torch.manual_seed(seed)
    layer = MoELayer(cfg)
    rank_of_hotness = torch.arange(experts) if hot_first else torch.tensor(
        [((e - 1) % 4) * (experts // 4) + (e - 1) // 4 for e in range(experts)]
    ) % experts  # fmt: skip
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.05)
        layer.router.expert_bias.copy_(-1.2 * torch.log1p(rank_of_hotness.float()))
    return layer


def step_time_rank(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(local_rank_env(rank, world, port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ctx = ParallelDims(ep=world).build()
    hidden, ffn, experts, tokens = 256, 512, 16, 2048
    names = ["0", "1"]

    def build(replicas: int):
        model = torch.nn.ModuleList(
            [skewed_layer(0, True, hidden, ffn, experts),
             skewed_layer(1, False, hidden, ffn, experts)]
        )  # fmt: skip
        parallelize(model, ctx, replica_slots=replicas)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    # The same two layers twice: E / ranks slots per rank, and one replica slot more per rank.
    models = {0: build(0), 1: build(1)}
    gen = torch.Generator().manual_seed(rank)

    def forward(model, x):
        y = x + model[0](x)
        return y + model[1](y)

    model = models[0][0]
    stats = RoutingStats(2, experts, decay=1.0)
    for _ in range(8):
        with torch.no_grad():
            forward(model, torch.randn(tokens, hidden, generator=gen))
        stats.observe([layer.last_stats.expert_ids for layer in model])
        stats.end_step()
    trace = stats.snapshot(ctx.world_group)
    decision = [None]
    if rank == 0:
        chosen = {}
        for replicas, methods in ((0, ("contiguous", "greedy", "ilp")), (1, ("greedy", "ilp"))):
            per_rank = experts // world + replicas
            cfg = PlacementConfig(
                num_ranks=world, slots_per_rank=per_rank, num_slots=per_rank * world,
                time_limit_s=args.time_limit,
            )  # fmt: skip
            for m in methods:
                r = plan(trace, cfg, m)
                label = m + (f" +{replicas} replica slot" if replicas else "")
                slots = [placement_slots(r.placement, i) for i in range(2)]
                chosen[label] = (replicas, slots, r.metrics.max_mean, r.status)
        decision[0] = chosen
    dist.broadcast_object_list(decision, src=0)
    chosen = decision[0]
    x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
    grad = torch.randn(tokens, hidden, generator=gen)

    times: dict[str, list[float]] = {m: [] for m in chosen}
    rows: dict[str, float] = {}
    observe = []
    for rep in range(args.repeats + 1):
        for label, (replicas, slots, _, _) in chosen.items():
            model, optimizer = models[replicas]
            apply_placement(model, dict(zip(names, slots, strict=True)), ctx.ep_group, optimizer)
            dist.barrier()
            t0 = time.perf_counter()
            forward(model, x).backward(grad)
            optimizer.zero_grad(set_to_none=True)
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if rep:  # the first round warms up
                times[label].append(t.item())
            received = torch.tensor(
                [float(sum(layer.last_stats.traffic.dispatch.output_splits[0])) for layer in model]
            )
            gathered = [torch.zeros(2) for _ in range(world)]
            dist.all_gather(gathered, received)
            per_rank = torch.stack(gathered)  # [ranks, layers]
            rows[label] = float((per_rank.max(0).values.sum() / per_rank.mean(0).sum()).item())
        t0 = time.perf_counter()
        stats.observe([layer.last_stats.expert_ids for layer in models[0][0]])
        stats.end_step()
        observe.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put(
            {
                m: (statistics.median(v) * 1e3, rows[m], chosen[m][2], chosen[m][3])
                for m, v in times.items()
            }
            | {"observe_ms": statistics.median(observe) * 1e3}
        )
    dist.barrier()
    dist.destroy_process_group()


def observe_cost(experts: int, tokens: int, layers: int = 4, repeats: int = 20) -> float:
    stats = RoutingStats(layers, experts)
    ids = [torch.randint(0, experts, (tokens, 2)) for _ in range(layers)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stats.observe(ids)
        stats.end_step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores | torch {torch.__version__} | "
        f"OMP_NUM_THREADS=1 | ILP time limit {args.time_limit} s (HiGHS via PuLP, 1 thread) | "
        "objective = sum of per-layer max rank loads + 0.1 x (intra-node + 4 x inter-node "
        "crossing tokens); ILP load bound: greedy's max + 5%"
    )
    traces: list[tuple[str, int, int, int, RoutingTrace, list[float]]] = []
    for e, r, rpn in SIZES:
        if not args.skip_record:
            demo = demo_trace(e, args.record_steps, args.rerecord)
            traces.append(("demo (recorded)", e, r, rpn, demo, [0.0]))
        traces.append(("synthetic affinity 0.8", e, r, rpn, synthetic_trace(e), [0.0, 0.25]))
        traces.append(("synthetic no affinity", e, r, rpn, synthetic_trace(e, affinity=0.0), [0.0]))
    head = (
        f"\n{'trace':<38}{'E':>5}{'R':>4}{'RpN':>4} {'method':<12}{'max/mean':>9}{'x-rank':>8}"
        f"{'x-node':>8}{'objective':>12}{'vs grdy':>9}{'solve s':>8}  status"
    )
    print(head)
    print("-" * (len(head) + 10))
    for name, _, r, rpn, trace, replicas in traces:
        for rep in replicas:
            placement_rows(name, trace, r, rpn, args, rep)
    print("\nRoutingStats.observe + end_step per step (4 MoE layers, top-2), median ms:")
    for e, tokens in ((16, 2048), (64, 8192), (256, 8192)):
        print(f"  E={e:<4} T={tokens:<5}: {observe_cost(e, tokens):.3f} ms")
    if args.skip_step_time:
        return
    world = 4
    queue = mp.get_context("spawn").Queue()
    port = free_port()
    procs = [
        mp.get_context("spawn").Process(target=step_time_rank, args=(k, world, port, args, queue))
        for k in range(world)
    ]
    for p in procs:
        p.start()
    res = queue.get(timeout=1800)
    for p in procs:
        p.join()
    observe_ms = res.pop("observe_ms")
    base = res["contiguous"][0]
    print(
        f"\nMoE step time on {world} gloo ranks (2 skewed MoE layers, E=16, D=256, F=512, top-2, "
        f"T=2048/rank, forward+backward, median of {args.repeats}, slowest rank):"
    )
    print(
        f"{'placement':<26}{'ms':>8}{'vs contiguous':>15}{'max/mean predicted':>20}"
        f"{'measured':>10}  status"
    )
    for m, (ms, measured, predicted, status) in res.items():
        print(f"{m:<26}{ms:>8.1f}{ms / base:>15.2f}{predicted:>20.3f}{measured:>10.3f}  {status}")
    print(f"RoutingStats.observe + end_step on this model: {observe_ms:.3f} ms per step "
          f"({observe_ms / base:.2%} of the contiguous step)")  # fmt: skip


if __name__ == "__main__":
    main()
