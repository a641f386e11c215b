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
    """`swiglu`: `silu(gate) * up`; `gelu` (exact erf form); `relu`."""
    if activation == "swiglu":
        gate, up = h_NgF.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(h_NgF)
    if activation == "relu":
        return F.relu(h_NgF)
    raise ValueError(f"activation ({activation!r}) must be one of 'swiglu', 'gelu', 'relu'")


def init_ffn_weights_(w1: torch.Tensor, w2: torch.Tensor, generator: torch.Generator | None = None):
    """`nn.Linear`'s default init per matrix: U(-1/sqrt(fan_in), 1/sqrt(fan_in)). `w1: [..., D,
    gF]`,
    `w2: [..., F, D]`; an expert initialised this way is distributed exactly like a dense FFN."""
    with torch.no_grad():
        bound1 = 1.0 / math.sqrt(w1.shape[-2])
        bound2 = 1.0 / math.sqrt(w2.shape[-2])
        w1.uniform_(-bound1, bound1, generator=generator)
        w2.uniform_(-bound2, bound2, generator=generator)


class FeedForward(nn.Module):
    """Dense FFN: `act(x @ w1) @ w2`, no biases.

    Example:
        >>> ffn = FeedForward(hidden_size=16, ffn_hidden_size=32, activation="gelu")
        >>> ffn(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu") -> None:
        super().__init__()
        apply_activation(torch.zeros(0, 2), activation)  # validates the name
        self.activation = activation
        g = gate_multiplier(activation)
        self.w1 = nn.Parameter(torch.empty(hidden_size, g * ffn_hidden_size))
        self.w2 = nn.Parameter(torch.empty(ffn_hidden_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_ffn_weights_(self.w1, self.w2, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_activation(x @ self.w1, self.activation) @ self.w2
