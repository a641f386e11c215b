"""The dispatcher's path where no row travels: the compute reads its rows from token order.

Legend: T tokens, D model dim, K top-k, R kept (token, slot) pairs, P parameters of the compute.

With one rank in the expert group, one chunk and no capacity padding, the permuted input rows
(written whole in forward, kept, read back in backward) and the output gradient gathered into row
order move every routed row through memory once more than the experts need (at T=4096, k=8,
D=256: 33 MB a pass). Here the compute instead gets the tokens `[T, D]` and, per buffer row r
(expert-major, as the plan sorts them), its token `src[r]` and its pair's router weight; it
gathers each expert's rows where its GEMM reads them (`moeflow.moe.grouped_ffn`, token order), in
forward and again in backward, and its rows of the output gradient the same way. The outputs (and
the inputs' gradients) stay rows, weighted by the compute, which `combine_rows` sums per token in
slot order: the same sums in the same order as the buffered path, so the results are bitwise the
same. (Adding each expert's outputs into token order with `index_add_` instead was 10% slower on
this part at T=4096, D=256, F=64, E=64, k=8: `index_add_` runs on one thread on CPU.)

`compute` is a `TokenOrderCompute` (`moeflow.comm.compute`: an `ExpertCompute` with
`forward_tokens` and `backward_tokens`).

Schedule: no collective of its own; `compute.materialize(params)` runs its weight gathers (the
`dp` mode's) in forward and again in backward, and `finish` their gradients' reduce-scatter.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from moeflow.comm.compute import ReceivedBlocks, TokenOrderCompute
from moeflow.comm.permutation import RoutingPlan, combine_rows


class _LocalCompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, compute, plan: RoutingPlan, blocks, num_params: int, src_R, *tensors):
        params = tensors[:num_params]
        x_TD, weights_TK = tensors[num_params:]
        pairs_R = plan.row_to_pair
        row_w_R = weights_TK.reshape(-1).index_select(0, pairs_R)
        y_RD, saved = compute.forward_tokens(
            compute.materialize(params), x_TD, src_R, row_w_R, blocks
        )
        ctx.compute, ctx.plan, ctx.blocks, ctx.num_params = compute, plan, blocks, num_params
        ctx.weights_shape, ctx.weights_dtype = weights_TK.shape, weights_TK.dtype
        ctx.save_for_backward(*params, *saved)
        return combine_rows(y_RD, plan)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD):
        tensors = ctx.saved_tensors
        params, saved = tensors[: ctx.num_params], tensors[ctx.num_params :]
        compute = ctx.compute
        run = compute.materialize(params)
        acc = compute.new_grads(run)
        grad_x_RD, grad_row_w = compute.backward_tokens(
            run, saved, grad_TD.contiguous(), ctx.blocks, acc
        )
        grad_x = combine_rows(grad_x_RD, ctx.plan)
        shape = ctx.weights_shape
        pairs_R = ctx.plan.row_to_pair
        grad_w = grad_row_w.new_zeros(shape.numel()).index_copy_(0, pairs_R, grad_row_w)
        grad_w = grad_w.view(shape).to(ctx.weights_dtype)  # dropped pairs get 0
        return (None, None, None, None, None, *compute.finish(acc), grad_x, grad_w)


def local_compute(
    compute: TokenOrderCompute,
    params: tuple[torch.Tensor, ...],
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    plan: RoutingPlan,
    blocks: ReceivedBlocks,
) -> torch.Tensor:
    """`out[t] = sum over t's kept pairs of weight * expert(x[t])`, `[T, D]`, differentiable in
    `params`, `x_TD` and `weights_TK`. `plan` (no padding rows) sorts the pairs into rows grouped
    by expert as `blocks` (`(local expert, first row, end row)`) say; pairs in no row (dropped)
    contribute nothing."""
    if plan.has_padding:
        raise ValueError("local_compute takes a plan without padding rows (pad_to=None)")
    src_R = torch.div(plan.row_to_pair, plan.top_k, rounding_mode="floor")
    return _LocalCompute.apply(compute, plan, blocks, len(params), src_R, *params, x_TD, weights_TK)
