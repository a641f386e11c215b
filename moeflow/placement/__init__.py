"""Expert placement: routing statistics, the placement ILP and its baselines, live migration.

- `moeflow.parallel.RoutingStats` (measured while training) -> `RoutingTrace` (saved as
  `routing_stats.json`).
- `PlacementConfig` + a trace -> `plan(trace, cfg, method)` for `contiguous`, `round_robin`,
  `greedy` (EPLB) or `ilp` (PuLP with HiGHS/CBC) -> a scored `Placement`.
- Pure planning (numpy and PuLP): measuring routing (`moeflow.parallel.routing_stats`) and moving
  experts (`moeflow.parallel.replace.apply_placement`) live next to the other communicating code.

Example:
    >>> trace = synthetic_trace(8, num_layers=2, tokens=1000)
    >>> result = plan(trace, PlacementConfig(num_ranks=2), "greedy")
    >>> result.metrics.max_mean >= 1.0
    True
"""

from moeflow.placement.baselines import affinity_greedy, contiguous, greedy, round_robin
from moeflow.placement.ilp import solve_ilp
from moeflow.placement.planner import METHODS, PlanResult, compare, plan
from moeflow.placement.problem import Placement, PlacementConfig, PlacementMetrics, evaluate
from moeflow.placement.solver import SolveInfo, SolverUnavailableError, available_solvers
from moeflow.placement.trace import RoutingTrace, synthetic_trace

__all__ = [
    "METHODS",
    "Placement",
    "PlacementConfig",
    "PlacementMetrics",
    "PlanResult",
    "RoutingTrace",
    "SolveInfo",
    "SolverUnavailableError",
    "affinity_greedy",
    "available_solvers",
    "compare",
    "contiguous",
    "evaluate",
    "greedy",
    "plan",
    "round_robin",
    "solve_ilp",
    "synthetic_trace",
]
