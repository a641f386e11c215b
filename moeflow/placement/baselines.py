"""Placements without a solver: contiguous blocks (moeflow's default), round-robin, and greedy
balanced packing with hot-expert replication (DeepSeek EPLB's method; docs/methods.md, "Expert
placement").

Greedy, per layer:
1. Replicas: start with one copy per expert; while copies < `num_slots`, give one more copy to the
   expert with the largest load per copy (at most one copy per rank).
2. Packing: copies by load per copy, largest first, each onto the least-loaded rank that has a free
   slot and no copy of the same expert (ties: the lowest rank).

Example:
    >>> import numpy as np
    >>> trace = RoutingTrace(np.array([[8.0, 1.0, 1.0, 6.0]]), np.zeros((0, 4, 4)))
    >>> cfg = PlacementConfig(num_ranks=2)
    >>> contiguous(trace, cfg).layers, greedy(trace, cfg).layers
    ([[[0, 1], [2, 3]]], [[[0, 2], [3, 1]]])
"""

from __future__ import annotations

import heapq

import numpy as np

from moeflow.placement.problem import Placement, PlacementConfig
from moeflow.placement.trace import RoutingTrace


def replica_counts(load_E: np.ndarray, num_slots: int, num_ranks: int) -> np.ndarray:
    """Copies per expert (EPLB's rule: each extra copy to the largest load per copy, ties to the
    lowest id; at most one copy per rank). A heap: O((E + extra copies) log E)."""
    counts = np.ones(len(load_E), dtype=np.int64)
    extra = num_slots - len(load_E)
    if extra <= 0 or num_ranks == 1:
        return counts
    heap = [(-float(w), e) for e, w in enumerate(load_E)]
    heapq.heapify(heap)
    for _ in range(extra):
        if not heap:
            break
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < num_ranks:
            heapq.heappush(heap, (-float(load_E[e] / counts[e]), e))
    return counts


def copies_of(load_E: np.ndarray, counts: np.ndarray) -> list[tuple[int, float]]:
    """(expert, load per copy) for every copy of every expert, in expert order."""
    per_copy = (load_E / counts).tolist()
    return [(e, per_copy[e]) for e, n in enumerate(counts.tolist()) for _ in range(n)]


def _copies(trace: RoutingTrace, cfg: PlacementConfig, layer: int) -> list[tuple[int, float]]:
    """`layer`'s copies, with EPLB's replica counts for the slot budget."""
    budget = cfg.total_slots(trace.num_experts)
    return copies_of(trace.loads[layer], replica_counts(trace.loads[layer], budget, cfg.num_ranks))


def _pack(copies, slots: list[int], layer: int, choose) -> list[list[int]]:
    """Copies heaviest first, each onto `choose(e, w, free ranks, loads)` among the ranks with a
    free slot and no copy of the same expert."""
    ranks: list[list[int]] = [[] for _ in slots]
    held: list[set[int]] = [set() for _ in slots]
    load = np.zeros(len(slots))
    for e, w in sorted(copies, key=lambda c: (-c[1], c[0])):
        free = [g for g in range(len(slots)) if len(ranks[g]) < slots[g] and e not in held[g]]
        if not free:
            raise ValueError(f"layer {layer}: no rank can take another copy of expert {e}")
        g = choose(e, w, free, load)
        ranks[g].append(e)
        held[g].add(e)
        load[g] += w
    return ranks


def _pack_least_loaded(copies, slots: list[int], layer: int) -> list[list[int]]:
    """`_pack` with the least-loaded free rank (ties: the lowest) chosen from a heap of
    `(load, rank)` over ranks with a free slot: O(copies log R), the same placement."""
    ranks: list[list[int]] = [[] for _ in slots]
    held: list[set[int]] = [set() for _ in slots]
    heap = [(0.0, g) for g, n in enumerate(slots) if n > 0]
    for e, w in sorted(copies, key=lambda c: (-c[1], c[0])):
        skipped = []
        while heap and e in held[heap[0][1]]:
            skipped.append(heapq.heappop(heap))
        if not heap:
            raise ValueError(f"layer {layer}: no rank can take another copy of expert {e}")
        load, g = heapq.heappop(heap)
        ranks[g].append(e)
        held[g].add(e)
        if len(ranks[g]) < slots[g]:
            heapq.heappush(heap, (load + w, g))
        for item in skipped:
            heapq.heappush(heap, item)
    return ranks


