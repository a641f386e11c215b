"""The padded experts as plain tensor ops: the path `torch.compile` traces whole.

Legend: T tokens, K top-k, D model dim, W ranks of the expert group, L local expert slots, P = W*L
slots, C capacity (rows per slot), F FFN dim, g = 2 for SwiGLU.

With capacity padding (`router.pad_to_capacity`) every slot gets exactly C rows from every rank,
so every shape of the layer call is known from T alone (the same on every rank). The dispatch is
then a static-shape gather, two equal-split all-to-alls (functional collectives, which the
compiler traces; none on one rank), two batched GEMMs and a gather back, captured in one graph
with no host read (`ExpertDispatch` runs it while compiling; the eager layer runs the
dispatcher, the same math, checked against this one in `tests/test_compile.py`):

    row of pair p = slot[p] * C + (kept pairs of that slot before p), or the zero row if dropped
    rows [P*C, D] = x[token of each row]             (padding rows: zeros), destination-major
    received [L, W*C, D] = all-to-all(rows)          (one rank: the rows themselves)
    y = act(received @ w1 (+ b1)) @ w2, sent back by the reverse all-to-all
    out[t] = sum_k weight[t, k] * y[row of (t, k)]

Example:
    >>> w1, w2 = torch.randn(2, 4, 6), torch.randn(2, 6, 4)
    >>> x = torch.randn(3, 4)
    >>> slots = torch.tensor([[0], [1], [0]])
    >>> out = padded_experts(x, torch.ones(3, 1), slots, torch.ones(3, 1, dtype=torch.bool),
    ...                      2, w1, w2, "relu")
    >>> torch.allclose(out[1], torch.relu(x[1] @ w1[1]) @ w2[1], atol=1e-5)
    True
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from moeflow.comm.capacity import rank_within_expert
from moeflow.moe.ffn import apply_activation


def padded_rows(slots_TK: torch.Tensor, keep_TK: torch.Tensor, num_slots: int, capacity: int):
    """`(row of each pair [T*K], token of each row [S*C])` for S = `num_slots`: kept pairs take
    the rows of their slot in pair order; dropped pairs get row `S*C` (a zero row), padding rows
    token T (a zero token)."""
    n = slots_TK.numel()
    top_k = slots_TK.shape[1]
    slot = torch.where(keep_TK.reshape(-1), slots_TK.reshape(-1), num_slots)  # dropped: bucket S
    pairs = torch.arange(n, device=slot.device)
    rank = rank_within_expert(slot, pairs, num_slots + 1)  # kept pairs before it in its slot
    kept = (slot < num_slots) & (rank < capacity)
    zero_row = num_slots * capacity
    row = torch.where(kept, slot * capacity + rank, zero_row)
    token_of_row = torch.full((zero_row + 1,), slots_TK.shape[0], device=slot.device)
    token_of_row = token_of_row.scatter(0, row, pairs // top_k)
    return row, token_of_row[:zero_row]


def padded_experts(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    slots_TK: torch.Tensor,
    keep_TK: torch.Tensor,
    capacity: int,
    w1: torch.Tensor,
    w2: torch.Tensor,
    activation: str,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """`[T, D]`: every kept pair's expert output weighted by its router weight, summed per token
    (see the module doc). `slots_TK` in `[0, P)`, slot p on rank `p // L` of `group` (None: one
    rank); `w1 [L, D(+1), gF]` (a last row is b1), `w2 [L, F, D]`: this rank's L slots. The
    GEMMs run in `x_TD`'s dtype. Every rank of `group` calls it with the same T."""
    T, D = x_TD.shape
    L, C = w2.shape[0], capacity
    W = 1 if group is None else dist.get_world_size(group)
    row, token_of_row = padded_rows(slots_TK, keep_TK, W * L, C)
    w1, w2 = w1.to(x_TD.dtype), w2.to(x_TD.dtype)
    x_pad = torch.cat([x_TD, x_TD.new_zeros(1, D)])
    x_rows = x_pad.index_select(0, token_of_row)  # [W*L*C, D]: destination rank, slot, row
    if W > 1:
        x_rows = fc.all_to_all_single_autograd(x_rows, None, None, group)  # source-major
    x_rows = x_rows.view(W, L, C, D).transpose(0, 1).reshape(L, W * C, D)
    h = torch.bmm(x_rows, w1[:, :D])
    if w1.shape[1] > D:  # b1 as w1's last row (`MoEConfig.ffn_bias`)
        h = h + w1[:, D:]
    y = torch.bmm(apply_activation(h, activation), w2)  # [L, W*C, D]
    y = y.view(L, W, C, D).transpose(0, 1).reshape(W * L * C, D)
    if W > 1:
        y = fc.all_to_all_single_autograd(y, None, None, group)  # back to the senders
    y_pairs = torch.cat([y, y.new_zeros(1, D)]).index_select(0, row)
    weights = weights_TK.to(x_TD.dtype).reshape(-1, 1)
    return (y_pairs * weights).view(T, -1, D).sum(1)
