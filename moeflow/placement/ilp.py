"""The placement ILP (MoETuner's formulation; docs/methods.md, "Expert placement"), in PuLP.

Shape legend: L MoE layers, E experts, R ranks, N nodes; a "copy" is an expert or one replica.

Joint model (`decompose="none"`), for copies c of layer l with load w_c (load / copies):
- `x[l,c,g] in {0,1}`: copy c on rank g. Each copy on one rank; rank g holds <= slots[g] copies;
  copies of one expert on distinct ranks.
- `Lambda_l >= sum_c w_c x[l,c,g]` for every g, and, with `balance_slack`,
  `Lambda_l <= (1 + slack) * greedy's max load of layer l` (docs/methods.md: a single weighted
  objective trades balance for locality; bound the max load and minimise traffic under it).
- For the heaviest `max_pairs_per_expert` successors j of each expert i (by `D[i,j]`), per copy
  pair: `y[p,g] <= x[l,i,g]`, `y[p,g] <= x[l+1,j,g]` (co-located on g); the same over nodes
  (`z[p,n]`). Pairs left out count as crossing (an upper bound; `evaluate` scores the real value).
- minimise `sum_l Lambda_l + lambda * sum_p D_p * ((1 - sum_g y) + (node_weight - 1)(1 - sum_n z))`.

`decompose="auto"`: one layer, the joint model; past `max_joint_binaries`, the per-layer
decomposition below; otherwise both, the per-layer one first (a third of the budget), then the
joint model warm-started from its result, keeping the better (never worse than per-layer alone).
Past `max_layer_binaries` per layer no model is built: the greedy warm start is returned with
the status `too_large` and a note, in bounded time.

Per-layer decomposition (`decompose="layer"`, or "auto" past `max_joint_binaries`): layer 0 for
balance alone, then each layer l+1 with layer l fixed. The co-location terms become linear in x
(no y, z), so each sub-model is an assignment problem with load rows; the time limit is split
over the layers (each gets an even share of what is left). Not a global optimum:
`SolveInfo.decomposition` is "per-layer" and a note says so. The co-location coefficients use
every co-routing pair here (no sparsification).

Warm start: the better of greedy and `affinity_greedy` (greedy's layer 0, then each layer placed
next to its predecessor's experts within the load bound); in the per-layer mode each layer starts
from the better of its greedy packing and the affinity greedy given the layer just solved. The
interchangeable ranks are broken (`_symmetry_breaking`), and each Lambda_l has the valid floor
max(heaviest copy, mean load), which the LP relaxation alone does not see.

Solvers (HiGHS, CBC as fallback, warm-started) and their honest status: `moeflow.placement.solver`.

Example:
    >>> import numpy as np
    >>> from moeflow.placement.baselines import greedy
    >>> trace = RoutingTrace(np.array([[5.0, 3.0, 3.0, 1.0]]), np.zeros((0, 4, 4)))
    >>> cfg = PlacementConfig(num_ranks=2, solver="cbc")
    >>> placement, info = solve_ilp(trace, cfg, greedy(trace, cfg))
    >>> sorted(map(sorted, placement.layers[0])), info.status
    ([[0, 3], [1, 2]], 'optimal')
"""

from __future__ import annotations

import math
import time

from moeflow.placement.baselines import affinity_greedy, affinity_layer, colocation_gain
from moeflow.placement.ilp_model import (
    add_layer,
    all_crossing,
    fixed_traffic_terms,
    lam_start,
    layer_copies,
    read_layer,
    traffic_terms,
    warm_start_layer,
)
from moeflow.placement.problem import Placement, PlacementConfig, evaluate
from moeflow.placement.solver import SolveInfo, pick_solver, run_solver
from moeflow.placement.trace import RoutingTrace


# -- solving ------------------------------------------------------------------------------------
def _bound(trace, warm: Placement, cfg: PlacementConfig, layer: int) -> float | None:
    if cfg.balance_slack is None:
        return None
    max_load = float(warm.rank_loads(layer, trace.loads[layer]).max())
    return max_load * (1.0 + cfg.balance_slack) + 1e-6


