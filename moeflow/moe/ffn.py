"""The dense feed-forward block an MoE layer replaces, and the activations experts share.

Legend: N rows, D model dim, F FFN hidden dim. Weights are stored input-major (`w1: [D, g*F]`, `w2:
[F, D]`, g = 2 for SwiGLU: gate columns first, then up columns) so `x @ w1` needs no transpose; the
same layout, with a leading expert dim, is used by `GroupedExperts`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gate_multiplier(activation: str) -> int:
    """How many F-wide column blocks `w1` has: 2 for SwiGLU (gate, up), else 1."""
    return 2 if activation == "swiglu" else 1


def apply_activation(h_NgF: torch.Tensor, activation: str) -> torch.Tensor:
    """`swiglu`: `silu(gate) * up`; `gelu` (exact erf form); `gelu_tanh` (the tanh
    approximation, GPT-2's `gelu_new`); `relu`."""
    if activation == "swiglu":
        gate, up = h_NgF.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(h_NgF, approximate="tanh" if activation == "gelu_tanh" else "none")
    if activation == "relu":
        return F.relu(h_NgF)
    raise ValueError(
        f"activation ({activation!r}) must be one of 'swiglu', 'gelu', 'gelu_tanh', 'relu'"
    )


def init_ffn_weights_(w1: torch.Tensor, w2: torch.Tensor, generator: torch.Generator | None = None):
    """`nn.Linear`'s default init per matrix: U(-1/sqrt(fan_in), 1/sqrt(fan_in)). `w1: [..., D,
    gF]` (or `[..., D+1, gF]`, its last row the bias, drawn alike, as `nn.Linear` draws its
    bias), `w2: [..., F, D]`; an expert initialised this way is distributed exactly like a dense
    FFN."""
    with torch.no_grad():
        bound1 = 1.0 / math.sqrt(w2.shape[-1])  # fan-in of w1: the model dim D
        bound2 = 1.0 / math.sqrt(w2.shape[-2])
        w1.uniform_(-bound1, bound1, generator=generator)
        w2.uniform_(-bound2, bound2, generator=generator)


class FeedForward(nn.Module):
    """Dense FFN: `act(x @ w1) @ w2`; with `bias`, `act(x @ w1 + b1) @ w2 + b2`.

    Example:
        >>> ffn = FeedForward(hidden_size=16, ffn_hidden_size=32, activation="gelu")
        >>> ffn(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
        >>> with torch.no_grad():
        ...     biased = FeedForward(4, 8, "relu", bias=True)
        ...     _ = biased.w1.zero_(), biased.b1.fill_(1.0), biased.w2.fill_(0.5), biased.b2.zero_()
        ...     biased(torch.randn(1, 4)).tolist()
        [[4.0, 4.0, 4.0, 4.0]]
    """

    def __init__(
        self, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu", bias: bool = False
    ) -> None:
        super().__init__()
        apply_activation(torch.zeros(0, 2), activation)  # validates the name
        self.activation = activation
        g = gate_multiplier(activation)
        self.w1 = nn.Parameter(torch.empty(hidden_size, g * ffn_hidden_size))
        self.w2 = nn.Parameter(torch.empty(ffn_hidden_size, hidden_size))
        self.b1 = nn.Parameter(torch.empty(g * ffn_hidden_size)) if bias else None
        self.b2 = nn.Parameter(torch.empty(hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_ffn_weights_(self.w1, self.w2, generator)
        if self.b1 is not None:
            with torch.no_grad():
                bound1, bound2 = (1.0 / math.sqrt(n) for n in self.w2.shape[::-1])
                self.b1.uniform_(-bound1, bound1, generator=generator)
                self.b2.uniform_(-bound2, bound2, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.b1 is None:
            return apply_activation(x @ self.w1, self.activation) @ self.w2
        return apply_activation(x @ self.w1 + self.b1, self.activation) @ self.w2 + self.b2
