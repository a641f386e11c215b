"""The whole-buffer expert path: each projection of every local expert as one grouped GEMM and
each elementwise step over the whole buffer at once, switchable per layer
(`MoEConfig.expert_kernel`). Two GEMM backends: `grouped_mm`, one
`torch.nn.functional.grouped_mm` call per projection (for GPUs: one kernel instead of one per
expert); `grouped_loop`, one `torch.mm` per expert writing into its rows of one buffer (for CPUs
with many small experts, where torch's grouped_mm is slower than `mm` and the per-block loop's
many small elementwise calls cost more than they save).

Legend: R rows (expert-major), D model dim, F FFN dim, g = 2 for SwiGLU, L local experts.

Same math as `moeflow.moe.grouped_ffn` (the per-block loop, the CPU default), same saved state
contract (`FFNActivations`), so `GroupedExpertCompute` runs any of them:

    forward:  h = gmm(x, w1) [R, gF];  a = act(h);  y = gmm(a, w2) [R, D];  y *= row_w
    backward: ga = gmm(g, w2^T);  grad_w = <a, ga>;  ga *= row_w
              gh = act'(h) ga;  grad_x = gmm(gh, w1^T)
              grad_w1 = gmm(x^T, gh) [L, D, gF];  grad_w2 = gmm((row_w a)^T, g) [L, F, D]

`gmm(a, b)` runs `a[rows of e] @ b[e]` for every local expert e, with `ends[e]` the end row of
local expert e (zero rows allowed). It needs the rows grouped by local expert in order from row 0
(the layer's own buffers are) and no bias row in w1; `grouped_mm` also a dtype the installed
torch's grouped_mm accepts (bf16 on CUDA; fp32 and bf16 on CPU in torch 2.13, not float64) and
rows of a multiple of 16 bytes. `choose` says which kernel a call runs on (the loop where the one
asked for cannot run). `grouped_loop` writes the weight gradients per expert straight into the
accumulator and the input gradient straight into its columns of the output. Whole-buffer
intermediates (`[R, gF]`, and `row_w a` where the weights scale `a`) are kept for the backward,
where the loop keeps them per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.moe.grouped_ffn import Block, FFNActivations, WeightGrads, take

KERNELS = ("auto", "loop", "grouped_mm", "grouped_loop")


def grouped_ends(blocks: list[Block], num_experts: int) -> list[int] | None:
    """`ends[e]`: the end row of local expert e, if the blocks are grouped by expert in order
    from row 0 without gaps (one block per expert at most), else None."""
    ends, row, nxt = [], 0, 0
    for e, lo, hi in blocks:
        if e < nxt or lo != row:
            return None
        ends += [row] * (e - nxt)
        ends.append(hi)
        row, nxt = hi, e + 1
    return ends + [row] * (num_experts - nxt)


# `auto` on CPU: the whole-buffer path from this many local experts (many small experts: the
# loop's per-block elementwise calls cost more than their cache locality saves), with one
# `torch.mm` per expert (`grouped_loop`): torch 2.13's CPU grouped_mm runs the projections whose
# output is wider than their depth 2-2.5x slower than `mm` (measured at 64 experts of F=64, D=256,
# 512 rows each, 2 threads: `a @ w2` 19.4 ms grouped against 7.4 ms per expert; `x @ w1` 8.2
# against 8.4). With 8 experts of F=512 (k=2) the loop was 5-7% faster than either.
CPU_GROUPED_FROM = 32


def choose(kernel: str, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> str:
    """The kernel a call runs on: `loop`, `grouped_mm` or `grouped_loop`. `grouped_mm` where
    torch's grouped_mm can run at all (not float64, 16-byte rows, no bias row), `grouped_loop`
    wherever there is no bias row; `auto`: grouped_mm on CUDA in bf16, grouped_loop on CPU with
    `CPU_GROUPED_FROM` local experts or more, else the loop. A call that cannot run the kernel
    asked for runs the loop."""
    if kernel == "loop" or w1.shape[1] != w2.shape[2]:
        return "loop"  # a bias row in w1 (MoEConfig.ffn_bias) runs on the loop
    if kernel == "auto":
        if x.device.type == "cuda" and x.dtype == torch.bfloat16:
            kernel = "grouped_mm"
        elif x.device.type == "cpu" and w1.shape[0] >= CPU_GROUPED_FROM:
            return "grouped_loop"
        else:
            return "loop"
    if kernel == "grouped_loop":
        return kernel
    if not hasattr(F, "grouped_mm") or x.dtype == torch.float64:
        return "loop"
    # The kernels want 16-byte rows: of x, of h (w1's columns), of y, and of the activation `a`
    # (F, w2's rows), which for SwiGLU is half as wide as h.
    widths = (x.shape[-1], w1.shape[-1], w2.shape[-2], w2.shape[-1])
    if any(n * x.element_size() % 16 for n in widths):
        return "loop"
    return "grouped_mm"


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy where its row stride is not a multiple of 16 bytes (grouped_mm's
    requirement; a view into a wider row buffer usually is one already)."""
    if t.stride(-1) == 1 and t.stride(0) * t.element_size() % 16 == 0:
        return t
    return t.contiguous()