def _solve_joint(trace, cfg, warm: Placement, bounds, solver: str, budget: float):
    import pulp

    deadline = time.perf_counter() + budget  # model building counts too
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    slots = cfg.slots(trace.num_experts)
    warm, breaking = _symmetry_breaking(warm, cfg, slots)
    layers = []
    for layer in range(trace.num_layers):
        lv = add_layer(prob, layer, layer_copies(warm, layer, trace), cfg, slots, bounds[layer])
        if layer == 0:
            for c, g in breaking(len(lv.copies)):
                prob += lv.x[c, g] == 0, f"symmetry_{c}_{g}"
        warm_start_layer(lv, warm.layers[layer], cfg)
        lam_start(lv, warm.layers[layer], cfg)
        layers.append(lv)
    terms = []
    for layer in range(trace.num_layers - 1):
        terms += traffic_terms(
            prob, layer, layers[layer], layers[layer + 1], trace.co_routing[layer], cfg
        )
    constant = sum(all_crossing(trace.co_routing[layer], cfg) for layer in range(len(layers) - 1))
    prob += pulp.lpSum(lv.lam for lv in layers) + pulp.LpAffineExpression(terms, constant)
    _set_co_location_start(prob)
    left = max(deadline - time.perf_counter(), 0.05)
    status, gap = run_solver(prob, solver, cfg, left, warm=True)
    if status == "failed":
        return warm, status, gap
    return Placement([read_layer(lv, cfg) for lv in layers]), status, gap


def _symmetry_breaking(warm: Placement, cfg: PlacementConfig, slots: list[int]):
    """Relabel `warm`'s ranks into canonical form, and return (the relabelled placement, a
    function giving the (copy, rank) pairs of layer 0 to forbid). Interchangeable ranks make
    many equal optima: with equal slots and all ranks alike (one node, or one rank per node),
    copy c of layer 0 may only sit on ranks <= c (labels in order of first use); with several
    multi-rank nodes, copy 0 sits on rank 0 (swap nodes, then ranks within the node)."""
    if len(set(slots)) != 1:
        return warm, lambda n: []
    rpn = cfg.ranks_per_node or cfg.num_ranks
    order: list[int] = []
    if cfg.nodes == 1 or rpn == 1:
        for e in sorted({e for ids in warm.layers[0] for e in ids}):
            order += [g for g in range(cfg.num_ranks) if e in warm.layers[0][g] and g not in order]
        order += [g for g in range(cfg.num_ranks) if g not in order]

        def forbid(n: int) -> list[tuple[int, int]]:
            return [(c, g) for c in range(n) for g in range(c + 1, cfg.num_ranks)]

    else:
        holder = min(g for g in range(cfg.num_ranks) if 0 in warm.layers[0][g])  # copy 0's
        node = holder // rpn
        nodes = [node] + [n for n in range(cfg.nodes) if n != node]
        for n in nodes:
            members = list(range(n * rpn, (n + 1) * rpn))
            if n == node:
                members.remove(holder)
                members.insert(0, holder)
            order += members

        def forbid(n: int) -> list[tuple[int, int]]:
            return [(0, g) for g in range(1, cfg.num_ranks)]

    # order[new label] = old rank
    relabelled = Placement([[list(ranks[old]) for old in order] for ranks in warm.layers])
    return relabelled, forbid


def _set_co_location_start(prob) -> None:
    """y, z start at the largest value their constraints allow under the x start."""
    import pulp

    upper: dict[str, float] = {}
    for constraint in prob.constraints.values():
        if constraint.sense != pulp.LpConstraintLE:
            continue
        names = [v.name for v in constraint if v.name[0] in "yz"]
        if len(names) != 1:
            continue
        var_name = names[0]
        rest = sum(
            (coef * (v.varValue or 0.0)) for v, coef in constraint.items() if v.name != var_name
        )
        upper[var_name] = min(upper.get(var_name, 1.0), max(0.0, -rest))
    for v in prob.variables():
        if v.name[0] in "yz":
            v.setInitialValue(round(upper.get(v.name, 0.0)))