def _least_loaded(e: int, w: float, free: list[int], load: np.ndarray) -> int:
    return min(free, key=lambda r: (load[r], r))


def _fill_in_order(copies: list[int], slots: list[int], start: int = 0, stride: bool = False):
    """Place copies rank by rank (`stride=False`) or cycling over ranks (`stride=True`), skipping
    full ranks and ranks that already hold the expert. When only ranks holding the expert have
    free slots left, a copy placed earlier moves into one of them to make room (`_make_room`)."""
    ranks: list[list[int]] = [[] for _ in slots]
    held: list[set[int]] = [set() for _ in slots]
    open_ranks = sum(1 for n in slots if n > 0)
    g = start
    for e in copies:
        for _ in range(len(slots)):
            if len(ranks[g]) < slots[g] and e not in held[g]:
                break
            g = (g + 1) % len(slots)
        else:
            g = _make_room(e, ranks, held, slots)
        ranks[g].append(e)
        held[g].add(e)
        if len(ranks[g]) == slots[g]:
            open_ranks -= 1
        if stride or (len(ranks[g]) == slots[g] and open_ranks):
            g = (g + 1) % len(slots)
    return ranks


def _make_room(e: int, ranks, held, slots) -> int:
    """A rank for a copy of `e` when every rank with a free slot holds `e`: move some copy `d`
    from a rank `h` without `e` to a free rank `f` without `d`; `e` then takes its slot on `h`."""
    free = [f for f in range(len(slots)) if len(ranks[f]) < slots[f]]
    for h in range(len(slots)):
        if e in held[h]:
            continue
        for i, d in enumerate(ranks[h]):
            f = next((f for f in free if d not in held[f]), None)
            if f is not None:
                ranks[f].append(d)
                held[f].add(d)
                del ranks[h][i]
                held[h].discard(d)
                return h
    raise ValueError(f"no rank can take another copy of expert {e}")


def contiguous(trace: RoutingTrace, cfg: PlacementConfig) -> Placement:
    """Expert e on rank e // S: what `parallelize` does when given no map."""
    slots = cfg.slots(trace.num_experts)
    return Placement(
        [
            _fill_in_order([e for e, _ in _copies(trace, cfg, layer)], slots)
            for layer in range(trace.num_layers)
        ]
    )


def round_robin(trace: RoutingTrace, cfg: PlacementConfig) -> Placement:
    """Copy k on rank k mod R (skipping full ranks)."""
    slots = cfg.slots(trace.num_experts)
    return Placement(
        [
            _fill_in_order([e for e, _ in _copies(trace, cfg, layer)], slots, stride=True)
            for layer in range(trace.num_layers)
        ]
    )


def greedy(trace: RoutingTrace, cfg: PlacementConfig) -> Placement:
    """EPLB: replicate hot experts, then balanced packing (see the module doc)."""
    slots = cfg.slots(trace.num_experts)
    return Placement(
        [
            _pack_least_loaded(_copies(trace, cfg, layer), slots, layer)
            for layer in range(trace.num_layers)
        ]
    )