def offsets(ends: list[int], device: torch.device, offs: torch.Tensor | None = None):
    """`ends` as grouped_mm's int32 offsets on `device`: `offs` where the caller made them on
    the device (`moeflow.comm.compute.ReceivedBlocks`), else copied once from the host."""
    if offs is not None:
        return offs
    return torch.tensor(ends, dtype=torch.int32).to(device, non_blocking=True)


def _rows(a, w, ends: list[int], kernel: str, out=None, src=None, offs=None):
    """`out[rows of e] = a[rows of e] @ w[e]` for every local expert e; rows past `ends[-1]` are
    left as they are. `w` may be a transposed view (`mm` reads it in place). With `src` (token
    order, `grouped_loop` only) row r of `a` is `a[src[r]]`, gathered per expert. `offs`:
    `ends` on the device (`grouped_mm`)."""
    if kernel == "grouped_mm":
        if src is not None:
            raise ValueError("grouped_mm reads one row buffer; token order runs grouped_loop")
        y = F.grouped_mm(_aligned(a), w, offs=offsets(ends, a.device, offs))
        if out is None:
            return y
        return out[: y.shape[0]].copy_(y)
    if out is None:
        out = a.new_empty(a.shape[0] if src is None else src.shape[0], w.shape[-1])
    lo = 0
    for e, hi in enumerate(ends):
        if hi > lo:
            torch.mm(take(a, src, lo, hi), w[e], out=out[lo:hi])
        lo = hi
    return out


def _weight_grads(weight_grads, x, gh, a_w2, grad_y, ends, kernel, swiglu: bool, offs) -> None:
    """`x^T gh` and `a_w2^T grad_y` per local expert, into `weight_grads`."""
    if kernel == "grouped_mm":
        g1 = F.grouped_mm(_aligned(x).t(), gh, offs=offs)
        weight_grads.add_all(g1, F.grouped_mm(a_w2.t(), grad_y, offs=offs), ends)
        return
    lo = 0
    for e, hi in enumerate(ends):
        if hi > lo:
            parts = list(gh[lo:hi].chunk(2, dim=-1)) if swiglu else [gh[lo:hi]]
            weight_grads.accumulate(e, x[lo:hi], parts, a_w2[lo:hi], grad_y[lo:hi])
        lo = hi


def _activate(h: torch.Tensor, activation: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`(a, saved)`: the activation and what its backward needs (as the loop saves it)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        aux = F.silu(gate)
        return aux * up, [gate, up, aux]
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    if activation == "relu":
        return F.relu(h), [h]
    return F.gelu(h, approximate=approximate), [h]


def forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    blocks: list[Block],
    activation: str,
    row_w: torch.Tensor | None,
    ends: list[int],
    kernel: str = "grouped_mm",
    src: torch.Tensor | None = None,
    offs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FFNActivations]:
    """The whole buffer at once (see the module doc); rows past `ends[-1]` give 0. `x` may be a
    column view of a wider row buffer (the row weights' carrier). With `src` (token order,
    `moeflow.moe.grouped_ffn`; `grouped_loop` only) `x` is `[T, D]`, read per expert. `offs`:
    `ends` already on the device (else copied once per call)."""
    if kernel == "grouped_mm":
        offs = offsets(ends, x.device, offs)
    h = _rows(x, w1, ends, kernel, src=src, offs=offs)
    a, saved = _activate(h, activation)
    # Row weights scale the narrower side: `(w a) W2 = w (a W2)`. Both `a` (for the weights'
    # gradient) and `w a` (W2's gradient) are kept: making `w a` again in the backward was ~0.5%
    # of the step at T=4096, D=256, F=64, E=64, k=8 (2 KB per token kept).
    scale_a = row_w is not None and a.shape[1] < w2.shape[-1]
    a_w = a * row_w.unsqueeze(-1) if scale_a else None
    y = _rows(a if a_w is None else a_w, w2, ends, kernel, offs=offs)
    if ends[-1] < y.shape[0]:
        y[ends[-1] :] = 0
    if row_w is not None and not scale_a:
        y.mul_(row_w.unsqueeze(-1))
    per_block = [[a, *saved]]  # one "block": the whole buffer
    return y, FFNActivations(x, w1, w2, per_block, blocks, activation, row_w, src, a_w)