def _solve_per_layer(
    trace, cfg, warm: Placement, base: Placement, bounds, solver: str, budget: float
):
    import pulp

    slots = cfg.slots(trace.num_experts)
    # One budget for the whole solve, model building included: each layer gets an even share
    # of what is left, so time a quick layer does not use goes to the layers after it.
    deadline = time.perf_counter() + budget
    placed = Placement([list(map(list, ranks)) for ranks in warm.layers])
    statuses, gaps = [], []
    for layer in range(trace.num_layers):
        prob = pulp.LpProblem(f"placement_layer_{layer}", pulp.LpMinimize)
        lv = add_layer(prob, layer, layer_copies(warm, layer, trace), cfg, slots, bounds[layer])
        terms, constant = [], 0.0
        if layer > 0:
            terms = fixed_traffic_terms(placed, layer - 1, lv, trace, cfg)
            constant = all_crossing(trace.co_routing[layer - 1], cfg)
        prob += lv.lam + pulp.LpAffineExpression(terms, constant)
        # Warm start: the affinity greedy given the layer just solved, if it fits the bound and
        # scores better than the warm placement's own layer.
        start = warm.layers[layer]
        if layer > 0:
            candidate = affinity_layer(trace, cfg, base, placed, layer)
            if _layer_cost(trace, cfg, placed, layer, candidate, bounds[layer]) < _layer_cost(
                trace, cfg, placed, layer, start, bounds[layer]
            ):
                start = candidate
        warm_start_layer(lv, start, cfg)
        lam_start(lv, start, cfg)
        left = (deadline - time.perf_counter()) / (trace.num_layers - layer)
        status, gap = run_solver(prob, solver, cfg, max(left, 0.05), warm=True)
        statuses.append(status)
        gaps.append(gap)
        if status != "failed":
            placed.layers[layer] = read_layer(lv, cfg)
    if "failed" in statuses:
        status = "failed"
    elif all(s == "optimal" for s in statuses):
        status = "optimal"
    else:
        status = "time_limit"
    known = [g for g in gaps if g is not None]
    gap = max(known) if known and len(known) == len(gaps) else None
    return placed, status, gap


def _per_layer_then_joint(trace, cfg, warm, base, bounds, solver) -> tuple[Placement, SolveInfo]:
    """`decompose="auto"`: the per-layer decomposition with a third of the budget, then the
    joint model warm-started from the better of it and `warm` with the rest; the better of the
    two by `evaluate` (so auto is never worse than the per-layer decomposition)."""
    deadline = time.perf_counter() + cfg.time_limit_s
    layered, l_status, l_gap = _solve_per_layer(
        trace, cfg, warm, base, bounds, solver, cfg.time_limit_s / 3
    )
    if l_status != "failed":
        layered.validate(trace, cfg)
    score = {
        "warm": evaluate(trace, warm, cfg).objective,
        "layered": evaluate(trace, layered, cfg).objective if l_status != "failed" else math.inf,
    }
    start = layered if score["layered"] < score["warm"] else warm
    left = max(deadline - time.perf_counter(), 0.05)
    joint, j_status, j_gap = _solve_joint(trace, cfg, start, bounds, solver, left)
    score["joint"] = evaluate(trace, joint, cfg).objective if j_status != "failed" else math.inf
    notes = [
        f"auto: per-layer decomposition first ({score['layered']:.1f}, {l_status}), then the "
        f"joint model from the better start ({score['joint']:.1f}, {j_status})"
    ]
    if score["joint"] <= score["layered"]:
        return joint, SolveInfo(j_status, solver, 0.0, "joint", j_gap, notes=notes)
    notes.append("kept the per-layer placement (the joint model did not improve on it)")
    info = SolveInfo(l_status, solver, 0.0, "per-layer", l_gap, trace.num_layers, notes)
    return layered, info


