"""A layer's situation for the runtime tuner: what, when it changes, makes a decision stale.

Legend: T tokens per rank, rho max/mean load over the shard groups of the layout, off the share of
a rank's kept pairs whose expert has no copy in the rank's shard group.

A decision holds for a (T bucket, rho bucket, off bucket) key: T in powers of `token_bucket`, rho
in steps of `imbalance_step`, off in steps of `traffic_step` (`TunerConfig`). A re-placement
changes rho and off, so it re-tunes a layer when it moves either into a bucket not measured yet;
one that barely moves them reuses the decision.

Example:
    >>> from moeflow.moe.layout import ExpertLayout
    >>> lay = ExpertLayout.canonical(num_experts=4, ffn_hidden_size=8, group_size=2)
    >>> counts = torch.tensor([6.0, 2.0, 1.0, 1.0])  # rank 0 holds experts 0 and 1
    >>> group_imbalance(lay, counts), off_group_share(lay, counts, 0)
    (1.6, 0.2)
"""

from __future__ import annotations

import math

import torch

from moeflow.moe.layout import ExpertLayout


def situation_key(config, tokens: float, rho: float, off: float) -> tuple[int, int, int]:
    """The buckets of (T, rho, off) under `config` (a `TunerConfig`)."""
    bucket = math.floor(math.log(max(tokens, 1.0), config.token_bucket) + 1e-9)
    return (
        bucket,
        math.floor(rho / config.imbalance_step + 1e-9),
        math.floor(off / config.traffic_step + 1e-9),
    )


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
