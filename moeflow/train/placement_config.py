"""`[placement]` of the run config: routing statistics and live expert re-placement.

Example:
    >>> cfg = PlacementRunConfig(every=100, method="greedy")
    >>> cfg.enabled, cfg.problem(4, num_experts=8).slots_per_rank
    (True, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.placement.problem import PlacementConfig
from moeflow.utils.validate import check_choice, check_int


@dataclass(kw_only=True, frozen=True)
class PlacementRunConfig:
    """Routing statistics and live expert re-placement (`moeflow.placement`).

    `stats`: count per-layer expert loads and cross-layer co-routing every micro-batch, decayed by
    `decay` per step, and write `<out_dir>/routing_stats.json` at checkpoints and at the end
    (`moeflow plan` reads it). Re-placement is considered at multiples of `every` steps, and at
    multiples of `check_every` when the current placement's max/mean rank load exceeds
    `imbalance_threshold` (0: no threshold trigger), never before `min_steps`; it is applied
    when `method`'s placement scores at least `min_gain` (a fraction) below the current one.
    `replica_slots`: expert slots per rank beyond E / ep, each holding a replica (of the next
    ranks' experts at first; re-placement gives them to the hot experts); they cost the memory of
    that many more experts and their AdamW state. The other fields are
    `moeflow.placement.PlacementConfig`'s; `ranks_per_node` defaults to `parallel.ranks_per_node`,
    then torchrun's LOCAL_WORLD_SIZE, then all ranks on one node."""

    stats: bool = True
    decay: float = 0.98
    every: int = 0
    imbalance_threshold: float = 0.0
    check_every: int = 10
    min_steps: int = 10
    min_gain: float = 0.02
    method: str = "ilp"
    traffic_weight: float = 0.1
    node_weight: float = 4.0
    balance_slack: float = 0.05
    time_limit_s: float = 5.0
    solver: str = "auto"
    ranks_per_node: int | None = None
    replica_slots: int = 0

    def __post_init__(self) -> None:
        check_int("placement.replica_slots", self.replica_slots, minimum=0)
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"placement.decay ({self.decay!r}) must be in (0, 1]")
        for name in ("every", "check_every", "min_steps"):
            check_int(f"placement.{name}", getattr(self, name), minimum=0)
        if self.imbalance_threshold != 0 and self.imbalance_threshold < 1:
            raise ValueError(
                f"placement.imbalance_threshold ({self.imbalance_threshold!r}) is a max/mean load "
                "ratio: 0 (off) or >= 1"
            )
        if self.imbalance_threshold and not self.check_every:
            raise ValueError("placement.imbalance_threshold needs placement.check_every > 0")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"placement.min_gain ({self.min_gain!r}) must be in [0, 1)")
        check_choice(
            "placement.method", self.method, ("contiguous", "round_robin", "greedy", "ilp")
        )
        if (self.every or self.imbalance_threshold) and not self.stats:
            raise ValueError(
                "placement.every / placement.imbalance_threshold re-place experts from measured "
                "routing: set placement.stats = true"
            )
        if self.ranks_per_node is not None:
            check_int("placement.ranks_per_node", self.ranks_per_node)
        self.problem(1)  # the solver fields, validated by the component that reads them

    @property
    def enabled(self) -> bool:
        return bool(self.every or self.imbalance_threshold)

    def problem(
        self, num_ranks: int, ranks_per_node: int | None = None, num_experts: int | None = None
    ) -> PlacementConfig:
        """The placement problem of `num_ranks` expert-parallel ranks holding `num_experts`
        experts per layer plus `replica_slots` replicas each."""
        slots = None
        if num_experts is not None:
            slots = num_experts // num_ranks + self.replica_slots
        return PlacementConfig(
            num_ranks=num_ranks, ranks_per_node=ranks_per_node,
            slots_per_rank=slots, num_slots=None if slots is None else slots * num_ranks,
            traffic_weight=self.traffic_weight, node_weight=self.node_weight,
            balance_slack=self.balance_slack, time_limit_s=self.time_limit_s, solver=self.solver,
        )  # fmt: skip