def colocation_gain(
    trace: RoutingTrace, cfg: PlacementConfig, placed: Placement, layer: int
) -> np.ndarray:
    """`[E, R]`: traffic cost saved (objective units) per token share of expert j of `layer` + 1
    served on rank g, given `placed`'s layer `layer`: `traffic_weight * (D^T a)[j, g]` for the
    same rank, plus `(node_weight - 1) * ...` for the same node."""
    a_ER = placed.fractions(layer, trace.num_experts)
    d_EE = trace.co_routing[layer]
    rpn = cfg.ranks_per_node or cfg.num_ranks
    same_rank = d_EE.T @ a_ER
    node_EN = d_EE.T @ a_ER.reshape(a_ER.shape[0], cfg.nodes, rpn).sum(axis=2)
    same_node = np.repeat(node_EN, rpn, axis=1)
    if cfg.nodes == 1:
        return cfg.traffic_weight * same_rank
    if rpn == 1:
        return cfg.traffic_weight * cfg.node_weight * same_rank
    return cfg.traffic_weight * (same_rank + (cfg.node_weight - 1.0) * same_node)


def affinity_greedy(trace: RoutingTrace, cfg: PlacementConfig, base: Placement) -> Placement:
    """Greedy with cross-layer affinity (the ILP's warm start): layer 0 as in `base`, each next
    layer by `affinity_layer` given the one before."""
    placed = Placement([list(map(list, base.layers[0]))])
    for layer in range(1, trace.num_layers):
        placed.layers.append(affinity_layer(trace, cfg, base, placed, layer))
    return placed


def affinity_layer(
    trace: RoutingTrace, cfg: PlacementConfig, base: Placement, placed: Placement, layer: int
) -> list[list[int]]:
    """Layer `layer` given `placed`'s layer `layer - 1`, with `base`'s replica counts: copies,
    heaviest first, go to the rank that saves the most traffic among ranks with a free slot whose
    load stays within `(1 + balance_slack)` of `base`'s max load for the layer (else the least
    loaded); then `_repair` moves copies off ranks still above that cap."""
    slots = cfg.slots(trace.num_experts)
    slack = cfg.balance_slack if cfg.balance_slack is not None else 0.0
    counts = base.replica_counts(layer, trace.num_experts)
    cap = float(base.rank_loads(layer, trace.loads[layer]).max())
    cap *= 1.0 + slack
    gain = colocation_gain(trace, cfg, placed, layer - 1)

    def toward_partners(e: int, w: float, free: list[int], load: np.ndarray) -> int:
        fits = [g for g in free if load[g] + w <= cap + 1e-9]
        if not fits:
            return _least_loaded(e, w, free, load)
        return max(fits, key=lambda r: (gain[e, r] / counts[e], -load[r], -r))

    copies = copies_of(trace.loads[layer], counts)
    ranks = _pack(copies, slots, layer, toward_partners)
    _repair(ranks, trace.loads[layer] / counts, gain / counts[:, None], cap, slots)
    return ranks


def _repair(ranks: list[list[int]], weight, gain, cap: float, slots: list[int]) -> None:
    """Moves and swaps off the most loaded rank until every rank is within `cap`, each time the
    one that loses the least co-location gain (gives up after R * S tries)."""
    load = np.array([sum(weight[e] for e in ids) for ids in ranks])
    for _ in range(sum(slots)):
        g = int(np.argmax(load))
        if load[g] <= cap + 1e-9:
            return
        best = None
        for c in ranks[g]:
            for h in range(len(ranks)):
                if h == g or c in ranks[h]:
                    continue
                options = [d for d in ranks[h] if d not in ranks[g] and weight[d] < weight[c]]
                if len(ranks[h]) < slots[h]:
                    options.append(None)
                for d in options:
                    wd = 0.0 if d is None else weight[d]
                    new_g, new_h = load[g] - weight[c] + wd, load[h] + weight[c] - wd
                    if max(new_g, new_h) >= load[g]:
                        continue
                    loss = gain[c, g] - gain[c, h]
                    if d is not None:
                        loss += gain[d, h] - gain[d, g]
                    key = (max(new_g, new_h) > cap + 1e-9, loss, max(new_g, new_h))
                    if best is None or key < best[0]:
                        best = (key, c, h, d, new_g, new_h)
        if best is None:
            return
        _, c, h, d, load[g], load[h] = best
        ranks[g].remove(c)
        ranks[h].append(c)
        if d is not None:
            ranks[h].remove(d)
            ranks[g].append(d)
