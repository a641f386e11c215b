"""One step of an expert-parallel model and of its single-process reference, for EP tests."""

from __future__ import annotations

from torch import nn

from moeflow import set_aux_loss_scale
from moeflow.parallel import GradSync


def parallel_and_reference_step(par: nn.Module, ref: nn.Module, ctx, xs: list, gs: list):
    """`par` runs this rank's shard `xs[rank]` (loss `sum(out * gs[rank])`, grads synced by
    GradSync); `ref` runs every rank's shard in one process with the mean of those losses, which
    is what the parallel step computes. Returns `(out, x, ref_outs, ref_xs)`."""
    rank, world = ctx.rank, ctx.world_size
    x = xs[rank].clone().requires_grad_(True)
    out = par(x)
    (out * gs[rank]).sum().backward()
    GradSync(par, ctx).sync()
    set_aux_loss_scale(ref, 1.0 / world)
    ref_xs = [t.clone().requires_grad_(True) for t in xs]
    ref_outs = [ref(t) for t in ref_xs]
    sum((o * g).sum() for o, g in zip(ref_outs, gs, strict=True)).div(world).backward()
    return out, x, ref_outs, ref_xs
