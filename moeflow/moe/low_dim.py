"""The low-dimension all-to-all (BigMac; docs/methods.md): project tokens down before they travel to
their experts, and the combined output back up after it returns (descend-communicate-communicate-
ascend).

Legend: T tokens, D model dim, r `MoEConfig.a2a_dim`.

`descend(x) = x A_down` (`[T, D] -> [T, r]`) runs on the tokens' own rank before the dispatch;
the experts read and write r-wide rows; `ascend(y) = y A_up` (`[T, r] -> [T, D]`) runs after the
weighted combine. So every all-to-all (dispatch and combine, forward and backward) moves r values
per row instead of D: the bytes fall by D/r. `A_down` and `A_up` are dense parameters held whole
by every rank (like the router), initialised as `nn.Linear` weights.

Example:
    >>> proj = LowDimProjection(hidden_size=16, a2a_dim=4)
    >>> low = proj.descend(torch.randn(3, 16))
    >>> low.shape, proj.ascend(low).shape
    (torch.Size([3, 4]), torch.Size([3, 16]))
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LowDimProjection(nn.Module):
    def __init__(self, hidden_size: int, a2a_dim: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(hidden_size, a2a_dim))
        self.up = nn.Parameter(torch.empty(a2a_dim, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per matrix, as `nn.Linear`'s weights."""
        with torch.no_grad():
            for w in (self.down, self.up):
                bound = 1.0 / math.sqrt(w.shape[0])
                w.uniform_(-bound, bound, generator=generator)

    def descend(self, x_TD: torch.Tensor) -> torch.Tensor:
        return x_TD @ self.down.to(x_TD.dtype)

    def ascend(self, y_Tr: torch.Tensor) -> torch.Tensor:
        return y_Tr @ self.up.to(y_Tr.dtype)
