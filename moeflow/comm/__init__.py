"""Moving tokens: permutation, capacity, and (with expert parallelism) all-to-all."""

from moeflow.comm.capacity import capacity_keep_mask, expert_capacity, rank_within_expert
from moeflow.comm.group_copy import register as _register_group_copy
from moeflow.comm.permutation import RoutingPlan, build_plan, combine, permute, unpermute

_register_group_copy()  # parallelized models copy and pickle (moeflow.comm.group_copy)

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
