"""The grouped-GEMM expert path: each projection of every local expert in one
`torch.nn.functional.grouped_mm` call, for GPUs (one kernel per projection instead of one per
expert block), switchable per layer (`MoEConfig.expert_kernel`).

Legend: R rows (expert-major), D model dim, F FFN dim, g = 2 for SwiGLU, L local experts.

Same math as `moeflow.moe.grouped_ffn` (the per-block loop, the CPU default), same saved state
contract (`FFNActivations`), so `GroupedExpertCompute` runs either:

    forward:  h = gmm(x, w1) [R, gF];  a = act(h);  y = gmm(a, w2) [R, D];  y *= row_w
    backward: ga = gmm(g, w2^T);  grad_w = <a, ga>;  ga *= row_w
              gh = act'(h) ga;  grad_x = gmm(gh, w1^T)
              grad_w1 = gmm(x^T, gh) [L, D, gF];  grad_w2 = gmm((row_w a)^T, g) [L, F, D]

`gmm(a, b)` is `grouped_mm(a, b, offs=ends)` with `ends[e]` the end row of local expert e (zero
rows allowed). It needs the rows grouped by local expert in order from row 0 (the layer's own
buffers are), no bias row in w1, and a dtype the installed torch's grouped_mm accepts (bf16 on
CUDA; fp32 and bf16 on CPU in torch 2.13, not float64) with rows of a multiple of 16 bytes;
`usable` says whether a call qualifies
and the compute falls back to the loop otherwise. Whole-buffer intermediates (`[R, gF]`) are
kept for the backward, where the loop keeps them per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.moe.grouped_ffn import Block, FFNActivations, WeightGrads

KERNELS = ("auto", "loop", "grouped_mm")


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


# `auto` on CPU: grouped_mm from this many local experts (many small experts: the loop's per-block
# calls cost more than one grouped call). Measured with bench/layer.py, 2 threads, fp32: with 64
# local experts of F=64 (k=8) grouped_mm was 5-6% faster than the loop in all four settings; with
# 8 of F=512 (k=2) the loop was 5-7% faster.
CPU_GROUPED_FROM = 32


def usable(kernel: str, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether a call runs on grouped_mm: `grouped_mm` always (where it can run at all), `auto`
    on CUDA in bf16 and on CPU with `CPU_GROUPED_FROM` local experts or more (where it pays),
    `loop` never."""
    if kernel == "loop" or not hasattr(F, "grouped_mm") or w1.shape[1] != w2.shape[2]:
        return False  # a bias row in w1 (MoEConfig.ffn_bias) runs on the loop
    if x.dtype == torch.float64:
        return False
    if any(t.shape[-1] * t.element_size() % 16 for t in (x, w1, w2)):
        return False  # the kernels want 16-byte aligned rows
    if kernel == "auto":
        if x.device.type == "cpu":
            return w1.shape[0] >= CPU_GROUPED_FROM
        return x.device.type == "cuda" and x.dtype == torch.bfloat16
    return True


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(a, b, offs=offs)


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
) -> tuple[torch.Tensor, FFNActivations]:
    """The whole buffer at once (see the module doc); rows past `ends[-1]` give 0."""
    offs = torch.tensor(ends, dtype=torch.int32, device=x.device)
    x = x.contiguous()
    h = _gmm(x, w1, offs)
    a, saved = _activate(h, activation)
    y = _gmm(a, w2, offs)
    if ends[-1] < x.shape[0]:
        y[ends[-1] :] = 0
    if row_w is not None:
        y.mul_(row_w.unsqueeze(-1))
    per_block = [[a, *saved]]  # one "block": the whole buffer
    return y, FFNActivations(x, w1, w2, per_block, blocks, activation, row_w)


def backward(
    s: FFNActivations, grad_y: torch.Tensor, weight_grads: WeightGrads, ends: list[int]
) -> torch.Tensor:
    """Gradient wrt x (`[R, D + 1]` with row weights: the last column theirs); the weight
    gradients are added into `weight_grads`."""
    offs = torch.tensor(ends, dtype=torch.int32, device=s.x.device)
    grad_y = grad_y.to(s.x.dtype).contiguous()
    a, *saved = s.per_block[0]
    ga = _gmm(grad_y, s.w2.transpose(1, 2), offs)
    rows, d = s.x.shape
    out = s.x.new_empty(rows, d + (s.row_w is not None))
    a_w2 = a
    if s.row_w is not None:
        out[:, d] = torch.linalg.vecdot(a, ga)
        ga.mul_(s.row_w.unsqueeze(-1))
        a_w2 = a * s.row_w.unsqueeze(-1)
    if s.activation == "swiglu":
        gate, up, aux = saved
        grad_up = ga * aux
        grad_gate = torch.ops.aten.silu_backward(ga * up, gate)
        gh = torch.cat([grad_gate, grad_up], dim=-1)
    elif s.activation == "relu":
        gh = ga.masked_fill(saved[0] <= 0, 0)
    else:
        approximate = "tanh" if s.activation == "gelu_tanh" else "none"
        gh = torch.ops.aten.gelu_backward(ga, saved[0], approximate=approximate)
    out[:, :d] = _gmm(gh, s.w1.transpose(1, 2), offs)
    if ends[-1] < rows:
        out[ends[-1] :] = 0
    weight_grads.add_all(_gmm(s.x.t(), gh, offs), _gmm(a_w2.t(), grad_y, offs), ends)
    return out
