"""Moving tokens: permutation, capacity, and (with expert parallelism) all-to-all."""

from moeflow.comm.capacity import capacity_keep_mask, expert_capacity, rank_within_expert
from moeflow.comm.permutation import RoutingPlan, build_plan, combine, permute, unpermute

__all__ = [
    "RoutingPlan",
    "build_plan",
    "capacity_keep_mask",
    "combine",
    "expert_capacity",
    "permute",
    "rank_within_expert",
    "unpermute",
]
