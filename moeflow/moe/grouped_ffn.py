"""Grouped expert FFN as one autograd op: `y[rows_e] = act(x[rows_e] @ w1[e]) @ w2[e]` for every e.

Legend: R expert-sorted rows, D model dim, F FFN dim, g = 2 for SwiGLU, E experts.

Why a hand-written backward: autograd over a per-expert loop pays for `split`/`cat` copies of every
activation, a per-expert `chunk`+`cat` for SwiGLU, and one zero-filled weight-sized tensor per
indexed expert. Here every GEMM writes straight into its rows of one preallocated buffer (forward
and backward), and the activation and its derivative run once over all rows instead of once per
expert. The math is that of `moeflow.moe.ffn.FeedForward` applied per expert; tests compare it with
that and with gradcheck. Under `torch.autocast` the GEMMs run in the autocast dtype, as `nn.Linear`
would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _activate(hs: list[torch.Tensor], activation: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`hs` is `[gate, up]` for SwiGLU, else `[h]`. Returns `(a, aux)` with `aux = silu(gate)`."""
    if activation == "swiglu":
        silu_gate = F.silu(hs[0])
        return silu_gate * hs[1], silu_gate
    if activation == "gelu":
        return F.gelu(hs[0]), None
    return F.relu(hs[0]), None


def _activate_backward(
    grad_RF: torch.Tensor, hs: list[torch.Tensor], aux: torch.Tensor | None, activation: str
) -> list[torch.Tensor]:
    """Fused aten derivatives on contiguous buffers, in place where possible: on CPU every large
    temporary costs a round of page faults. Consumes `grad_RF`."""
    if activation == "swiglu":
        gate, up = hs
        grad_up = grad_RF * aux  # d/d up = silu(gate)
        grad_RF.mul_(up)  # d/d silu(gate)
        return [torch.ops.aten.silu_backward(grad_RF, gate), grad_up]
    if activation == "gelu":
        return [torch.ops.aten.gelu_backward(grad_RF, hs[0])]
    return [torch.ops.aten.threshold_backward(grad_RF, hs[0], 0)]


def _empty_with_zeros_for_idle(
    w_E: torch.Tensor, bounds: list[tuple[int, int, int]]
) -> torch.Tensor:
    grad = torch.empty_like(w_E)
    busy = {e for e, _, _ in bounds}
    for e in range(w_E.shape[0]):
        if e not in busy:
            grad[e].zero_()
    return grad


def _bounds(rows_per_expert: list[int]) -> list[tuple[int, int, int]]:
    out, start = [], 0
    for e, n in enumerate(rows_per_expert):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


class _GroupedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w1_EDG, w2_EFD, rows_per_expert, activation):
        device_type = x_RD.device.type
        dtype = x_RD.dtype
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        ctx.in_dtypes = (x_RD.dtype, w1_EDG.dtype, w2_EFD.dtype)
        with torch.autocast(device_type=device_type, enabled=False):
            x, w1, w2 = x_RD.to(dtype), w1_EDG.to(dtype), w2_EFD.to(dtype)
            rows, ffn = x.shape[0], w2.shape[1]
            # SwiGLU's gate and up projections go to two contiguous buffers (column blocks of
            # w1): elementwise kernels on strided halves of one buffer run ~2x slower on CPU.
            w1_parts = list(w1.split(ffn, dim=-1))
            hs = [x.new_empty(rows, ffn) for _ in w1_parts]
            bounds = _bounds(rows_per_expert)
            for e, lo, hi in bounds:
                for h, w in zip(hs, w1_parts, strict=True):
                    torch.mm(x[lo:hi], w[e], out=h[lo:hi])
            a, aux = _activate(hs, activation)
            y = x.new_empty(rows, w2.shape[-1])
            for e, lo, hi in bounds:
                torch.mm(a[lo:hi], w2[e], out=y[lo:hi])
        ctx.save_for_backward(x, w1, w2, a, aux, *hs)
        ctx.bounds = bounds
        ctx.activation = activation
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w1, w2, a, aux, *hs = ctx.saved_tensors
        grad_y = grad_y.to(x.dtype).contiguous()
        x_dtype, w1_dtype, w2_dtype = ctx.in_dtypes
        ffn = w2.shape[1]
        grad_a = torch.empty_like(a)
        # Only experts that received no rows need zero-filled weight gradients.
        grad_w2 = _empty_with_zeros_for_idle(w2, ctx.bounds)
        for e, lo, hi in ctx.bounds:
            torch.mm(grad_y[lo:hi], w2[e].t(), out=grad_a[lo:hi])
            torch.mm(a[lo:hi].t(), grad_y[lo:hi], out=grad_w2[e])
        grad_hs = _activate_backward(grad_a, hs, aux, ctx.activation)
        w1_parts = w1.split(ffn, dim=-1)
        grad_x = torch.empty_like(x)  # every row belongs to exactly one expert
        grad_w1 = _empty_with_zeros_for_idle(w1, ctx.bounds)
        grad_w1_parts = grad_w1.split(ffn, dim=-1)
        for e, lo, hi in ctx.bounds:
            for i, (gh, w, gw) in enumerate(zip(grad_hs, w1_parts, grad_w1_parts, strict=True)):
                if i == 0:
                    torch.mm(gh[lo:hi], w[e].t(), out=grad_x[lo:hi])
                else:  # SwiGLU: the up projection's contribution adds to the gate's
                    grad_x[lo:hi].addmm_(gh[lo:hi], w[e].t())
                torch.mm(x[lo:hi].t(), gh[lo:hi], out=gw[e])
        return grad_x.to(x_dtype), grad_w1.to(w1_dtype), grad_w2.to(w2_dtype), None, None


def grouped_ffn(
    x_RD: torch.Tensor,
    w1_EDG: torch.Tensor,
    w2_EFD: torch.Tensor,
    rows_per_expert: list[int],
    activation: str,
) -> torch.Tensor:
    """Expert e's FFN on its block of `rows_per_expert[e]` consecutive rows; zero-row experts
    skip."""
    return _GroupedFFN.apply(x_RD, w1_EDG, w2_EFD, rows_per_expert, activation)
