"""The placement ILP (MoETuner's formulation, PAPERS.md "Expert placement"), in PuLP.

Shape legend: L MoE layers, E experts, R ranks, N nodes; a "copy" is an expert or one replica.

Joint model (`decompose="none"`), for copies c of layer l with load w_c (load / copies):
- `x[l,c,g] in {0,1}`: copy c on rank g. Each copy on one rank; rank g holds <= slots[g] copies;
  copies of one expert on distinct ranks.
- `Lambda_l >= sum_c w_c x[l,c,g]` for every g, and, with `balance_slack`,
  `Lambda_l <= (1 + slack) * greedy's max load of layer l` (PAPERS.md: a single weighted objective
  trades balance for locality; bound the max load and minimise traffic under it).
- For the heaviest `max_pairs_per_expert` successors j of each expert i (by `D[i,j]`), per copy
  pair: `y[p,g] <= x[l,i,g]`, `y[p,g] <= x[l+1,j,g]` (co-located on g); the same over nodes
  (`z[p,n]`). Pairs left out count as crossing (an upper bound; `evaluate` scores the real value).
- minimise `sum_l Lambda_l + lambda * sum_p D_p * ((1 - sum_g y) + (node_weight - 1)(1 - sum_n z))`.

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

import time
from dataclasses import dataclass

import numpy as np

from moeflow.placement.baselines import (
    affinity_greedy,
    affinity_layer,
    colocation_gain,
    copies_of,
)
from moeflow.placement.problem import Placement, PlacementConfig, evaluate
from moeflow.placement.solver import SolveInfo, pick_solver, run_solver
from moeflow.placement.trace import RoutingTrace


# -- model building -----------------------------------------------------------------------------
@dataclass
class _Layer:
    copies: list[tuple[int, float]]  # (expert, load per copy)
    x: dict  # (copy, rank) -> LpVariable
    lam: object  # LpVariable


def _copies_of(placement: Placement, layer: int, trace: RoutingTrace) -> list[tuple[int, float]]:
    return copies_of(trace.loads[layer], placement.replica_counts(layer, trace.num_experts))


def _add_layer(prob, layer: int, copies, cfg: PlacementConfig, slots, bound: float | None):
    import pulp

    ranks = range(cfg.num_ranks)
    x = {
        (c, g): pulp.LpVariable(f"x_{layer}_{c}_{g}", cat=pulp.LpBinary)
        for c in range(len(copies))
        for g in ranks
    }
    # Valid lower bounds that the LP relaxation would not find: no rank is below the mean, and
    # the rank holding the heaviest copy carries at least that copy.
    floor = max(max(w for _, w in copies), sum(w for _, w in copies) / cfg.num_ranks)
    lam = pulp.LpVariable(f"lam_{layer}", lowBound=floor, upBound=bound)
    for c in range(len(copies)):
        prob += pulp.lpSum(x[c, g] for g in ranks) == 1, f"one_{layer}_{c}"
    for g in ranks:
        prob += pulp.lpSum(x[c, g] for c in range(len(copies))) <= slots[g], f"slots_{layer}_{g}"
        prob += (
            pulp.lpSum(w * x[c, g] for c, (_, w) in enumerate(copies)) <= lam,
            f"load_{layer}_{g}",
        )
    by_expert: dict[int, list[int]] = {}
    for c, (e, _) in enumerate(copies):
        by_expert.setdefault(e, []).append(c)
    for e, cs in by_expert.items():
        if len(cs) > 1:
            for g in ranks:
                prob += pulp.lpSum(x[c, g] for c in cs) <= 1, f"distinct_{layer}_{e}_{g}"
    return _Layer(copies, x, lam)


def _all_crossing(d_EE: np.ndarray, cfg: PlacementConfig) -> float:
    """Traffic cost if every token crossed: the objective's constant, from which the model's
    co-location terms subtract."""
    return cfg.traffic_weight * (cfg.node_weight if cfg.nodes > 1 else 1.0) * float(d_EE.sum())


def _top_pairs(d_EE: np.ndarray, per_expert: int) -> list[tuple[int, int, float]]:
    pairs = []
    for i in range(d_EE.shape[0]):
        order = np.argsort(-d_EE[i], kind="stable")[:per_expert]
        pairs += [(i, int(j), float(d_EE[i, j])) for j in order if d_EE[i, j] > 0]
    return pairs


def _copy_index(copies) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for c, (e, _) in enumerate(copies):
        out.setdefault(e, []).append(c)
    return out


def _traffic_terms(prob, layer: int, a: _Layer, b: _Layer, d_EE, cfg: PlacementConfig) -> list:
    """Co-location variables for layers (layer, layer+1); returns the objective's terms."""
    import pulp

    ranks, nodes = range(cfg.num_ranks), range(cfg.nodes)
    rpn = cfg.ranks_per_node or cfg.num_ranks
    intra = cfg.nodes > 1 and rpn > 1  # both rank and node crossings exist
    rank_cost = 1.0 if cfg.nodes == 1 else (1.0 if intra else cfg.node_weight)
    ia, ib = _copy_index(a.copies), _copy_index(b.copies)
    terms = []
    for n_pair, (i, j, d) in enumerate(_top_pairs(d_EE, cfg.max_pairs_per_expert)):
        w = cfg.traffic_weight * d / (len(ia[i]) * len(ib[j]))
        for ca in ia[i]:
            for cb in ib[j]:
                tag = f"{layer}_{n_pair}_{ca}_{cb}"
                y = [pulp.LpVariable(f"y_{tag}_{g}", 0, 1) for g in ranks]
                for g in ranks:
                    prob += y[g] <= a.x[ca, g]
                    prob += y[g] <= b.x[cb, g]
                terms += [(yg, -w * rank_cost) for yg in y]
                if intra:
                    z = [pulp.LpVariable(f"z_{tag}_{n}", 0, 1) for n in nodes]
                    for n in nodes:
                        members = range(n * rpn, (n + 1) * rpn)
                        prob += z[n] <= pulp.lpSum(a.x[ca, g] for g in members)
                        prob += z[n] <= pulp.lpSum(b.x[cb, g] for g in members)
                    terms += [(zn, -w * (cfg.node_weight - 1.0)) for zn in z]
    return terms


