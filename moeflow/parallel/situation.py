"""A layer's situation for the runtime tuner: what, when it changes, makes a decision stale.

Legend: T tokens per rank, rho max/mean load over the shard groups of the layout, off the share of
a rank's kept pairs whose expert has no copy in the rank's shard group.

A decision measured in situation (T0, rho0, off0) holds for every (T, rho, off) with T within a
factor `token_bucket` of T0, rho within `imbalance_step` of rho0 and off within `traffic_step` of
off0 (`TunerConfig`); of several such, the nearest. Thresholds around measured points, not fixed
buckets: a load that wanders across a bucket edge and back costs no second measurement. A
re-placement changes rho and off, so it re-tunes a layer only when it moves either that far.

Example:
    >>> from moeflow.moe.layout import ExpertLayout
    >>> from moeflow.parallel.tuner_config import TunerConfig
    >>> lay = ExpertLayout.canonical(num_experts=4, ffn_hidden_size=8, group_size=2)
    >>> counts = torch.tensor([6.0, 2.0, 1.0, 1.0])  # rank 0 holds experts 0 and 1
    >>> group_imbalance(lay, counts), off_group_share(lay, counts, 0)
    (1.6, 0.2)
    >>> nearest(TunerConfig(), [(1024, 1.5, 0.5), (1024, 1.0, 0.5)], (1100, 1.3, 0.4))
    (1024, 1.5, 0.5)
    >>> nearest(TunerConfig(), [(1024, 1.5, 0.5)], (4096, 1.5, 0.5)) is None
    True
"""

from __future__ import annotations

import math

import torch

from moeflow.moe.layout import ExpertLayout

Situation = tuple[float, float, float]  # (T, rho, off)


def nearest(config, measured: list[Situation], now: Situation) -> Situation | None:
    """The measured situation nearest to `now` whose decision holds for it (None: measure)."""
    best, best_d = None, math.inf
    for seen in measured:
        parts = (
            abs(math.log(max(now[0], 1.0) / max(seen[0], 1.0))) / math.log(config.token_bucket),
            abs(now[1] - seen[1]) / config.imbalance_step,
            abs(now[2] - seen[2]) / config.traffic_step,
        )
        if max(parts) < 1.0 and sum(parts) < best_d:
            best, best_d = seen, sum(parts)
    return best


def off_group_share(lay: ExpertLayout, counts_E: torch.Tensor, rank: int) -> float:
    """The share of the kept pairs of `rank` (its place in the expert group), counted in
    `counts_E`, whose expert has no copy in its shard group."""
    total = float(counts_E.sum())
    if total == 0 or lay.group_size == 1:
        return 0.0
    here = set(lay.group_experts(lay.group_of(rank)))
    return (total - sum(float(counts_E[e]) for e in here)) / total


def group_imbalance(lay: ExpertLayout, counts_E: torch.Tensor) -> float:
    """max/mean load over the shard groups of the layer's layout (replicas split their expert's
    load evenly)."""
    copies = lay.copies()
    loads = [
        sum(float(counts_E[e]) / copies[e] for e in lay.group_experts(v))
        for v in range(lay.num_groups)
    ]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0
