"""Grouped expert FFN: `y[rows] = act(x[rows] @ w1[e]) @ w2[e]` for every block of rows of expert e.

Legend: R rows, D model dim, F FFN dim, g = 2 for SwiGLU, E experts, n rows of one block.

With biases (`MoEConfig.ffn_bias`) `w1` is `[E, D+1, gF]`, its last row the bias `b1`: the first
GEMM is then `addmm(b1[e], x, w1[e, :D])` and the bias gradient the column sums of the
pre-activation gradient (written into that row of w1's gradient). The output bias `b2` is not
here: the MoE layer adds it after the combine.

A *block* is `(expert, first row, end row)`. Blocks of one expert need not be adjacent: under expert
parallelism the received buffer is ordered by source rank, then expert, so expert e owns one block
per source rank and the GEMMs run on those blocks in place (no reordering copy).

Why a hand-written backward: autograd over a per-expert loop pays for `split`/`cat` copies of every
activation, a `chunk`+`cat` per expert for SwiGLU, and one zero-filled weight-sized tensor per
indexed expert. Here the work runs block by block, every GEMM writing straight into its rows of a
preallocated buffer: the activation of a block runs while its GEMM output is still in cache, and the
backward's temporaries are `[n, F]` per block (reused by the allocator from one block to the next)
instead of `[R, F]`, which on CPU would be page-faulted in again every step. The math is
`moeflow.moe.ffn.FeedForward` per expert; tests compare the two and run gradcheck. Under
`torch.autocast` the GEMMs run in the autocast dtype, as `nn.Linear` would.

Token order (`src`): where no row travels (`moeflow.comm.local_compute`), `x` is the tokens
`[T, D]` themselves and buffer row r is token `src[r]`: each block gathers its rows where its GEMM
reads them (still in cache), and the backward gathers its rows of the output gradient (`[T, D]`
too) the same way, so no `[R, D]` input buffer is written or kept. The outputs are rows as
always (the caller sums each token's rows).

`ffn_forward` / `ffn_backward` are plain functions (no autograd) so that the expert-parallel
dispatcher can interleave them with communication in its own forward and backward; the autograd
op is the dispatcher's (`moeflow.moe.expert_compute.grouped_ffn` runs it on one rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Block = tuple[int, int, int]


def blocks_from_counts(rows_per_expert: list[int]) -> list[Block]:
    """Blocks for rows grouped by expert: expert e owns the next `rows_per_expert[e]` rows."""
    out, start = [], 0
    for e, n in enumerate(rows_per_expert):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for `x`'s device, else `x`'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@dataclass
class FFNActivations:
    """What the backward of one `ffn_forward` call needs: per block `[a, *hs, (aux)]` with `hs` the
    pre-activations (`[gate, up]` for SwiGLU, else `[h]`), `aux = silu(gate)` for SwiGLU and `a` the
    activation. Per-block tensors (not one `[R, F]` buffer each) stay below glibc's mmap threshold,
    so the allocator reuses them step after step instead of page-faulting them in again."""

    x: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    per_block: list[list[torch.Tensor]]
    blocks: list[Block]
    activation: str
    row_w: torch.Tensor | None = None  # per-row output weights (`ffn_forward`'s `row_w`)
    src: torch.Tensor | None = None  # token order: buffer row r is `x[src[r]]` (see the module doc)
    # `row_w a` `[R, F]` where the forward made it (W2's input on the whole-buffer path where
    # F < D), kept for W2's gradient rather than made again.
    a_w: torch.Tensor | None = None

    @staticmethod
    def width(activation: str) -> int:
        return 4 if activation == "swiglu" else 2

    def tensors(self) -> list[torch.Tensor | None]:
        """For `ctx.save_for_backward` (so saved-tensor hooks, e.g. activation checkpointing or
        offloading, see them); `from_tensors` rebuilds the object."""
        blocks = [t for block in self.per_block for t in block]
        return [self.x, self.w1, self.w2, self.row_w, self.src, self.a_w, *blocks]

    def without_weights(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """`tensors()` less `w1` and `w2` (the pipeline saves the weights once), with `x` first
        (e.g. the whole received rows of which `self.x` is a column view); `from_tensors` takes
        `[x, w1, w2, *rest]` where this gives `[x, *rest]`."""
        return [x, *self.tensors()[3:]]

    @classmethod
    def from_tensors(cls, tensors, blocks: list[Block], activation: str) -> FFNActivations:
        x, w1, w2, row_w, src, a_w, *rest = tensors
        k = cls.width(activation)
        per_block = [list(rest[i : i + k]) for i in range(0, len(rest), k)]
        return cls(x, w1, w2, per_block, blocks, activation, row_w, src, a_w)

    @property
    def num_rows(self) -> int:
        return self.x.shape[0] if self.src is None else self.src.shape[0]


class WeightGrads:
    """Weight gradients filled block by block: the first block of an expert writes, later blocks
    add, and experts with no block at all get zeros (each matrix on its own: a kernel may fill
    W2's gradients in one pass over the blocks and W1's in another)."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor) -> None:
        self.w1 = torch.empty_like(w1)
        self.w2 = torch.empty_like(w2)
        self.ffn = w2.shape[1]
        self.written1: set[int] = set()
        self.written2: set[int] = set()

    def accumulate(self, e: int, x_nD, grad_hs, a_nF, grad_nD) -> None:
        self.accumulate_w1(e, x_nD, grad_hs)
        self.accumulate_w2(e, a_nF, grad_nD)

    def accumulate_w1(self, e: int, x_nD, grad_hs) -> None:
        """`x^T grad_h` (per SwiGLU half) into expert e's W1 gradient (and its bias row)."""
        first = e not in self.written1
        self.written1.add(e)
        d = x_nD.shape[1]
        parts = [self.w1[e]] if len(grad_hs) == 1 else list(self.w1[e].split(self.ffn, dim=-1))
        for gw, gh in zip(parts, grad_hs, strict=True):
            _mm_into(gw[:d], x_nD.t(), gh, first)
            if gw.shape[0] > d:  # the bias row: column sums of the pre-activation gradient
                if first:
                    torch.sum(gh, dim=0, out=gw[d])
                else:
                    gw[d].add_(gh.sum(dim=0))

    def accumulate_w2(self, e: int, a_nF, grad_nD) -> None:
        """`a^T grad_y` into expert e's W2 gradient."""
        first = e not in self.written2
        self.written2.add(e)
        _mm_into(self.w2[e], a_nF.t(), grad_nD, first)

    def add_all(self, g1: torch.Tensor, g2: torch.Tensor, ends: list[int]) -> None:
        """Every expert's gradient at once (the grouped-GEMM path): experts that had rows are
        written or added to, the others left to `finish`."""
        starts = [0, *ends[:-1]]
        for e, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
            if hi > lo:
                pairs = ((self.w1, self.written1, g1), (self.w2, self.written2, g2))
                for grads, written, g in pairs:
                    (grads[e].copy_ if e not in written else grads[e].add_)(g[e])
                    written.add(e)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        for e in range(self.w1.shape[0]):
            if e not in self.written1:
                self.w1[e].zero_()
            if e not in self.written2:
                self.w2[e].zero_()
        return self.w1, self.w2