def _activation_backward(ga: torch.Tensor, saved: list[torch.Tensor], activation: str):
    """The pre-activation gradient from the activation's, `[R, gF]`."""
    if activation == "swiglu":
        # Both halves written in place into one `[R, 2F]` buffer (no `cat` copy of it).
        gate, up, aux = saved
        gh = ga.new_empty(ga.shape[0], 2 * ga.shape[1])
        grad_gate, grad_up = gh.chunk(2, dim=-1)
        torch.mul(ga, aux, out=grad_up)
        torch.mul(ga, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return gh
    if activation == "relu":
        return ga.masked_fill(saved[0] <= 0, 0)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.ops.aten.gelu_backward(ga, saved[0], approximate=approximate)


def backward(
    s: FFNActivations,
    grad_y: torch.Tensor,
    weight_grads: WeightGrads,
    ends: list[int],
    kernel: str = "grouped_mm",
    out: torch.Tensor | None = None,
    grad_w: torch.Tensor | None = None,
    offs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient wrt the rows, written into `out` (default a new `[R, D]`, or `[R, D + 1]` with
    row weights): with row weights column D is theirs (or `grad_w` `[R]`, if given); padding
    columns past it are left as they are. The weight gradients are added into `weight_grads`.
    In token order (`s.src`) `grad_y` is `[T, D]`, read per expert like `x`. `offs`: as in
    `forward`."""
    grad_y = grad_y.to(s.x.dtype).contiguous()
    if kernel == "grouped_mm":
        offs = offsets(ends, grad_y.device, offs)
    a, *saved = s.per_block[0]
    rows, d = s.num_rows, s.x.shape[1]
    weighted, src = s.row_w is not None, s.src
    a_w2 = a  # W2's gradient input: the rows' weighted activations
    if s.a_w is not None:
        a_w2 = s.a_w
    elif weighted:
        a_w2 = a * s.row_w.unsqueeze(-1)
    swiglu = s.activation == "swiglu"
    if src is None:
        ga = _rows(grad_y, s.w2.transpose(1, 2), ends, kernel, offs=offs)
    else:  # gather each expert's output gradient once: for its `ga` and its W2 gradient
        ga, lo = a.new_empty(rows, a.shape[1]), 0
        for e, hi in enumerate(ends):
            if hi > lo:
                gy = grad_y.index_select(0, src[lo:hi])
                torch.mm(gy, s.w2[e].t(), out=ga[lo:hi])
                weight_grads.accumulate_w2(e, a_w2[lo:hi], gy)
            lo = hi
    if out is None:
        out = s.x.new_empty(rows, d + (weighted and grad_w is None))
    if weighted:
        torch.linalg.vecdot(a, ga, out=out[:, d] if grad_w is None else grad_w)
        ga.mul_(s.row_w.unsqueeze(-1))
    gh = _activation_backward(ga, saved, s.activation)
    _rows(gh, s.w1.transpose(1, 2), ends, kernel, out=out[:, :d], offs=offs)
    if ends[-1] < rows:
        out[ends[-1] :] = 0
    if src is None:
        _weight_grads(weight_grads, s.x, gh, a_w2, grad_y, ends, kernel, swiglu, offs)
        return out
    lo = 0
    for e, hi in enumerate(ends):  # W1's gradients, the rows of x gathered again
        if hi > lo:
            parts = list(gh[lo:hi].chunk(2, dim=-1)) if swiglu else [gh[lo:hi]]
            weight_grads.accumulate_w1(e, s.x.index_select(0, src[lo:hi]), parts)
        lo = hi
    return out
