"""The local experts as the dispatcher's `compute`: grouped FFN forward/backward on received blocks.

Legend: R received rows, L local experts. Blocks are `(local expert, first row, end row)`.
Implements the interface of `moeflow.comm.pipeline.exchange_compute`.

Rows arrive source-rank major (each sender's rows in expert order), so with W > 1 senders expert e
owns W blocks. The rows are first gathered into expert-major order (one `[R, D]` copy each way):
each expert then runs one GEMM over all its rows, and its weight gradient is one GEMM with the full
reduction depth instead of W small accumulating ones, which are memory-bound.
"""

from __future__ import annotations

import torch

from moeflow.comm.all_to_all import LocalExchange
from moeflow.comm.compute import ReceivedBlocks
from moeflow.comm.pipeline import ChunkPlan, exchange_compute
from moeflow.moe import grouped_mm_ffn
from moeflow.moe.grouped_ffn import (
    Block,
    FFNActivations,
    WeightGrads,
    blocks_from_counts,
    compute_dtype,
    ffn_backward,
    ffn_forward,
)
from moeflow.moe.weight_gather import ExpertWeightGather


def expert_major(blocks: list[Block], device) -> tuple[torch.Tensor | None, list[Block]]:
    """Row order that makes each expert's blocks contiguous (stable), and the blocks after it.
    `(None, blocks)` when they already are."""
    experts = [e for e, _, _ in blocks]
    if len(set(experts)) == len(experts):
        return None, blocks
    by_expert: dict[int, list[Block]] = {}
    for b in blocks:
        by_expert.setdefault(b[0], []).append(b)
    parts, merged, start = [], [], 0
    for e in sorted(by_expert):
        n = 0
        for _, lo, hi in by_expert[e]:
            parts.append(torch.arange(lo, hi, device=device))
            n += hi - lo
        merged.append((e, start, start + n))
        start += n
    return torch.cat(parts), merged


