"""The non-finite guard of `moeflow train`: a step whose loss or gradient norm is NaN or infinite
never reaches the weights unnoticed (`train.on_nonfinite`).

Schedule, per optimizer step, on every rank, between the gradient clipping and the optimizer step:
one all-reduce (MAX over the world group) of `[stop requested, gradient norm not finite, loss not
finite on rank 0, ..., loss not finite on rank W-1]` and one host sync. This is the step's stop
flag exchange (SIGTERM), moved before the optimizer step, so the guard adds no collective and no
host sync. Every rank then takes the same decision:

- all finite: the optimizer steps;
- `stop` (default): `NonFiniteError` naming the step, the ranks and the values, before the update,
  so the weights stay as the last finite step left them and no checkpoint of a diverged state is
  written;
- `skip`: the update is skipped (gradients dropped, the step still counts, the learning-rate
  schedule moves on), counted in the logs; `max_nonfinite_skips` skips in a row stop the run as
  `stop` does.

Validation losses are checked as they are computed (`check_validation`), and checkpoints refuse
non-finite tensors (`moeflow.train.checkpoint`).

Example:
    >>> guard = NonFiniteGuard("skip", max_skips=2, rank=0, world_size=1)
    >>> guard.decide(7, torch.tensor([0.0, 1.0, 0.0]), loss=1.5, grad_norm=float("inf"))
    False
    >>> guard.skipped, guard.in_a_row
    (1, 1)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A run stopped on a NaN or infinite loss, gradient norm or tensor; the message says where.
    `step`: the step it happened at (the one that did not complete)."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


FIX = (
    "lower optim.lr or raise optim.warmup_steps and resume from the newest checkpoint, or set "
    'train.on_nonfinite = "skip" to skip such steps'
)
FIX_SKIPPING = (
    "lower optim.lr or raise optim.warmup_steps and resume from the newest checkpoint (written "
    "before the streak), or raise train.max_nonfinite_skips if such streaks pass"
)


class NonFiniteGuard:
    """See the module doc. `rank`, `world_size`: of the world group."""

    def __init__(self, policy: str, max_skips: int, rank: int, world_size: int) -> None:
        self.policy, self.max_skips = policy, max_skips
        self.rank, self.world_size = rank, world_size
        self.skipped = 0  # steps skipped since the run (or resume) started
        self.in_a_row = 0

    def exchange(
        self,
        loss_sum: torch.Tensor,
        grad_norm: torch.Tensor,
        stop_requested: bool,
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        """The step's one all-reduce (see the module doc); returns the reduced flags on the host."""
        flags = torch.zeros(2 + self.world_size, device=grad_norm.device)
        flags[0] = float(stop_requested)
        flags[1] = (~torch.isfinite(grad_norm)).float()
        flags[2 + self.rank] = (~torch.isfinite(loss_sum)).float()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        return flags.cpu()

    def decide(self, step: int, flags: torch.Tensor, loss: float, grad_norm: float) -> bool:
        """Whether step `step` updates the weights; raises `NonFiniteError` when the run must
        stop. `loss`: this rank's loss of the step (the sum over its micro-batches)."""
        bad_ranks = [r for r in range(self.world_size) if flags[2 + r] > 0]
        if not bad_ranks and not flags[1] > 0:
            self.in_a_row = 0
            return True
        what = []
        if bad_ranks:
            mine = f"; this rank's: {loss}" if self.rank in bad_ranks else ""
            what.append(f"the training loss is not finite on rank(s) {_ranks(bad_ranks)}{mine}")
        if bad_ranks:
            what.append(f"the gradient norm is {grad_norm}")
        else:  # summed over every rank: no single rank to name
            what.append(
                f"the gradient norm is {grad_norm} (gradients are summed over all ranks; every "
                "rank's loss was finite)"
            )
        if self.policy == "stop":
            raise NonFiniteError(
                f'step {step}: {", ".join(what)}; train.on_nonfinite = "stop" stopped the run '
                f"before the update (no checkpoint of this state is written); {FIX}",
                step,
            )
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_skips:
            raise NonFiniteError(
                f"step {step}: {', '.join(what)}, the {self.in_a_row}th step in a row "
                f"(train.max_nonfinite_skips = {self.max_skips}); the run has diverged; "
                f"{FIX_SKIPPING}",
                step,
            )
        return False


def check_validation(step: int, loss: float) -> None:
    """A non-finite validation loss stops the run (whatever `on_nonfinite` says: there is no
    update to skip), before a checkpoint of the model is written."""
    if not math.isfinite(loss):
        raise NonFiniteError(
            f"step {step}: the validation loss is {loss}; the model's weights give non-finite "
            f"outputs (no checkpoint of this state is written); {FIX}",
            step,
        )


def first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    """The key of the first tensor of `state` holding a NaN or infinity, else None (local
    shards of DTensors are checked; one host sync)."""
    keys, tensors = [], []
    for key, value in state.items():
        local = value.to_local() if hasattr(value, "to_local") else value
        if isinstance(local, torch.Tensor) and local.is_floating_point() and local.numel():
            keys.append(key)
            tensors.append(torch.isfinite(local).all())
    if not tensors:
        return None
    ok = torch.stack(tensors).cpu()
    bad = (~ok).nonzero()
    return keys[int(bad[0])] if len(bad) else None


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8]))
    return shown + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
