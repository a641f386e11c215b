"""Grouped expert FFN as one autograd op: `y[rows_e] = act(x[rows_e] @ w1[e]) @ w2[e]` for every e.

Legend: R expert-sorted rows, D model dim, F FFN dim, g = 2 for SwiGLU, E experts, n rows of one
expert.

Why a hand-written backward: autograd over a per-expert loop pays for `split`/`cat` copies of every
activation, a `chunk`+`cat` per expert for SwiGLU, and one zero-filled weight-sized tensor per
indexed expert. Here the work runs expert by expert, every GEMM writing straight into its rows of a
preallocated buffer: the activation of expert e runs while its GEMM output is still in cache, and
the backward's temporaries are `[n, F]` per expert (reused by the allocator from one expert to the
next) instead of `[R, F]` for all rows, which on CPU would be page-faulted in again every step. The
math is `moeflow.moe.ffn.FeedForward` per expert; tests compare the two and run gradcheck. Under
`torch.autocast` the GEMMs run in the autocast dtype, as `nn.Linear` would.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _bounds(rows_per_expert: list[int]) -> list[tuple[int, int, int]]:
    """`(expert, first row, end row)` for every expert that has rows."""
    out, start = [], 0
    for e, n in enumerate(rows_per_expert):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def _empty_with_zeros_for_idle(
    w_E: torch.Tensor, bounds: list[tuple[int, int, int]]
) -> torch.Tensor:
    grad = torch.empty_like(w_E)
    busy = {e for e, _, _ in bounds}
    for e in range(w_E.shape[0]):
        if e not in busy:
            grad[e].zero_()
    return grad


def _forward_rows(x, w1_parts, w2, hs, aux, a, y, e, lo, hi, activation) -> None:
    """Expert e on rows [lo, hi): fills its rows of the pre-activation(s) `hs`, `aux`
    (silu(gate) for SwiGLU), the activation `a` and the output `y`."""
    for h, w in zip(hs, w1_parts, strict=True):
        torch.mm(x[lo:hi], w[e], out=h[lo:hi])
    if activation == "swiglu":
        torch.ops.aten.silu.out(hs[0][lo:hi], out=aux[lo:hi])
        torch.mul(aux[lo:hi], hs[1][lo:hi], out=a[lo:hi])
    elif activation == "gelu":
        torch.ops.aten.gelu.out(hs[0][lo:hi], out=a[lo:hi])
    else:
        torch.clamp_min(hs[0][lo:hi], 0, out=a[lo:hi])
    torch.mm(a[lo:hi], w2[e], out=y[lo:hi])


def _backward_rows(ctx_tensors, grads, e, lo, hi, activation) -> None:
    """Expert e on rows [lo, hi): its rows of grad_x and its blocks of grad_w1, grad_w2."""
    x, w1_parts, w2, hs, aux, a, grad_y = ctx_tensors
    grad_x, grad_w1_parts, grad_w2 = grads
    gy = grad_y[lo:hi]
    grad_a = gy @ w2[e].t()  # [n, F], consumed below
    torch.mm(a[lo:hi].t(), gy, out=grad_w2[e])
    if activation == "swiglu":
        gate, up = hs[0][lo:hi], hs[1][lo:hi]
        grad_up = grad_a * aux[lo:hi]  # d/d up = silu(gate)
        grad_a.mul_(up)  # d/d silu(gate)
        torch.ops.aten.silu_backward.grad_input(grad_a, gate, grad_input=grad_a)
        grad_hs = [grad_a, grad_up]
    elif activation == "gelu":
        torch.ops.aten.gelu_backward.grad_input(grad_a, hs[0][lo:hi], grad_input=grad_a)
        grad_hs = [grad_a]
    else:
        grad_a.masked_fill_(hs[0][lo:hi] <= 0, 0)
        grad_hs = [grad_a]
    for i, (gh, w, gw) in enumerate(zip(grad_hs, w1_parts, grad_w1_parts, strict=True)):
        if i == 0:
            torch.mm(gh, w[e].t(), out=grad_x[lo:hi])
        else:  # SwiGLU: the up projection's contribution adds to the gate's
            grad_x[lo:hi].addmm_(gh, w[e].t())
        torch.mm(x[lo:hi].t(), gh, out=gw[e])


class _GroupedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w1_EDG, w2_EFD, rows_per_expert, activation):
        device_type = x_RD.device.type
        dtype = x_RD.dtype
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        ctx.in_dtypes = (x_RD.dtype, w1_EDG.dtype, w2_EFD.dtype)
        with torch.autocast(device_type=device_type, enabled=False):
            x, w1, w2 = x_RD.to(dtype).contiguous(), w1_EDG.to(dtype), w2_EFD.to(dtype)
            rows, ffn = x.shape[0], w2.shape[1]
            # SwiGLU's gate and up projections (column blocks of w1) go to two contiguous
            # buffers: elementwise kernels on strided halves of one buffer run ~2x slower on CPU.
            w1_parts = list(w1.split(ffn, dim=-1))
            hs = [x.new_empty(rows, ffn) for _ in w1_parts]
            aux = x.new_empty(rows, ffn) if activation == "swiglu" else None
            a = x.new_empty(rows, ffn)
            y = x.new_empty(rows, w2.shape[-1])
            bounds = _bounds(rows_per_expert)
            for e, lo, hi in bounds:
                _forward_rows(x, w1_parts, w2, hs, aux, a, y, e, lo, hi, activation)
        saved = [x, w1, w2, a, *hs] + ([aux] if aux is not None else [])
        ctx.save_for_backward(*saved)
        ctx.bounds = bounds
        ctx.activation = activation
        ctx.num_parts = len(hs)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w1, w2, a, *rest = ctx.saved_tensors
        hs, aux = (
            rest[: ctx.num_parts],
            (rest[ctx.num_parts] if ctx.activation == "swiglu" else None),
        )
        grad_y = grad_y.to(x.dtype).contiguous()
        x_dtype, w1_dtype, w2_dtype = ctx.in_dtypes
        ffn = w2.shape[1]
        grad_x = torch.empty_like(x)  # every row belongs to exactly one expert
        # Only experts that received no rows need zero-filled weight gradients.
        grad_w1 = _empty_with_zeros_for_idle(w1, ctx.bounds)
        grad_w2 = _empty_with_zeros_for_idle(w2, ctx.bounds)
        tensors = (x, list(w1.split(ffn, dim=-1)), w2, hs, aux, a, grad_y)
        grads = (grad_x, list(grad_w1.split(ffn, dim=-1)), grad_w2)
        for e, lo, hi in ctx.bounds:
            _backward_rows(tensors, grads, e, lo, hi, ctx.activation)
        return grad_x.to(x_dtype), grad_w1.to(w1_dtype), grad_w2.to(w2_dtype), None, None


def grouped_ffn(
    x_RD: torch.Tensor,
    w1_EDG: torch.Tensor,
    w2_EFD: torch.Tensor,
    rows_per_expert: list[int],
    activation: str,
) -> torch.Tensor:
    """Expert e's FFN on its block of `rows_per_expert[e]` consecutive rows; zero-row experts skip.

    Example:
        >>> y = grouped_ffn(torch.randn(5, 4), torch.randn(2, 4, 6), torch.randn(2, 3, 4),
        ...                 [2, 3], "swiglu")
        >>> y.shape
        torch.Size([5, 4])
    """
    return _GroupedFFN.apply(x_RD, w1_EDG, w2_EFD, rows_per_expert, activation)