def _fixed_traffic_terms(prev: Placement, layer: int, b: _Layer, trace, cfg) -> list:
    """Layer `layer` fixed by `prev`, layer+1 free in `b`: co-location is linear in b's x, with
    every co-routing pair in its coefficients (no sparsification)."""
    gain_ER = colocation_gain(trace, cfg, prev, layer)
    counts = {}
    for e, _ in b.copies:
        counts[e] = counts.get(e, 0) + 1
    return [
        (b.x[c, g], -gain_ER[e, g] / counts[e])
        for c, (e, _) in enumerate(b.copies)
        for g in range(cfg.num_ranks)
        if gain_ER[e, g] > 0
    ]


# -- solving ------------------------------------------------------------------------------------
def _read(layer_vars: _Layer, cfg: PlacementConfig) -> list[list[int]]:
    ranks: list[list[int]] = [[] for _ in range(cfg.num_ranks)]
    for c, (e, _) in enumerate(layer_vars.copies):
        values = [layer_vars.x[c, g].varValue or 0.0 for g in range(cfg.num_ranks)]
        ranks[int(np.argmax(values))].append(e)
    return ranks


def _warm_start(layer_vars: _Layer, ranks: list[list[int]], cfg: PlacementConfig) -> None:
    """Set x from a placement (copies of one expert matched in rank order)."""
    queue: dict[int, list[int]] = {}
    for g, ids in enumerate(ranks):
        for e in ids:
            queue.setdefault(e, []).append(g)
    for c, (e, _) in enumerate(layer_vars.copies):
        g_c = queue[e].pop(0)
        for g in range(cfg.num_ranks):
            layer_vars.x[c, g].setInitialValue(1.0 if g == g_c else 0.0)


def _bound(trace, warm: Placement, cfg: PlacementConfig, layer: int) -> float | None:
    if cfg.balance_slack is None:
        return None
    a = warm.fractions(layer, trace.num_experts)
    return float((trace.loads[layer] @ a).max()) * (1.0 + cfg.balance_slack) + 1e-6


def _lam_start(layer_vars: _Layer, ranks, cfg) -> None:
    load = {e: w for e, w in layer_vars.copies}
    layer_vars.lam.setInitialValue(max(sum(load[e] for e in ids) for ids in ranks))


