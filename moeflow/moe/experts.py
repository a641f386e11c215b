"""GroupedExperts: E expert FFNs stored as stacked `[E, ...]` tensors, run on expert-sorted rows.

Legend: R rows (expert-sorted tokens), D model dim, F FFN hidden dim, E experts, g = 2 for SwiGLU.
`w1: [E, D, g*F]`, `w2: [E, F, D]`; expert e is exactly a `FeedForward` with `w1[e]`, `w2[e]`.
With `bias`, `w1` is `[E, D+1, g*F]`, its last row each expert's `b1` (the output bias `b2` is the
MoE layer's `ffn_out_bias`, see `MoEConfig.ffn_bias`).
"""

from __future__ import annotations

import torch
from torch import nn

from moeflow.moe.expert_compute import grouped_ffn
from moeflow.moe.ffn import FeedForward, apply_activation, gate_multiplier, init_ffn_weights_


def slice_experts(
    w1: torch.Tensor, w2: torch.Tensor, expert_ids: list[int] | None, ffn_lo: int, ffn_hi: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts `expert_ids` (all when None) of `w1 [E, D, c*F]`, `w2 [E, F, D]`, restricted to FFN
    columns `[ffn_lo, ffn_hi)`: new tensors `[n, D, c*f]` (gate slice, then up slice), `[n, f, D]`.

    Example:
        >>> w1, w2 = slice_experts(torch.randn(4, 2, 6), torch.randn(4, 3, 2), [3, 1], 1, 3)
        >>> w1.shape, w2.shape
        (torch.Size([2, 2, 4]), torch.Size([2, 2, 2]))
    """
    if expert_ids is not None:
        index = torch.tensor(expert_ids, dtype=torch.int64, device=w1.device)
        w1, w2 = w1.index_select(0, index), w2.index_select(0, index)
    ffn = w2.shape[1]
    if (ffn_lo, ffn_hi) == (0, ffn):
        return w1.clone() if expert_ids is None else w1, w2.clone() if expert_ids is None else w2
    c = w1.shape[-1] // ffn
    w1 = w1.unflatten(-1, (c, ffn))[..., ffn_lo:ffn_hi].flatten(-2).contiguous()
    return w1, w2[..., ffn_lo:ffn_hi, :].contiguous()


class GroupedExperts(nn.Module):
    """Run expert e on rows `[start_e, start_e + rows_per_expert[e])` of the sorted buffer.

    One GEMM pair per expert (a loop over experts, never over tokens) writing into one buffer; an
    expert with zero rows is skipped and gets a zero gradient (see `grouped_ffn`).

    Example:
        >>> experts = GroupedExperts(num_experts=4, hidden_size=8, ffn_hidden_size=16)
        >>> experts(torch.randn(6, 8), [3, 0, 2, 1]).shape
        torch.Size([6, 8])
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str = "swiglu",
        bias: bool = False,
    ) -> None:
        super().__init__()
        apply_activation(torch.zeros(0, 2), activation)  # validates the name
        self.num_experts = num_experts
        self.activation = activation
        g = gate_multiplier(activation)
        rows = hidden_size + int(bias)  # b1 as w1's last row
        self.w1 = nn.Parameter(torch.empty(num_experts, rows, g * ffn_hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_ffn_weights_(self.w1, self.w2, generator)

    @property
    def has_bias(self) -> bool:
        return self.w1.shape[1] > self.w2.shape[2]

    @classmethod
    def from_dense(cls, ffn: FeedForward, num_experts: int) -> GroupedExperts:
        """Every expert a copy of `ffn` (sparse upcycling); its `b1` too when it has biases (its
        `b2` belongs to the MoE layer)."""
        hidden = ffn.w1.shape[0]
        bias = ffn.b1 is not None
        experts = cls(num_experts, hidden, ffn.w2.shape[0], ffn.activation, bias)
        experts.to(device=ffn.w1.device, dtype=ffn.w1.dtype)
        w1 = ffn.w1.detach() if not bias else torch.cat([ffn.w1.detach(), ffn.b1.detach()[None]])
        with torch.no_grad():
            experts.w1.copy_(w1.expand(num_experts, *w1.shape))
            experts.w2.copy_(ffn.w2.detach().expand_as(experts.w2))
        return experts

    def keep(self, expert_ids: list[int], ffn_lo: int, ffn_hi: int) -> None:
        """Keep only experts `expert_ids` (in that order) and FFN columns `[ffn_lo, ffn_hi)` of
        each (both column blocks of w1 for SwiGLU): a rank's share under an `ExpertLayout`."""
        with torch.no_grad():
            w1, w2 = slice_experts(self.w1.detach(), self.w2.detach(), expert_ids, ffn_lo, ffn_hi)
        self.w1 = nn.Parameter(w1, requires_grad=self.w1.requires_grad)
        self.w2 = nn.Parameter(w2, requires_grad=self.w2.requires_grad)
        self.num_experts = len(expert_ids)

    def forward(self, x_RD: torch.Tensor, rows_per_expert: list[int]) -> torch.Tensor:
        if len(rows_per_expert) != self.num_experts:
            raise ValueError(
                f"rows_per_expert has {len(rows_per_expert)} groups, expected {self.num_experts}"
            )
        if sum(rows_per_expert) != x_RD.shape[0]:
            raise ValueError(
                f"rows_per_expert sums to {sum(rows_per_expert)} but the buffer has "
                f"{x_RD.shape[0]} rows"
            )
        return grouped_ffn(x_RD, self.w1, self.w2, rows_per_expert, self.activation)


def gated_bias(
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    keep_TK: torch.Tensor | None,
    bias_EH: torch.Tensor,
) -> torch.Tensor:
    """`[T, H]`: `sum_k keep[t, k] * weights[t, k] * bias[ids[t, k]]`, the experts' output
    biases `b2` as the combine weighs them (`MoEConfig.ffn_bias`); one `[T, E] @ [E, H]` product.

    Example:
        >>> gated_bias(torch.tensor([[0.75, 0.25]]), torch.tensor([[1, 0]]), None,
        ...            torch.tensor([[4.0], [8.0]])).tolist()
        [[7.0]]
    """
    gates_TK = weights_TK.to(bias_EH.dtype)
    gates_TK = gates_TK if keep_TK is None else gates_TK * keep_TK
    gates_TE = gates_TK.new_zeros(ids_TK.shape[0], bias_EH.shape[0])
    return gates_TE.scatter_add_(1, ids_TK, gates_TK) @ bias_EH