def _tanh(activation: str) -> str:
    return "tanh" if activation == "gelu_tanh" else "none"


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, overwrite: bool) -> None:
    if overwrite:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def take(x: torch.Tensor, src: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """Buffer rows `lo:hi`: a slice of `x`, or in token order (`src`) their tokens, gathered."""
    return x[lo:hi] if src is None else x.index_select(0, src[lo:hi])


def ffn_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    blocks: list[Block],
    activation: str,
    row_w: torch.Tensor | None = None,
    src: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FFNActivations]:
    """Run every block; `x`, `w1`, `w2` already in the compute dtype. Rows in no block give 0.
    `row_w` `[R]`: each output row is scaled by its weight (the router's, applied here while the
    block is in cache, so the combine only sums; `ffn_backward` then returns the weights'
    gradient, `<a W2, grad_y> = <a, grad_y W2^T>` over F instead of D, and nothing of `y` is
    kept). With `src` (token order, see the module doc) `x` is `[T, D]`, read per block."""
    d, ffn = x.shape[1], w2.shape[1]
    rows = x.shape[0] if src is None else src.shape[0]
    # SwiGLU's gate and up projections (column blocks of w1) are separate GEMMs into contiguous
    # tensors: elementwise kernels on strided halves of one buffer run ~2x slower on CPU.
    w1_parts = list(w1.split(ffn, dim=-1))
    bias = w1.shape[1] > d
    covered = sum(hi - lo for _, lo, hi in blocks)
    y = x.new_empty(rows, w2.shape[-1]) if covered == rows else x.new_zeros(rows, w2.shape[-1])
    per_block = []
    for e, lo, hi in blocks:
        xb = take(x, src, lo, hi)
        if bias:
            hs = [torch.addmm(w[e, d], xb, w[e, :d]) for w in w1_parts]
        else:
            hs = [xb @ w[e] for w in w1_parts]
        if activation == "swiglu":
            aux = F.silu(hs[0])
            a = aux * hs[1]
            per_block.append([a, *hs, aux])
        else:
            a = (
                F.relu(hs[0])
                if activation == "relu"
                else F.gelu(hs[0], approximate=_tanh(activation))
            )
            per_block.append([a, *hs])
        torch.mm(a, w2[e], out=y[lo:hi])
        if row_w is not None:
            y[lo:hi].mul_(row_w[lo:hi].unsqueeze(-1))
    return y, FFNActivations(x, w1, w2, per_block, blocks, activation, row_w, src)


