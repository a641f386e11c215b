"""plan(): run one placement method on a routing trace and score it; `compare` runs them all.

Methods: `contiguous` (moeflow's default map), `round_robin`, `greedy` (EPLB), `ilp`. The ILP is
warm-started from greedy. If no solver can run and `cfg.solver` is "auto", `ilp` falls back to
greedy with a logged warning and says so in its status; a solver named explicitly that is missing
raises instead.

Example:
    >>> from moeflow.placement.trace import synthetic_trace
    >>> trace = synthetic_trace(8, num_layers=2, tokens=2000)
    >>> result = plan(trace, PlacementConfig(num_ranks=4), "greedy")
    >>> result.method, result.status, len(result.placement.layers[0])
    ('greedy', 'heuristic', 4)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from moeflow.placement.baselines import contiguous, greedy, round_robin
from moeflow.placement.ilp import solve_ilp
from moeflow.placement.problem import Placement, PlacementConfig, PlacementMetrics, evaluate
from moeflow.placement.solver import SolverUnavailableError
from moeflow.placement.trace import RoutingTrace

METHODS = ("contiguous", "round_robin", "greedy", "ilp")
log = logging.getLogger("moeflow.placement")


@dataclass
class PlanResult:
    method: str
    placement: Placement
    metrics: PlacementMetrics
    status: str  # heuristic | optimal | time_limit | failed | greedy_fallback
    seconds: float
    gap: float | None = None
    solver: str | None = None
    decomposition: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        out = {"method": self.method, "status": self.status, "solve_s": round(self.seconds, 3)}
        if self.gap is not None:
            out["gap"] = round(self.gap, 4)
        if self.solver:
            out["solver"] = self.solver
        if self.decomposition:
            out["decomposition"] = self.decomposition
        out.update(self.metrics.as_dict())
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def plan(trace: RoutingTrace, cfg: PlacementConfig, method: str = "ilp") -> PlanResult:
    """Place `trace`'s experts with `method` and score the result (raises `ValueError` on a
    problem that has no placement, e.g. more experts than slots)."""
    if method not in METHODS:
        raise ValueError(f"placement method {method!r} must be one of {METHODS}")
    cfg.total_slots(trace.num_experts)  # the slot checks, before any work
    start = time.perf_counter()
    if method != "ilp":
        build = {"contiguous": contiguous, "round_robin": round_robin, "greedy": greedy}[method]
        placement = build(trace, cfg)
        placement.validate(trace, cfg)
        seconds = time.perf_counter() - start
        return PlanResult(method, placement, evaluate(trace, placement, cfg), "heuristic", seconds)
    warm = greedy(trace, cfg)
    try:
        placement, info = solve_ilp(trace, cfg, warm)
    except SolverUnavailableError as exc:
        if cfg.solver != "auto":
            raise
        log.warning("%s; placing with greedy instead", exc)
        seconds = time.perf_counter() - start
        metrics = evaluate(trace, warm, cfg)
        return PlanResult("ilp", warm, metrics, "greedy_fallback", seconds, notes=[str(exc)])
    seconds = time.perf_counter() - start
    return PlanResult(
        "ilp", placement, evaluate(trace, placement, cfg), info.status, seconds, info.gap,
        info.solver, info.decomposition, info.notes,
    )  # fmt: skip


def compare(
    trace: RoutingTrace, cfg: PlacementConfig, methods: tuple[str, ...] = METHODS
) -> list[PlanResult]:
    """`plan` with every method in `methods`."""
    return [plan(trace, cfg, m) for m in methods]
