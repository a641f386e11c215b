"""Initialising an `MoELayer` in place (after `to_empty` from the meta device): its router, its
extra modules, its balancing state and its experts, each expert from its own seed so a rank
holding some experts initialises them exactly as a single process holding all of them does.

Example:
    >>> from moeflow.moe.config import MoEConfig
    >>> from moeflow.moe.layer import MoELayer
    >>> a, b = (MoELayer(MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=8))
    ...         for _ in range(2))
    >>> a.reset_parameters(seed=3, salt=1); b.reset_parameters(seed=3, salt=1)
    >>> torch.equal(a.experts.w1, b.experts.w1)
    True
"""

from __future__ import annotations

import torch

from moeflow.moe.experts import slice_experts
from moeflow.moe.ffn import init_ffn_weights_


@torch.no_grad()
def reset_layer(layer, generator: torch.Generator | None, seed: int | None, salt: int) -> None:
    """Layer `layer`'s parameters and buffers: the router and the extra modules from
    `generator` (in this order), the experts seeded by `(seed, salt, logical id)`."""
    layer.reset_buffers()
    layer.router.reset_parameters(generator=generator)
    layer.router.expert_bias.zero_()
    if layer.ffn_out_bias is not None:
        layer.ffn_out_bias.zero_()
    for module in (layer.a2a, layer.zc_experts, layer.shared_expert):
        if module is not None:
            module.reset_parameters(generator=generator)
    init_experts(layer, seed, salt)


def init_experts(layer, seed: int | None, salt: int) -> None:
    """Each expert from its own generator, seeded by (seed, salt, logical id): a rank that holds
    experts {4..7} initialises them exactly as a single process holding all 8 does."""
    if seed is None:
        layer.experts.reset_parameters()
        return
    w1, w2 = layer.experts.w1, layer.experts.w2
    cfg = layer.config
    lo, hi = layer.layout.ffn_range(layer.expert_dispatch.rank)
    for slot, logical in enumerate(layer.local_expert_ids):
        gen = torch.Generator(device=w1.device).manual_seed(
            (seed * 1_000_003 + salt) * 1_000_003 + logical
        )
        if (lo, hi) == (0, cfg.ffn_hidden_size):
            init_ffn_weights_(w1[slot], w2[slot], gen)
            continue
        # An F-slice: draw the whole expert, keep the slice (as the single process has it).
        full1 = w1.new_empty(w1.shape[1], w1.shape[2] // (hi - lo) * cfg.ffn_hidden_size)
        full2 = w2.new_empty(cfg.ffn_hidden_size, w2.shape[2])
        init_ffn_weights_(full1, full2, gen)
        part1, part2 = slice_experts(full1[None], full2[None], None, lo, hi)
        w1[slot].copy_(part1[0])
        w2[slot].copy_(part2[0])
