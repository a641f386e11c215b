"""`moeflow plan STATS_FILE --ranks R --ranks-per-node G`: place experts from recorded routing.

Reads a routing statistics file (`<out_dir>/routing_stats.json`, written by `moeflow train`),
runs every placement method (or `--method`), and prints for each the predicted max/mean rank load,
the tokens that cross ranks and nodes between consecutive MoE layers, the objective, the solve
time and the solver's status; then the chosen method's placement (rank -> experts, per layer).
`--json OUT` also writes all of it, placements included.

Example:
    >>> import tempfile, pathlib
    >>> from moeflow.placement.trace import synthetic_trace
    >>> path = synthetic_trace(8, num_layers=2, tokens=500).save(
    ...     pathlib.Path(tempfile.mkdtemp()) / "stats.json")
    >>> cmd_plan([str(path), "--ranks", "2", "--method", "greedy", "--quiet"])
    0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moeflow.launch.arguments import OneLineParser
from moeflow.placement.planner import METHODS, PlanResult, plan
from moeflow.placement.problem import PlacementConfig
from moeflow.placement.solver import SolverUnavailableError
from moeflow.placement.trace import RoutingTrace
from moeflow.utils.paths import cannot_write


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="moeflow plan", allow_abbrev=False,
        description="Place experts on ranks from recorded routing statistics.",
    )  # fmt: skip
    p.add_argument("stats", help="routing statistics file (<out_dir>/routing_stats.json)")
    p.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks")
    p.add_argument("--ranks-per-node", type=int, default=None, help="default: one node")
    p.add_argument("--slots-per-rank", type=int, default=None, help="default: experts / ranks")
    p.add_argument(
        "--num-slots", type=int, default=None,
        help="expert copies in all (originals + replicas); default: the expert count",
    )  # fmt: skip
    p.add_argument("--method", choices=("all", *METHODS), default="all")
    p.add_argument("--show", choices=METHODS, default=None, help="placement to print (best)")
    p.add_argument("--traffic-weight", type=float, default=0.1)
    p.add_argument("--node-weight", type=float, default=4.0)
    p.add_argument(
        "--balance-slack", type=float, default=0.05,
        help="ILP: max load within this fraction of greedy's; negative: unbounded",
    )  # fmt: skip
    p.add_argument("--time-limit", type=float, default=5.0, help="ILP solver seconds")
    p.add_argument("--solver", choices=("auto", "highs", "cbc"), default="auto")
    p.add_argument("--decompose", choices=("auto", "none", "layer"), default="auto")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--force", action="store_true", help="with --json: replace an existing file")
    p.add_argument("--quiet", action="store_true", help="print nothing (with --json)")
    return p


def _table(results: list[PlanResult], trace: RoutingTrace) -> str:
    greedy = next((r for r in results if r.method == "greedy"), None)
    head = (
        f"{'method':<12}{'max/mean':>9}{'x-rank':>8}{'x-node':>8}{'objective':>12}"
        f"{'vs greedy':>10}{'solve s':>9}  status"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        m = r.metrics.as_dict()
        vs = ""
        if greedy is not None:
            vs = f"{r.metrics.objective / greedy.metrics.objective - 1:+.1%}"
        status = r.status + (f" (gap {r.gap:.2%})" if r.gap else "")
        if r.status == "time_limit" and r.gap is None:
            status += " (gap unknown)"
        if r.decomposition:
            status += f", {r.solver}, {r.decomposition}"
        lines.append(
            f"{r.method:<12}{m['max_mean_load']:>9.3f}{m['cross_rank_fraction']:>8.1%}"
            f"{m['cross_node_fraction']:>8.1%}{r.metrics.objective:>12.1f}{vs:>10}"
            f"{r.seconds:>9.2f}  {status}"
        )
    for r in results:
        lines += [f"note ({r.method}): {n}" for n in r.notes]
    return "\n".join(lines)


def _placement_text(result: PlanResult, trace: RoutingTrace) -> str:
    lines = [f"placement ({result.method}): rank -> logical experts"]
    for layer, ranks in enumerate(result.placement.layers):
        max_load = result.metrics.max_load[layer]
        lines.append(f"  {trace.layer_names[layer]} (max load {max_load:.0f})")
        lines += [f"    rank {g}: {sorted(ids)}" for g, ids in enumerate(ranks)]
    return "\n".join(lines)


def cmd_plan(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.json and Path(args.json).exists() and not args.force:
        raise ValueError(f"--json {args.json}: the file exists; pass --force to replace it")
    if args.json:  # before the solve: its minutes are not lost to a path that cannot be written
        problem = _unwritable(Path(args.json))
        if problem:
            raise ValueError(f"--json {args.json}: {problem}; choose another path")
    try:
        trace = RoutingTrace.load(args.stats)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    cfg = PlacementConfig(
        num_ranks=args.ranks, ranks_per_node=args.ranks_per_node,
        slots_per_rank=args.slots_per_rank, num_slots=args.num_slots,
        traffic_weight=args.traffic_weight, node_weight=args.node_weight,
        balance_slack=None if args.balance_slack < 0 else args.balance_slack,
        time_limit_s=args.time_limit, solver=args.solver, decompose=args.decompose,
    )  # fmt: skip
    methods = METHODS if args.method == "all" else (args.method,)
    try:
        results = [plan(trace, cfg, m) for m in methods]
    except SolverUnavailableError as exc:
        raise ValueError(str(exc)) from None
    shown = min(results, key=lambda r: (r.metrics.objective, r.method != "ilp"))
    if args.show is not None:
        shown = next((r for r in results if r.method == args.show), shown)
    if not args.quiet:
        print(
            f"{args.stats}: {trace.num_layers} MoE layers x {trace.num_experts} experts, "
            f"{cfg.num_ranks} ranks ({cfg.nodes} node(s)), traffic weight {cfg.traffic_weight}, "
            f"node weight {cfg.node_weight}"
        )
        print(_table(results, trace))
        print(_placement_text(shown, trace))
    if args.json:
        out = {
            "stats": str(args.stats),
            "results": [{**r.summary(), "placement": r.placement.layers} for r in results],
        }
        try:
            Path(args.json).write_text(json.dumps(out, indent=1))
        except OSError as exc:
            raise ValueError(
                f"--json {args.json} cannot be written: {exc.strerror or exc}; choose another path"
            ) from None
    return 0


def _unwritable(path: Path) -> str | None:
    """Why `path` cannot be written (its folder is missing or refuses a probe file), or None."""
    folder = path.parent
    if not folder.is_dir():
        return f"the folder {str(folder)!r} does not exist"
    problem = cannot_write(folder)
    return None if problem is None else f"the folder {str(folder)!r} is not writable ({problem})"