def ffn_backward(
    saved: FFNActivations,
    grad_y: torch.Tensor,
    weight_grads: WeightGrads,
    out: torch.Tensor | None = None,
    grad_w: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient wrt the rows (rows in no block get 0); weight gradients go into `weight_grads`.
    `out` `[R, D]` (or `[R, D + 1 + pad]` with row weights: column D receives their gradient,
    unless `grad_w` `[R]` is given; padding columns are left as they are) is written in place of
    a new buffer. In token order (`saved.src`) `grad_y` is `[T, D]`, read per block like `x`."""
    s = saved
    grad_y = grad_y.to(s.x.dtype).contiguous()
    rows, d = s.num_rows, s.x.shape[1]
    covered = sum(hi - lo for _, lo, hi in s.blocks)
    weighted = s.row_w is not None
    into_out = weighted and grad_w is None
    if out is None:
        out = s.x.new_empty(rows, d + into_out)
    if covered < rows:
        out.zero_()
    grad_x = out[:, :d]
    # The weights' gradient, contiguous (one strided copy into `out` at the end).
    if into_out:
        grad_w = s.x.new_zeros(rows)
    w1_parts = list(s.w1.split(s.w2.shape[1], dim=-1))
    for (e, lo, hi), tensors in zip(s.blocks, s.per_block, strict=True):
        a, h0 = tensors[0], tensors[1]
        gy = take(grad_y, s.src, lo, hi)
        grad_a = gy @ s.w2[e].t()  # [n, F], consumed below
        a_w2 = a  # what W2's gradient multiplies: the rows' (weighted) activations
        if weighted:
            w_n1 = s.row_w[lo:hi].unsqueeze(-1)
            torch.linalg.vecdot(a, grad_a, out=grad_w[lo:hi])  # <a W2, g> = <a, g W2^T>
            grad_a.mul_(w_n1)
            a_w2 = a * w_n1
        if s.activation == "swiglu":
            up, aux = tensors[2], tensors[3]
            grad_up = grad_a * aux  # d/d up = silu(gate)
            grad_a.mul_(up)  # d/d silu(gate)
            torch.ops.aten.silu_backward.grad_input(grad_a, h0, grad_input=grad_a)
            grad_hs = [grad_a, grad_up]
        elif s.activation in ("gelu", "gelu_tanh"):
            torch.ops.aten.gelu_backward.grad_input(
                grad_a, h0, approximate=_tanh(s.activation), grad_input=grad_a
            )
            grad_hs = [grad_a]
        else:
            grad_a.masked_fill_(h0 <= 0, 0)
            grad_hs = [grad_a]
        for i, (gh, w) in enumerate(zip(grad_hs, w1_parts, strict=True)):
            # SwiGLU: the up projection's contribution adds to the gate's.
            _mm_into(grad_x[lo:hi], gh, w[e, :d].t(), overwrite=i == 0)
        weight_grads.accumulate(e, take(s.x, s.src, lo, hi), grad_hs, a_w2, gy)
    if into_out:
        out[:, d].copy_(grad_w)
    return out
