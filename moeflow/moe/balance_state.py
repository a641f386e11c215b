"""Counts an MoE layer keeps across the micro-batches of one optimizer step.

- Global-batch balancing (`aux_loss_type="global_aux_loss"`, docs/methods.md, "Global-batch
  balancing"): each training micro-batch all-reduces its routed counts (E numbers) over `group`
  (every dp and ep rank) and adds them to a running sum; f in the balancing loss comes from that
  sum, P stays local. The sum resets at the optimizer step, so the last micro-batch of a step sees
  the counts of the whole global batch (Megatron's scheme). An activation-checkpointing
  recomputation reuses the f of its forward instead of communicating again.
- Aux-loss-free balancing: routed counts summed over the step, all-reduced once at the step.

Example:
    >>> state = BalanceState(3)
    >>> state.global_counts(torch.tensor([1, 0, 2]), count=True, recomputing=False).tolist()
    [1.0, 0.0, 2.0]
    >>> state.global_counts(torch.tensor([0, 1, 0]), count=True, recomputing=False).tolist()
    [1.0, 1.0, 2.0]
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class BalanceState(nn.Module):
    def __init__(self, num_choices: int) -> None:
        super().__init__()
        self.group: dist.ProcessGroup | None = None
        self.register_buffer("step_counts", torch.zeros(num_choices, dtype=torch.float64),
                             persistent=False)  # fmt: skip
        self.register_buffer("running_counts", torch.zeros(num_choices, dtype=torch.float64),
                             persistent=False)  # fmt: skip
        self._last_counts: torch.Tensor | None = None

    def reset(self, device: torch.device) -> None:
        if device.type == "meta":
            return
        n = self.step_counts.shape[0]
        self.step_counts = torch.zeros(n, dtype=torch.float64, device=device)
        self.running_counts = torch.zeros(n, dtype=torch.float64, device=device)
        self._last_counts = None

    def _all_reduce(self, counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        if group is not None:
            dist.all_reduce(counts, group=group)
        return counts

    def global_counts(self, routed_E: torch.Tensor, count: bool, recomputing: bool) -> torch.Tensor:
        """Counts that define f: the step's running global sum in training, this micro-batch's
        own counts otherwise (evaluation)."""
        if recomputing and self._last_counts is not None:
            return self._last_counts
        if not count:
            return routed_E.to(torch.float64)
        counts = self._all_reduce(routed_E.to(torch.float64), self.group)
        self.running_counts += counts
        self._last_counts = self.running_counts.clone()
        return self._last_counts

    def add_step_counts(self, routed_E: torch.Tensor) -> None:
        self.step_counts += routed_E.to(torch.float64)

    def step_loads(self, group: dist.ProcessGroup | None) -> torch.Tensor:
        """The step's routed counts summed over `group` (one all-reduce)."""
        return self._all_reduce(self.step_counts.clone(), group)
