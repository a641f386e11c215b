"""SharedExpert: the always-on expert(s) of an MoE layer (DeepSeek-V2/V3, Qwen2-MoE).

Legend: T tokens, D model dim, F_s shared FFN width.

`y_TD = act(x W1) W2`, times `sigmoid(x w_g)` per token when gated (Qwen2-MoE's
`shared_expert_gate`), added by the layer to the routed experts' output. Its parameters are
dense: every rank holds them whole and `GradSync` averages their gradients like any dense weight.

Schedule: the layer hands it to the expert pipeline as a side computation
(`moeflow.comm.pipeline`): it runs after the first dispatch all-to-all is issued and before it is
waited for, forward and backward, so it computes while tokens travel (with no all-to-all, e.g.
one rank or `dp` mode, it simply runs there).

Example:
    >>> shared = SharedExpert(hidden_size=8, ffn_hidden_size=16, activation="gelu", gate=True)
    >>> x = torch.randn(5, 8)
    >>> y = shared(x)
    >>> torch.allclose(y, torch.sigmoid(x @ shared.gate) * shared.ffn(x))
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from moeflow.comm.pipeline import SideCompute
from moeflow.moe.ffn import FeedForward, init_ffn_weights_


class SharedExpert(nn.Module):
    def __init__(
        self, hidden_size: int, ffn_hidden_size: int, activation: str, gate: bool = False
    ) -> None:
        super().__init__()
        self.ffn = FeedForward(hidden_size, ffn_hidden_size, activation)
        self.gate = nn.Parameter(torch.empty(hidden_size, 1)) if gate else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """`nn.Linear`'s default init for every matrix (the FFN's, and the gate's [D, 1])."""
        init_ffn_weights_(self.ffn.w1, self.ffn.w2, generator)
        if self.gate is not None:
            bound = 1.0 / math.sqrt(self.gate.shape[0])
            with torch.no_grad():
                self.gate.uniform_(-bound, bound, generator=generator)

    def side_compute(self, x_TD: torch.Tensor) -> SideCompute:
        """This expert on `x_TD` as the expert pipeline's side computation: a function of the
        input and of the parameters (passed as inputs, so the pipeline returns their
        gradients)."""
        names = [name for name, _ in self.named_parameters()]

        def run(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
            return functional_call(self, dict(zip(names, params, strict=True)), (x,))

        return SideCompute(run, (x_TD, *self.parameters()))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.ffn(x_TD)
        if self.gate is not None:
            y_TD = torch.sigmoid(x_TD @ self.gate.to(x_TD.dtype)) * y_TD
        return y_TD
