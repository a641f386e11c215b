"""The dispatcher's path where no row travels: the compute reads its rows from token order.

Legend: T tokens, D model dim, K top-k, R kept (token, slot) pairs, P parameters of the compute.

With one rank in the expert group, one chunk and no capacity padding, the permuted `[R, D]`
buffer, the combine and both of their backwards move every routed row through memory once more
than the experts need: four passes over `R x D` values (at T=4096, k=8, D=256: 33 MB each).
Here the compute instead gets the tokens `[T, D]` and, per buffer row r (expert-major, as the
plan sorts them), its token `src[r]` and its pair's router weight; it gathers each expert's rows
where its GEMM reads them, weights its outputs and adds them into their tokens' rows itself
(`moeflow.moe.grouped_ffn`, token order). The results equal the buffered path's up to the order of
each token's K-term sum (here the experts' order, there the slots'): deterministic either way.

`compute` is any object with (the `exchange_compute` interface's `materialize`, `new_grads` and
`finish`, and)

    forward_tokens(params, x_TD, src_R, row_w_R, blocks) -> (out_TD, saved: list[Tensor])
    backward_tokens(params, saved, grad_TD, blocks, accumulator) -> (grad_x_TD, grad_row_w_R)

Schedule: no collective of its own; `compute.materialize(params)` runs its weight gathers (the
`dp` mode's) in forward and again in backward, and `finish` their gradients' reduce-scatter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable


class _LocalCompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, compute, blocks, num_params: int, src_R, pairs_R, *tensors):
        params = tensors[:num_params]
        x_TD, weights_TK = tensors[num_params:]
        row_w_R = weights_TK.reshape(-1).index_select(0, pairs_R)
        out_TD, saved = compute.forward_tokens(
            compute.materialize(params), x_TD, src_R, row_w_R, blocks
        )
        ctx.compute, ctx.blocks, ctx.num_params = compute, blocks, num_params
        ctx.weights_shape, ctx.weights_dtype = weights_TK.shape, weights_TK.dtype
        ctx.save_for_backward(pairs_R, *params, *saved)
        return out_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD):
        pairs_R, *rest = ctx.saved_tensors
        params, saved = rest[: ctx.num_params], rest[ctx.num_params :]
        compute = ctx.compute
        run = compute.materialize(params)
        acc = compute.new_grads(run)
        grad_x, grad_row_w = compute.backward_tokens(
            run, saved, grad_TD.contiguous(), ctx.blocks, acc
        )
        shape = ctx.weights_shape
        grad_w = grad_row_w.new_zeros(shape.numel()).index_copy_(0, pairs_R, grad_row_w)
        grad_w = grad_w.view(shape).to(ctx.weights_dtype)  # dropped pairs get 0
        return (None, None, None, None, None, *compute.finish(acc), grad_x, grad_w)


def local_compute(
    compute: Any,
    params: tuple[torch.Tensor, ...],
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    row_to_pair: torch.Tensor,
    blocks: list[Any],
) -> torch.Tensor:
    """`out[t] = sum over t's kept pairs of weight * expert(x[t])`, `[T, D]`, differentiable in
    `params`, `x_TD` and `weights_TK`. `row_to_pair` `[R]`: the pair (`t*K + k`) of each buffer
    row, rows grouped by expert as `blocks` (`(local expert, first row, end row)`) say; pairs in
    no row (dropped) contribute nothing."""
    src_R = torch.div(row_to_pair, weights_TK.shape[1], rounding_mode="floor")
    return _LocalCompute.apply(
        compute, blocks, len(params), src_R, row_to_pair, *params, x_TD, weights_TK
    )