def _layer_cost(trace, cfg, placed: Placement, layer: int, ranks, bound) -> float:
    """Max load of `ranks` plus its traffic cost to `placed`'s previous layer (inf above bound)."""
    trial = Placement([*placed.layers[:layer], ranks])
    a_ER = trial.fractions(layer, trace.num_experts)
    max_load = float((trace.loads[layer] @ a_ER).max())
    if bound is not None and max_load > bound:
        return float("inf")
    gain = colocation_gain(trace, cfg, trial, layer - 1)
    return max_load - float((gain * a_ER).sum())


def joint_binaries(trace: RoutingTrace, cfg: PlacementConfig) -> int:
    """Binary variables of the joint model (copies x ranks, summed over layers)."""
    return trace.num_layers * cfg.total_slots(trace.num_experts) * cfg.num_ranks


def solve_ilp(
    trace: RoutingTrace, cfg: PlacementConfig, warm: Placement
) -> tuple[Placement, SolveInfo]:
    """Solve the placement ILP, warm-started (and replica counts fixed) by `warm`, normally the
    greedy placement. Never returns a placement worse than `warm` on `evaluate`'s objective: when
    the solver's is worse (a decomposed model, sparsified pairs) or it fails, `warm` is returned
    and the notes say so. Raises `SolverUnavailableError` when no solver can run."""
    solver = pick_solver(cfg)
    start = time.perf_counter()
    per_layer = cfg.total_slots(trace.num_experts) * cfg.num_ranks
    if per_layer > cfg.max_layer_binaries:
        info = SolveInfo("too_large", solver, time.perf_counter() - start, "none")
        info.notes.append(
            f"the ILP would have {per_layer} binaries per layer, past "
            f"placement.max_layer_binaries ({cfg.max_layer_binaries}); kept the greedy warm "
            "start (raise the limit, or place fewer, coarser slots)"
        )
        return warm, info
    base = warm
    bounds = [_bound(trace, base, cfg, layer) for layer in range(trace.num_layers)]
    affinity = affinity_greedy(trace, cfg, warm)
    fits = all(
        b is None or affinity.rank_loads(layer, trace.loads[layer]).max() <= b
        for layer, b in enumerate(bounds)
    )
    if fits and evaluate(trace, affinity, cfg).objective < evaluate(trace, warm, cfg).objective:
        warm = affinity
    mode = cfg.decompose
    if mode == "auto":
        big = joint_binaries(trace, cfg) > cfg.max_joint_binaries
        mode = "none" if trace.num_layers == 1 else ("layer" if big else "both")
    if mode == "none":
        placement, status, gap = _solve_joint(trace, cfg, warm, bounds, solver, cfg.time_limit_s)
        info = SolveInfo(status, solver, 0.0, "joint", gap)
    elif mode == "layer":
        placement, status, gap = _solve_per_layer(
            trace, cfg, warm, base, bounds, solver, cfg.time_limit_s
        )
        info = SolveInfo(status, solver, 0.0, "per-layer", gap, subproblems=trace.num_layers)
        info.notes.append(
            f"decomposed: {trace.num_layers} layers solved one after another (each with the "
            "previous layer fixed); optimal per layer, not jointly"
        )
    else:  # auto on a joint model small enough: per layer first, then jointly from the better
        placement, info = _per_layer_then_joint(trace, cfg, warm, base, bounds, solver)
        status = info.status
    info.seconds = time.perf_counter() - start
    sparse = any((d > 0).sum(axis=1).max() > cfg.max_pairs_per_expert for d in trace.co_routing)
    if mode == "none" and sparse:
        info.notes.append(
            f"co-routing sparsified to the {cfg.max_pairs_per_expert} heaviest successors per "
            "expert; the rest count as crossing in the model (scores use all of them)"
        )
    if status == "failed":
        info.notes.append("the solver found no solution in its time limit; kept the warm start")
        return warm, info
    placement.validate(trace, cfg)
    if evaluate(trace, placement, cfg).objective > evaluate(trace, warm, cfg).objective + 1e-9:
        info.notes.append("the solver's placement scored worse than the warm start; kept it")
        return warm, info
    return placement, info