def inverse(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `order` (`y.index_select(0, inverse(order))` puts rows
    gathered by `order` back: a gather, ~4x faster on CPU than scattering with `index_copy_`)."""
    return torch.empty_like(order).scatter_(
        0, order, torch.arange(order.numel(), device=order.device)
    )


class GroupedExpertCompute:
    """`params = (w1 [L, D, gF], w2 [L, F, D])`; rows arrive already in the compute dtype.

    With a `gather` (`ExpertWeightGather`), `params` are this rank's F-slices: `materialize`
    gathers the whole experts (in forward, and again in backward), and `finish` returns the
    gradients of the slices, reduce-scattered over the gathering group. `weighted`: rows arrive
    `[R, D + 1]` (or wider, padded to 16-byte rows: `moeflow.comm.permutation.carrier_width`),
    column D each row's router weight (`permute(x, plan, weights)`); the outputs come back
    weighted and the gradient, as wide as the rows, has the weights' gradient in column D."""

    def __init__(
        self,
        activation: str,
        gather: ExpertWeightGather | None = None,
        weighted: bool = False,
        kernel: str = "auto",
    ) -> None:
        self.activation = activation
        self.gather = gather
        self.weighted = weighted
        self.kernel = kernel  # `moeflow.moe.grouped_mm_ffn.KERNELS`

    def _kernel(self, x, w1, w2, merged, tokens: bool = False) -> tuple[str, list[int] | None]:
        """`(kernel, ends)`: the whole-buffer kernel and the local experts' end rows, or
        `("loop", None)` (`moeflow.moe.grouped_mm_ffn.choose`). In token order (`tokens`) the
        rows are gathered per expert, so `grouped_mm` (one buffer) runs as `grouped_loop`."""
        kernel = grouped_mm_ffn.choose(self.kernel, x, w1, w2)
        if tokens and kernel == "grouped_mm":
            kernel = "grouped_loop"
        ends = None if kernel == "loop" else grouped_mm_ffn.grouped_ends(merged, w1.shape[0])
        return ("loop", None) if ends is None else (kernel, ends)

    def materialize(self, params):
        return params if self.gather is None else self.gather.gather(*params)

    def forward(self, params, x_RD: torch.Tensor, blocks: ReceivedBlocks):
        w1, w2 = (p.to(x_RD.dtype) for p in params)
        order, merged = expert_major(blocks, x_RD.device)
        rows = x_RD.contiguous() if order is None else x_RD.index_select(0, order)
        x, row_w = rows, None
        if self.weighted:  # column D (after the row's D values): its router weight
            d = w2.shape[-1]
            x, row_w = rows[:, :d], rows[:, d].contiguous()
        kernel, ends = self._kernel(x, w1, w2, merged)
        with torch.autocast(device_type=x_RD.device.type, enabled=False):
            if ends is None:
                y, saved = ffn_forward(x, w1, w2, merged, self.activation, row_w)
            else:
                y, saved = grouped_mm_ffn.forward(
                    x, w1, w2, merged, self.activation, row_w, ends, kernel,
                    offs=blocks.ends,
                )  # fmt: skip
        if order is not None:
            y = y.index_select(0, inverse(order))  # back to source-rank order
        # The weights are saved once by the pipeline; keep only the activations, and the rows
        # whole (x is a column view of them when weighted: the gradient has their width).
        return y, saved.without_weights(rows)

    def reads_tokens(self, x_TD: torch.Tensor, params) -> bool:
        """Whether a call where no row travels runs in token order (`forward_tokens`): where the
        experts weight their rows (`weighted`: the layer's choice where F <= D), on any kernel
        but `grouped_mm`, which wants its rows in one buffer. Measured against the buffered path
        (interleaved in one process, 2 threads, T=4096, D=256): fine experts (F=64, E=64, k=8)
        2-7% faster; an earlier version (outputs added per expert with `index_add_`, the same
        speed there) was 2-3% faster at F = D (E=8, k=2) and F = D/2 (E=16, k=4). Where F > D the
        buffered path wins (weights on the D-wide outputs in the combine, their gradient over D):
        at F=512, E=8, k=2 the token order was 1-3.5% slower."""
        kernel = grouped_mm_ffn.choose(self.kernel, x_TD, *params)
        return self.weighted and kernel != "grouped_mm"

    def forward_tokens(self, params, x_TD, src_R, row_w_R, blocks: ReceivedBlocks):
        """Token order (`moeflow.comm.local_compute`): buffer row r is token `src_R[r]` of
        `x_TD`, weighted by `row_w_R[r]`; returns `([R, D] weighted output rows, saved)`. Each
        expert gathers its rows where its GEMM reads them: no `[R, D]` input buffer is written
        or kept."""
        w1, w2 = (p.to(x_TD.dtype) for p in params)
        kernel, ends = self._kernel(x_TD, w1, w2, blocks, tokens=True)
        row_w = row_w_R.to(x_TD.dtype)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            if ends is None:
                y, saved = ffn_forward(x_TD, w1, w2, blocks, self.activation, row_w, src_R)
            else:
                y, saved = grouped_mm_ffn.forward(
                    x_TD, w1, w2, blocks, self.activation, row_w, ends, kernel, src_R
                )
        return y, saved.without_weights(x_TD)

    def backward_tokens(self, params, saved, grad_TD, blocks: ReceivedBlocks, acc: dict):
        """`forward_tokens`'s backward from the output gradient in token order `[T, D]`:
        `([R, D] gradient of each row's input, grad wrt row_w_R)`; the weight gradients go into
        `acc`."""
        x = saved[0]
        w1, w2 = (p.to(x.dtype) for p in params)
        if acc["grads"] is None:
            acc["grads"] = WeightGrads(w1, w2)
        activations = FFNActivations.from_tensors([x, w1, w2, *saved[1:]], blocks, self.activation)
        grad_w = x.new_zeros(activations.num_rows)
        kernel, ends = self._kernel(x, w1, w2, blocks, tokens=True)  # the forward's choice
        if ends is None:
            grad_x = ffn_backward(activations, grad_TD, acc["grads"], grad_w=grad_w)
        else:
            grad_x = grouped_mm_ffn.backward(
                activations, grad_TD, acc["grads"], ends, kernel, grad_w=grad_w
            )
        return grad_x, grad_w

    def new_grads(self, params) -> dict:
        return {"params": params, "grads": None}

    def backward(self, params, saved, grad_y, blocks: ReceivedBlocks, acc: dict) -> torch.Tensor:
        rows = saved[0]
        w1, w2 = (p.to(rows.dtype) for p in params)
        x = rows[:, : w2.shape[-1]] if self.weighted else rows
        if acc["grads"] is None:
            acc["grads"] = WeightGrads(w1, w2)
        order, merged = expert_major(blocks, x.device)
        if order is not None:
            grad_y = grad_y.index_select(0, order)
        activations = FFNActivations.from_tensors([x, w1, w2, *saved[1:]], merged, self.activation)
        # The gradient is as wide as the received rows; their padding columns get 0.
        out = rows.new_empty(rows.shape)
        if self.weighted and rows.shape[1] > x.shape[1] + 1:
            out[:, x.shape[1] + 1 :] = 0
        kernel, ends = self._kernel(x, w1, w2, merged)  # the forward's choice (same inputs)
        if ends is None:
            grad_x = ffn_backward(activations, grad_y, acc["grads"], out)
        else:
            grad_x = grouped_mm_ffn.backward(activations, grad_y, acc["grads"], ends, kernel, out,
                                             offs=blocks.ends)  # fmt: skip
        if order is not None:
            grad_x = grad_x.index_select(0, inverse(order))
        return grad_x

    def finish(self, acc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        w1, w2 = acc["params"]
        if acc["grads"] is None:  # no chunk at all reached backward
            g1, g2 = torch.zeros_like(w1), torch.zeros_like(w2)
            return (g1, g2) if self.gather is None else self.gather.scatter(g1, g2)
        g1, g2 = acc["grads"].finish()
        g1, g2 = g1.to(w1.dtype), g2.to(w2.dtype)
        return (g1, g2) if self.gather is None else self.gather.scatter(g1, g2)


def grouped_ffn(
    x_RD: torch.Tensor,
    w1_EDG: torch.Tensor,
    w2_EFD: torch.Tensor,
    rows_per_expert: list[int],
    activation: str,
) -> torch.Tensor:
    """Expert e's FFN on its block of `rows_per_expert[e]` consecutive rows (zero-row experts
    skip), differentiable: the MoE layer's own expert path (`exchange_compute` with
    `GroupedExpertCompute`) on one rank. Under autocast the GEMMs run in the autocast dtype.

    Example:
        >>> y = grouped_ffn(torch.randn(5, 4), torch.randn(2, 4, 6), torch.randn(2, 3, 4),
        ...                 [2, 3], "swiglu")
        >>> y.shape
        torch.Size([5, 4])
    """
    x = x_RD.to(compute_dtype(x_RD))
    rows = [x.shape[0]]
    blocks = blocks_from_counts(rows_per_expert)
    received = ReceivedBlocks.from_blocks(blocks, len(rows_per_expert), x.device)
    plan = ChunkPlan([rows], [rows], [received])
    compute = GroupedExpertCompute(activation)
    return exchange_compute(LocalExchange(), compute, plan, (w1_EDG, w2_EFD), [x])[0][0]
