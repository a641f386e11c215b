"""One step of an expert-parallel model and of its single-process reference, for EP tests."""

from __future__ import annotations

import torch
from torch import nn

from moeflow import MoEConfig, MoELayer, set_aux_loss_scale
from moeflow.moe.routing_context import RoutingContext
from moeflow.parallel import GradSync


class RouterNet(nn.Module):
    """Dense, two MoE layers sharing a routing context (and RMoE's cell), dense; `mode` and
    `overlap` (None: the layers' defaults) are passed to every MoE layer call."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.shared = nn.ModuleDict()
        self.pre = nn.Linear(d, d, bias=False)
        self.moe1 = MoELayer(cfg, self.shared)
        self.moe2 = MoELayer(cfg, self.shared)
        self.post = nn.Linear(d, d, bias=False)
        self.mode: str | None = None
        self.overlap: int | None = None

    def forward(self, x):
        ctx = RoutingContext()
        h = self.pre(x)
        for layer in (self.moe1, self.moe2):
            h = h + layer(h, routing_context=ctx, mode=self.mode, overlap_degree=self.overlap)
        return self.post(h)


def build_router_net(cfg: MoEConfig) -> RouterNet:
    """A float64 `RouterNet` with seeded, spread-out router weights (varied routing)."""
    torch.manual_seed(0)
    model = RouterNet(cfg).double()
    with torch.no_grad():
        for layer in (model.moe1, model.moe2):
            for name, p in layer.router.named_parameters():
                if name in ("weight", "null_weight", "head"):
                    p.normal_(0.0, 1.0)
            if layer.router.config.type == "moepp":
                layer.router.residual.normal_(0.0, 0.3)
            if layer.ffn_out_bias is not None:
                layer.ffn_out_bias.normal_(0.0, 0.5)
    return model


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
