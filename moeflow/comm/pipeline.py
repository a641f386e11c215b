"""Dispatch -> compute -> combine over an exchange, pipelined in chunks, forward and backward.

Legend: C chunks (the overlap degree), P parameters of the compute (e.g. local expert weights).

`exchange_compute(params, x_chunks, plan)` is one autograd op. `x_chunks[c]` holds the rows this
rank sends in chunk c, ordered by destination rank; `plan.input_splits[c]` / `plan.output_splits[c]`
say how many rows go to / come from each rank. `compute` is an `ExpertCompute`
(`moeflow.comm.compute`: `materialize`, `forward`, `new_grads`, `backward`, `finish`), given each
chunk's received blocks, so this module knows nothing about experts or models. An optional `side`
(`SideCompute`, e.g. a shared expert) is a differentiable `fn(*inputs)` that needs no exchange: it
runs while the first transfer is in flight, forward and backward, and its output comes back beside
the chunks.

Schedule (forward; the backward is the same with dispatch and combine swapped):

0. `compute.materialize(params)` (any collective it needs runs here, before the first dispatch; in
   backward it runs again: only the given params are saved, never the materialized ones).
1. Issue the dispatch all-to-all of chunk 0 (async); then the side computation, if any (in
   backward: its gradients), while that transfer is in flight.
2. For c = 0..C-1: issue the dispatch of chunk c+1 (async); wait for the dispatch of chunk c;
   compute chunk c; issue the combine all-to-all of chunk c's output (async).
3. Wait for every combine; return the combined chunks.

So the transfer of chunk c+1 and the return of chunk c-1 are in flight while chunk c computes. Every
rank issues the same collectives in the same order (C is a config value, never derived from data),
so no rank can wait on a transfer another rank did not start. With C=1 nothing overlaps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from moeflow.comm.all_to_all import Exchange, wait
from moeflow.comm.compute import ExpertCompute, ReceivedBlocks


@dataclass(frozen=True)
class ChunkPlan:
    """Split sizes per chunk and per rank, known on every rank after the count exchange."""

    input_splits: list[list[int]]  # [C][ranks]: rows this rank sends to each rank
    output_splits: list[list[int]]  # [C][ranks]: rows this rank receives from each rank
    chunk_meta: list[ReceivedBlocks]  # per chunk, passed to the compute
    matrices: list[list[list[int]]] | None = None  # [C][W][W] rows i -> j, for two-level exchanges

    @property
    def num_chunks(self) -> int:
        return len(self.input_splits)


@dataclass(frozen=True)
class SideCompute:
    """`fn(*inputs) -> Tensor`, differentiable in the `inputs` (activations and parameters), run
    while the first transfer is in flight. Its autograd graph is built inside the op and kept to
    its backward, so it is not recomputed."""

    fn: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]


class _Side:
    """Runs a `SideCompute` inside the op: forward records its graph on detached inputs, backward
    replays the gradient through it."""

    def __init__(self, side: SideCompute | None, record: bool) -> None:
        self.side, self.record, self.leaves, self.out = side, record, (), None

    def forward(self) -> None:
        if self.side is None:
            return
        self.leaves = tuple(t.detach().requires_grad_(t.requires_grad) for t in self.side.inputs)
        with torch.set_grad_enabled(self.record):  # no graph under no_grad (inference)
            self.out = self.side.fn(*self.leaves)

    def backward(self, grad: torch.Tensor | None) -> list[torch.Tensor | None]:
        if self.side is None:
            return []
        need = [t for t in self.leaves if t.requires_grad]
        grads = iter(
            torch.autograd.grad(self.out, need, grad, allow_unused=True)
            if grad is not None and need and self.out.requires_grad
            else [None] * len(need)
        )
        self.leaves, self.out = (), None  # the graph is freed once used
        return [next(grads) if t.requires_grad else None for t in self.side.inputs]


class _ExchangeCompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, exchange: Exchange, compute, plan: ChunkPlan, num_params: int, side, *tensors):
        n_side = 0 if side.side is None else len(side.side.inputs)
        params = tensors[:num_params]
        x_chunks = tensors[num_params + n_side :]
        run = compute.materialize(params)
        outs, saved, sizes = _pipeline(
            exchange,
            x_chunks,
            plan.input_splits,
            plan.output_splits,
            lambda c, x_recv: compute.forward(run, x_recv, plan.chunk_meta[c]),
            plan.matrices,
            side.forward,
        )
        ctx.exchange, ctx.compute, ctx.plan, ctx.num_params = exchange, compute, plan, num_params
        ctx.sizes, ctx.side = sizes, side
        ctx.save_for_backward(*params, *[t for chunk in saved for t in chunk])
        if side.out is not None:
            outs.append(side.out.detach())
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs):
        tensors = ctx.saved_tensors
        params = tensors[: ctx.num_params]
        flat, saved, offset = tensors[ctx.num_params :], [], 0
        for n in ctx.sizes:
            saved.append(list(flat[offset : offset + n]))
            offset += n
        plan: ChunkPlan = ctx.plan
        side: _Side = ctx.side
        grad_side = grad_outs[-1] if side.out is not None else None
        grad_outs = grad_outs[: plan.num_chunks]
        side_grads: list = []
        params = ctx.compute.materialize(params)
        acc = ctx.compute.new_grads(params)
        grads_x, _, _ = _pipeline(
            ctx.exchange,
            grad_outs,
            plan.input_splits,
            plan.output_splits,
            lambda c, g_recv: (
                ctx.compute.backward(params, saved[c], g_recv, plan.chunk_meta[c], acc),
                [],
            ),
            plan.matrices,
            lambda: side_grads.extend(side.backward(grad_side)),
        )
        return (None, None, None, None, None, *ctx.compute.finish(acc), *side_grads, *grads_x)


def _pipeline(exchange, chunks, input_splits, output_splits, step, matrices=None, side=None):
    """The numbered schedule above. `step(c, received) -> (result, saved)`; results are sent back
    with the splits reversed (and the split matrix transposed); `side()` runs once the first
    transfer is issued."""
    num = len(chunks)

    def matrix(c: int, back: bool):
        if matrices is None:
            return None
        m = matrices[c]
        return [list(col) for col in zip(*m, strict=True)] if back else m

    inflight: dict[int, tuple[torch.Tensor, Any]] = {}

    def dispatch(c: int) -> None:
        inflight[c] = exchange.all_to_all(
            chunks[c], output_splits[c], input_splits[c], matrix(c, back=False)
        )

    outs: list[Any] = [None] * num
    saved: list[list[torch.Tensor]] = [[] for _ in range(num)]
    combines = []
    if num:
        dispatch(0)
    if side is not None:
        side()
    for c in range(num):
        if c + 1 < num:
            dispatch(c + 1)
        received, handle = inflight.pop(c)
        wait(handle)
        result, saved[c] = step(c, received)
        out, back = exchange.all_to_all(
            result, input_splits[c], output_splits[c], matrix(c, back=True)
        )
        outs[c] = out
        combines.append(back)
    for handle in combines:
        wait(handle)
    return outs, saved, [len(s) for s in saved]


def exchange_compute(
    exchange: Exchange,
    compute: ExpertCompute,
    plan: ChunkPlan,
    params: tuple[torch.Tensor, ...],
    x_chunks: list[torch.Tensor],
    side: SideCompute | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Send `x_chunks`, run `compute` on what arrives, send the results back; differentiable in
    `params` and `x_chunks`, with the same pipelining in backward. Returns the combined chunks
    and the output of `side` (None without one)."""
    if len(x_chunks) != plan.num_chunks:
        raise ValueError(f"{len(x_chunks)} chunks but the plan has {plan.num_chunks}")
    inputs = () if side is None else side.inputs
    outs = _ExchangeCompute.apply(
        exchange,
        compute,
        plan,
        len(params),
        _Side(side, torch.is_grad_enabled()),
        *params,
        *inputs,
        *x_chunks,
    )
    outs = list(outs)
    return (outs[:-1], outs[-1]) if side is not None else (outs, None)
