"""The ILP solver backend: which solvers this machine has, and one solve with an honest status.

HiGHS runs through `pulp.HiGHS` (needs `highspy`) with its warm start set via `Highs.setSolution`
and the objective's constant restored (so the MIP gap is in placement-objective units); CBC ships
with PuLP. The status is the solver's own (`optimal`, `time_limit` with the gap when known,
`failed`), never PuLP's `LpStatus`, which says "Optimal" when a time limit stopped the solver.

Example:
    >>> set(available_solvers()) <= {"highs", "cbc"}
    True
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from moeflow.placement.problem import PlacementConfig

log = logging.getLogger("moeflow.placement")


class SolverUnavailableError(RuntimeError):
    pass


@dataclass
class SolveInfo:
    status: str  # optimal | time_limit | failed | too_large (no model built)
    solver: str
    seconds: float
    decomposition: str  # joint | per-layer
    gap: float | None = None  # relative MIP gap reported by the solver (None: unknown)
    subproblems: int = 1
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{self.status} ({self.solver}, {self.decomposition}"
        if self.gap is not None:
            text += f", gap {self.gap:.2%}"
        return text + ")"


def available_solvers() -> list[str]:
    """Solvers this machine can run, in the order `solver="auto"` tries them."""
    import pulp

    out = []
    try:
        import highspy  # noqa: F401

        out.append("highs")
    except ImportError:
        pass
    if pulp.PULP_CBC_CMD(msg=False).available():
        out.append("cbc")
    return out


def pick_solver(cfg: PlacementConfig) -> str:
    """The solver to use; raises `SolverUnavailableError` naming the fix."""
    have = available_solvers()
    if cfg.solver == "auto":
        if not have:
            raise SolverUnavailableError(
                "no ILP solver: install highspy (`pip install highspy`) or a PuLP with CBC"
            )
        return have[0]
    if cfg.solver not in have:
        fix = "pip install highspy" if cfg.solver == "highs" else "reinstall pulp (it ships CBC)"
        raise SolverUnavailableError(
            f"placement solver {cfg.solver!r} is not available here ({fix}); available: {have}"
        )
    return cfg.solver


@contextmanager
def output_to_log():
    """What native solver code prints on file descriptor 1 (HiGHS' banner, even with output
    off) goes to the `moeflow.placement` logger at debug level, never into the caller's stdout
    (a training progress bar, `moeflow plan`'s table)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log.debug("solver output:\n%s", text)


def run_solver(prob, solver: str, cfg: PlacementConfig, time_limit: float, warm: bool):
    """Solve `prob`; returns (status, gap) from the solver's own report. Solver output goes to
    logging (`output_to_log`)."""
    with output_to_log():
        return _run_solver(prob, solver, cfg, time_limit, warm)


def _run_solver(prob, solver: str, cfg: PlacementConfig, time_limit: float, warm: bool):
    import pulp

    if solver == "highs":
        import highspy

        class WarmHiGHS(pulp.HiGHS):
            def callSolver(self, lp):  # noqa: N802 (PuLP's name)
                if warm:
                    variables = lp.variables()
                    index = np.array([v.index for v in variables], dtype=np.int32)
                    value = np.array([v.varValue or 0.0 for v in variables], dtype=np.float64)
                    lp.solverModel.setSolution(len(index), index, value)
                # PuLP leaves the objective's constant out of the HiGHS model; put it back so
                # the objective (and the relative gap) are in placement-objective units.
                lp.solverModel.changeObjectiveOffset(float(lp.objective.constant))
                lp.solverModel.run()

        engine = WarmHiGHS(msg=False, timeLimit=time_limit, threads=1)
        prob.solve(engine)
        model = prob.solverModel
        status = model.getModelStatus()
        info = model.getInfo()
        has_solution = info.primal_solution_status == 2  # kSolutionStatusFeasible
        if status == highspy.HighsModelStatus.kOptimal:
            return "optimal", 0.0 if info.mip_gap < 1e-9 else float(info.mip_gap)
        if has_solution:
            # No finite dual bound yet (stopped before the root LP finished): gap unknown.
            gap = float(info.mip_gap)
            return "time_limit", gap if np.isfinite(gap) else None
        return "failed", None
    engine = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, warmStart=warm, threads=1)
    prob.solve(engine)
    if prob.sol_status == pulp.LpSolutionOptimal:
        return "optimal", 0.0
    if prob.sol_status == pulp.LpSolutionIntegerFeasible:
        return "time_limit", None
    return "failed", None
