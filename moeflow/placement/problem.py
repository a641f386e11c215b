"""The expert placement problem: its configuration, a placement, and how a placement is scored.

Shape legend: L MoE layers, E experts per layer, R ranks, N nodes.

A placement puts each expert of each layer (and its replicas, if the slot budget allows any) on the
ranks. Rank g has `slots[g]` expert slots (memory). With r_e replicas of expert e, each replica
takes `load_e / r_e` of its tokens. Scored on a `RoutingTrace`:

- **max load** of layer l: the largest sum of replica loads on one rank; every rank waits for the
  busiest one at each layer's all-to-all, so a step costs about `sum_l max_l`.
- **cross-rank / cross-node tokens**: tokens whose experts in consecutive layers l, l+1 sit on
  different ranks (nodes), `sum_ij D[i,j] * P(different)`, replicas chosen evenly.
- **objective** = `sum_l max_l + traffic_weight * (intra-node crossings + node_weight *
  inter-node crossings)`, in tokens.

Example:
    >>> cfg = PlacementConfig(num_ranks=2)
    >>> p = Placement([[[0, 1], [2, 3]]])
    >>> p.expert_map(0), p.replica_counts(0, 4).tolist()
    ([0, 1, 2, 3], [1, 1, 1, 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moeflow.placement.trace import RoutingTrace

SOLVERS = ("auto", "highs", "cbc")
DECOMPOSITIONS = ("auto", "none", "layer")


def _describe_slots(slots: list[int]) -> str:
    if len(set(slots)) == 1:
        return f"{slots[0]} each"
    shown = ", ".join(map(str, slots[:16]))
    return f"[{shown}{', ...' if len(slots) > 16 else ''}]"


@dataclass(kw_only=True, frozen=True)
class PlacementConfig:
    """`slots_per_rank`: an int (every rank) or one int per rank (memory limits); default E / R.
    `num_slots`: total expert copies, originals plus replicas; default E (no replication).
    `balance_slack`: the ILP keeps each layer's max load within this fraction of the greedy
    packing's (None: unbounded, the objective alone trades balance for traffic).
    `time_limit_s`: the ILP's whole budget, building the model included (PuLP adds well under a
    second past it on the sizes of `bench/placement.py`)."""

    num_ranks: int
    ranks_per_node: int | None = None  # default: all ranks on one node
    slots_per_rank: int | tuple[int, ...] | None = None
    num_slots: int | None = None
    traffic_weight: float = 0.1
    node_weight: float = 4.0
    balance_slack: float | None = 0.05
    time_limit_s: float = 5.0
    solver: str = "auto"
    decompose: str = "auto"
    max_pairs_per_expert: int = 4
    max_joint_binaries: int = 600  # decompose="auto": larger joint models are solved per layer
    max_layer_binaries: int = 200_000  # past this per layer the ILP is not built (kept greedy)

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"placement.num_ranks ({self.num_ranks}) must be >= 1")
        rpn = self.ranks_per_node
        if rpn is not None and (rpn < 1 or self.num_ranks % rpn):
            raise ValueError(
                f"placement.ranks_per_node ({rpn}) must divide num_ranks ({self.num_ranks})"
            )
        slots = self.slots_per_rank
        if isinstance(slots, (tuple, list)):
            if len(slots) != self.num_ranks or any(int(s) < 0 for s in slots):
                raise ValueError(
                    f"placement.slots_per_rank ({list(slots)}) must list {self.num_ranks} "
                    "non-negative slot counts, one per rank"
                )
        elif slots is not None and slots < 1:
            raise ValueError(f"placement.slots_per_rank ({slots}) must be >= 1")
        for name in ("traffic_weight", "node_weight", "time_limit_s", "balance_slack"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"placement.{name} ({value}) must be a finite number")
        for name in ("traffic_weight", "time_limit_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"placement.{name} ({getattr(self, name)}) must be >= 0")
        if self.node_weight < 1:
            raise ValueError(
                f"placement.node_weight ({self.node_weight}) must be >= 1: crossing nodes costs "
                "at least as much as crossing ranks"
            )
        if self.balance_slack is not None and self.balance_slack < 0:
            raise ValueError(f"placement.balance_slack ({self.balance_slack}) must be >= 0 or None")
        if self.solver not in SOLVERS:
            raise ValueError(f"placement.solver ({self.solver!r}) must be one of {SOLVERS}")
        if self.decompose not in DECOMPOSITIONS:
            raise ValueError(
                f"placement.decompose ({self.decompose!r}) must be one of {DECOMPOSITIONS}"
            )
        if self.max_pairs_per_expert < 1:
            raise ValueError(
                f"placement.max_pairs_per_expert ({self.max_pairs_per_expert}) must be >= 1"
            )

    @property
    def nodes(self) -> int:
        return self.num_ranks // (self.ranks_per_node or self.num_ranks)

    def node_of(self, rank: int) -> int:
        return rank // (self.ranks_per_node or self.num_ranks)

    def slots(self, num_experts: int) -> list[int]:
        """Slots of every rank for layers of `num_experts` experts (validated)."""
        r = self.num_ranks
        if self.slots_per_rank is None:
            if num_experts % r:
                raise ValueError(
                    f"{num_experts} experts do not split evenly over {r} ranks: pass "
                    "slots_per_rank (--slots-per-rank) to say how many experts a rank holds"
                )
            return [num_experts // r] * r
        if isinstance(self.slots_per_rank, int):
            return [self.slots_per_rank] * r
        return [int(s) for s in self.slots_per_rank]

    def total_slots(self, num_experts: int) -> int:
        """Expert copies to place (originals plus replicas), checked against the slots."""
        slots = self.slots(num_experts)
        capacity = sum(slots)
        if num_experts > capacity:
            raise ValueError(
                f"more experts than slots: {num_experts} experts per layer but {self.num_ranks} "
                f"ranks x slots_per_rank {self.slots_per_rank or slots[0]} = {capacity} slots; "
                "raise slots_per_rank or the number of ranks"
            )
        budget = num_experts if self.num_slots is None else self.num_slots
        if budget < num_experts:
            raise ValueError(
                f"placement.num_slots ({budget}) is below the expert count ({num_experts}): every "
                "expert needs at least one slot; num_slots counts originals plus replicas"
            )
        if budget > capacity:
            raise ValueError(
                f"placement.num_slots ({budget}) exceeds the {capacity} slots of {self.num_ranks} "
                f"ranks ({_describe_slots(slots)}); lower num_slots or raise slots_per_rank"
            )
        if budget > num_experts * self.num_ranks:
            raise ValueError(
                f"placement.num_slots ({budget}) asks for more copies than {self.num_ranks} ranks "
                f"x {num_experts} experts (replicas of an expert go to distinct ranks)"
            )
        return budget


@dataclass
class Placement:
    """`layers[l][g]`: logical expert ids on rank g in layer l, in slot order (an id on several
    ranks is replicated)."""

    layers: list[list[list[int]]]

    def replica_counts(self, layer: int, num_experts: int) -> np.ndarray:
        counts = np.zeros(num_experts, dtype=np.int64)
        for ids in self.layers[layer]:
            for e in ids:
                counts[e] += 1
        return counts

    def rank_loads(self, layer: int, loads_E: np.ndarray) -> np.ndarray:
        """`[R]`: the load each rank serves (an expert's load split evenly over its copies);
        `loads_E @ fractions(layer, E)` without the dense `[E, R]` matrix (O(copies))."""
        ids = self.layers[layer]
        flat = np.fromiter((e for r in ids for e in r), dtype=np.int64)
        rank_of = np.repeat(np.arange(len(ids)), [len(r) for r in ids])
        copies = np.bincount(flat, minlength=len(loads_E))
        weight = np.asarray(loads_E, dtype=np.float64)[flat] / np.maximum(copies[flat], 1)
        return np.bincount(rank_of, weights=weight, minlength=len(ids))

    def fractions(self, layer: int, num_experts: int) -> np.ndarray:
        """`[E, R]`: the share of expert e's tokens that rank g serves (1/r_e per replica)."""
        ranks = len(self.layers[layer])
        a = np.zeros((num_experts, ranks))
        for g, ids in enumerate(self.layers[layer]):
            for e in ids:
                a[e, g] += 1.0
        return a / np.maximum(a.sum(axis=1, keepdims=True), 1.0)

    def expert_map(self, layer: int) -> list[int]:
        """Logical expert -> physical slot (`rank * S + local slot`), for placements without
        replicas and with S experts on every rank (what an `MoELayer` runs)."""
        per_rank = {len(ids) for ids in self.layers[layer]}
        flat = [e for ids in self.layers[layer] for e in ids]
        if len(per_rank) != 1 or sorted(flat) != list(range(len(flat))):
            raise ValueError(
                f"layer {layer}'s placement ({self.layers[layer]}) has replicas or unequal ranks; "
                "an MoELayer runs one copy of each expert with the same count on every rank"
            )
        slots = per_rank.pop()
        out = [0] * len(flat)
        for g, ids in enumerate(self.layers[layer]):
            for i, e in enumerate(ids):
                out[e] = g * slots + i
        return out

    @classmethod
    def from_expert_maps(cls, maps: list[list[int]], num_ranks: int) -> Placement:
        layers = []
        for expert_map in maps:
            slots = len(expert_map) // num_ranks
            ranks: list[list[int]] = [[-1] * slots for _ in range(num_ranks)]
            for e, p in enumerate(expert_map):
                ranks[p // slots][p % slots] = e
            layers.append(ranks)
        return cls(layers)

    def validate(self, trace: RoutingTrace, cfg: PlacementConfig) -> None:
        """Raise unless every expert of every layer has a copy, replicas sit on distinct ranks,
        no rank holds more than its slots, and the copies fit the slot budget."""
        e_count = trace.num_experts
        slots = cfg.slots(e_count)
        budget = cfg.total_slots(e_count)
        if len(self.layers) != trace.num_layers:
            raise ValueError(
                f"placement has {len(self.layers)} layers, the statistics {trace.num_layers}"
            )
        for layer, ranks in enumerate(self.layers):
            if len(ranks) != cfg.num_ranks:
                raise ValueError(f"layer {layer}: {len(ranks)} ranks, expected {cfg.num_ranks}")
            for g, ids in enumerate(ranks):
                if len(ids) > slots[g]:
                    raise ValueError(f"layer {layer}: rank {g} holds {len(ids)} > {slots[g]} slots")
                if len(set(ids)) != len(ids):
                    raise ValueError(f"layer {layer}: rank {g} holds an expert twice: {ids}")
                if any(not 0 <= e < e_count for e in ids):
                    raise ValueError(f"layer {layer}: rank {g} holds an unknown expert: {ids}")
            counts = self.replica_counts(layer, e_count)
            if (counts == 0).any():
                missing = np.flatnonzero(counts == 0).tolist()
                raise ValueError(f"layer {layer}: experts {missing} are placed nowhere")
            if counts.sum() > budget:
                raise ValueError(f"layer {layer}: {counts.sum()} copies > num_slots {budget}")


@dataclass
class PlacementMetrics:
    max_load: list[float]  # per layer
    mean_load: list[float]
    cross_rank: float  # tokens between consecutive layers whose experts sit on different ranks
    cross_node: float
    co_tokens: float  # all tokens between consecutive layers
    objective: float
    extra: dict = field(default_factory=dict)

    @property
    def max_mean(self) -> float:
        """Sum over layers of the max rank load over the sum of the mean loads (1.0 = even)."""
        return sum(self.max_load) / max(sum(self.mean_load), 1e-12)

    def as_dict(self) -> dict:
        return {
            "max_mean_load": round(self.max_mean, 4),
            "max_load": [round(x, 2) for x in self.max_load],
            "cross_rank_tokens": round(self.cross_rank, 2),
            "cross_node_tokens": round(self.cross_node, 2),
            "cross_rank_fraction": round(self.cross_rank / self.co_tokens, 4)
            if self.co_tokens
            else 0.0,
            "cross_node_fraction": round(self.cross_node / self.co_tokens, 4)
            if self.co_tokens
            else 0.0,
            "objective": round(self.objective, 2),
        }


def node_fractions(a_ER: np.ndarray, cfg: PlacementConfig) -> np.ndarray:
    """`[E, R]` rank shares summed per node -> `[E, N]`."""
    return a_ER.reshape(a_ER.shape[0], cfg.nodes, -1).sum(axis=2)


def evaluate(trace: RoutingTrace, placement: Placement, cfg: PlacementConfig) -> PlacementMetrics:
    """Score `placement` on `trace` (see the module doc)."""
    e = trace.num_experts
    max_load, mean_load = [], []
    for layer in range(trace.num_layers):
        max_load.append(float(placement.rank_loads(layer, trace.loads[layer]).max()))
        mean_load.append(float(trace.loads[layer].sum() / cfg.num_ranks))
    # The dense [E, R] shares only where there is traffic between layers to score.
    layers = range(trace.num_layers) if trace.num_layers > 1 else []
    shares = [placement.fractions(layer, e) for layer in layers]
    cross_rank = cross_node = co_tokens = 0.0
    for layer in range(trace.num_layers - 1):
        d_EE = trace.co_routing[layer]
        same_rank = shares[layer] @ shares[layer + 1].T
        same_node = node_fractions(shares[layer], cfg) @ node_fractions(shares[layer + 1], cfg).T
        co_tokens += float(d_EE.sum())
        cross_rank += float((d_EE * (1.0 - same_rank)).sum())
        cross_node += float((d_EE * (1.0 - same_node)).sum())
    traffic = (cross_rank - cross_node) + cfg.node_weight * cross_node
    objective = sum(max_load) + cfg.traffic_weight * traffic
    return PlacementMetrics(max_load, mean_load, cross_rank, cross_node, co_tokens, objective)
