"""Building blocks of the placement ILP (`moeflow.placement.ilp`): one layer's assignment
variables and rows, the co-location terms between two layers (both free, or the first fixed),
reading a solution back and setting a warm start. The formulation is documented in `ilp`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeflow.placement.baselines import colocation_gain, copies_of
from moeflow.placement.problem import Placement, PlacementConfig
from moeflow.placement.trace import RoutingTrace


@dataclass
class LayerVars:
    copies: list[tuple[int, float]]  # (expert, load per copy)
    x: dict  # (copy, rank) -> LpVariable
    lam: object  # LpVariable


def layer_copies(placement: Placement, layer: int, trace: RoutingTrace) -> list[tuple[int, float]]:
    return copies_of(trace.loads[layer], placement.replica_counts(layer, trace.num_experts))


def add_layer(prob, layer: int, copies, cfg: PlacementConfig, slots, bound: float | None):
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
    return LayerVars(copies, x, lam)


def all_crossing(d_EE: np.ndarray, cfg: PlacementConfig) -> float:
    """Traffic cost if every token crossed: the objective's constant, from which the model's
    co-location terms subtract."""
    return cfg.traffic_weight * (cfg.node_weight if cfg.nodes > 1 else 1.0) * float(d_EE.sum())


def top_pairs(d_EE: np.ndarray, per_expert: int) -> list[tuple[int, int, float]]:
    pairs = []
    for i in range(d_EE.shape[0]):
        order = np.argsort(-d_EE[i], kind="stable")[:per_expert]
        pairs += [(i, int(j), float(d_EE[i, j])) for j in order if d_EE[i, j] > 0]
    return pairs


def copy_index(copies) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for c, (e, _) in enumerate(copies):
        out.setdefault(e, []).append(c)
    return out


def traffic_terms(prob, layer: int, a: LayerVars, b: LayerVars, d_EE, cfg: PlacementConfig) -> list:
    """Co-location variables for layers (layer, layer+1); returns the objective's terms."""
    import pulp

    ranks, nodes = range(cfg.num_ranks), range(cfg.nodes)
    rpn = cfg.ranks_per_node or cfg.num_ranks
    intra = cfg.nodes > 1 and rpn > 1  # both rank and node crossings exist
    rank_cost = 1.0 if cfg.nodes == 1 else (1.0 if intra else cfg.node_weight)
    ia, ib = copy_index(a.copies), copy_index(b.copies)
    terms = []
    for n_pair, (i, j, d) in enumerate(top_pairs(d_EE, cfg.max_pairs_per_expert)):
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


def fixed_traffic_terms(prev: Placement, layer: int, b: LayerVars, trace, cfg) -> list:
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


def read_layer(layer_vars: LayerVars, cfg: PlacementConfig) -> list[list[int]]:
    ranks: list[list[int]] = [[] for _ in range(cfg.num_ranks)]
    for c, (e, _) in enumerate(layer_vars.copies):
        values = [layer_vars.x[c, g].varValue or 0.0 for g in range(cfg.num_ranks)]
        ranks[int(np.argmax(values))].append(e)
    return ranks


def warm_start_layer(layer_vars: LayerVars, ranks: list[list[int]], cfg: PlacementConfig) -> None:
    """Set x from a placement (copies of one expert matched in rank order)."""
    queue: dict[int, list[int]] = {}
    for g, ids in enumerate(ranks):
        for e in ids:
            queue.setdefault(e, []).append(g)
    for c, (e, _) in enumerate(layer_vars.copies):
        g_c = queue[e].pop(0)
        for g in range(cfg.num_ranks):
            layer_vars.x[c, g].setInitialValue(1.0 if g == g_c else 0.0)


def lam_start(layer_vars: LayerVars, ranks, cfg) -> None:
    load = {e: w for e, w in layer_vars.copies}
    layer_vars.lam.setInitialValue(max(sum(load[e] for e in ids) for ids in ranks))