def _solve_joint(trace, cfg, warm: Placement, bounds, solver: str):
    import pulp

    deadline = time.perf_counter() + cfg.time_limit_s  # model building counts too
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    slots = cfg.slots(trace.num_experts)
    warm, breaking = _symmetry_breaking(warm, cfg, slots)
    layers = []
    for layer in range(trace.num_layers):
        lv = _add_layer(prob, layer, _copies_of(warm, layer, trace), cfg, slots, bounds[layer])
        if layer == 0:
            for c, g in breaking(len(lv.copies)):
                prob += lv.x[c, g] == 0, f"symmetry_{c}_{g}"
        _warm_start(lv, warm.layers[layer], cfg)
        _lam_start(lv, warm.layers[layer], cfg)
        layers.append(lv)
    terms = []
    for layer in range(trace.num_layers - 1):
        terms += _traffic_terms(
            prob, layer, layers[layer], layers[layer + 1], trace.co_routing[layer], cfg
        )
    constant = sum(_all_crossing(trace.co_routing[layer], cfg) for layer in range(len(layers) - 1))
    prob += pulp.lpSum(lv.lam for lv in layers) + pulp.LpAffineExpression(terms, constant)
    _set_co_location_start(prob)
    left = max(deadline - time.perf_counter(), 0.05)
    status, gap = run_solver(prob, solver, cfg, left, warm=True)
    if status == "failed":
        return warm, status, gap
    return Placement([_read(lv, cfg) for lv in layers]), status, gap


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


def _solve_per_layer(trace, cfg, warm: Placement, base: Placement, bounds, solver: str):
    import pulp

    slots = cfg.slots(trace.num_experts)
    # One budget for the whole solve, model building included: each layer gets an even share
    # of what is left, so time a quick layer does not use goes to the layers after it.
    deadline = time.perf_counter() + cfg.time_limit_s
    placed = Placement([list(map(list, ranks)) for ranks in warm.layers])
    statuses, gaps = [], []
    for layer in range(trace.num_layers):
        prob = pulp.LpProblem(f"placement_layer_{layer}", pulp.LpMinimize)
        lv = _add_layer(prob, layer, _copies_of(warm, layer, trace), cfg, slots, bounds[layer])
        terms, constant = [], 0.0
        if layer > 0:
            terms = _fixed_traffic_terms(placed, layer - 1, lv, trace, cfg)
            constant = _all_crossing(trace.co_routing[layer - 1], cfg)
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
        _warm_start(lv, start, cfg)
        _lam_start(lv, start, cfg)
        left = (deadline - time.perf_counter()) / (trace.num_layers - layer)
        status, gap = run_solver(prob, solver, cfg, max(left, 0.05), warm=True)
        statuses.append(status)
        gaps.append(gap)
        if status != "failed":
            placed.layers[layer] = _read(lv, cfg)
    if "failed" in statuses:
        status = "failed"
    elif all(s == "optimal" for s in statuses):
        status = "optimal"
    else:
        status = "time_limit"
    known = [g for g in gaps if g is not None]
    gap = max(known) if known and len(known) == len(gaps) else None
    return placed, status, gap


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
    base = warm
    bounds = [_bound(trace, base, cfg, layer) for layer in range(trace.num_layers)]
    affinity = affinity_greedy(trace, cfg, warm)
    fits = all(
        b is None or (trace.loads[layer] @ affinity.fractions(layer, trace.num_experts)).max() <= b
        for layer, b in enumerate(bounds)
    )
    if fits and evaluate(trace, affinity, cfg).objective < evaluate(trace, warm, cfg).objective:
        warm = affinity
    mode = cfg.decompose
    if mode == "auto":
        big = joint_binaries(trace, cfg) > cfg.max_joint_binaries
        mode = "layer" if big and trace.num_layers > 1 else "none"
    if mode == "none":
        placement, status, gap = _solve_joint(trace, cfg, warm, bounds, solver)
        info = SolveInfo(status, solver, 0.0, "joint", gap)
    else:
        placement, status, gap = _solve_per_layer(trace, cfg, warm, base, bounds, solver)
        info = SolveInfo(status, solver, 0.0, "per-layer", gap, subproblems=trace.num_layers)
        info.notes.append(
            f"decomposed: {trace.num_layers} layers solved one after another (each with the "
            "previous layer fixed); optimal per layer, not jointly"
        )
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
