"""Megatron's capacity drops on a moeflow layer: the pairs Megatron-Core keeps, not moeflow's.

moeflow's own `drop_policy` ranks pairs explicitly (`moeflow.comm.capacity`): "position" keeps
each expert's earliest tokens, "probs" its highest weights with ties by token order. Megatron's
`apply_router_token_dropping` takes `torch.topk(..., dim=0, sorted=False)` over a `[T, E]` map
instead (the 0/1 routing map for "position", the routing probabilities for "probs"), so which
of several tied tokens it keeps is that op's order, not the earliest. `MegatronMoE` installs
`megatron_drops` on its router: the router then marks the pairs Megatron keeps (`keep_TK`), by
the same op on the same map, with Megatron's capacity `ceil(T * k / E * capacity_factor)` (no
minimum; nothing dropped where it exceeds T); the layer's own capacity pass then keeps them all.

Example (capacity 1 per expert; which of the tied tokens stays is Megatron's choice):
    >>> from moeflow.moe.config import MoEConfig, RouterConfig
    >>> from moeflow.moe.layer import MoELayer
    >>> layer = MoELayer(MoEConfig(hidden_size=4, num_experts=2, ffn_hidden_size=4,
    ...     router=RouterConfig(top_k=1, capacity_factor=1.0, drop_policy="position")))
    >>> _ = layer.router.register_forward_hook(megatron_drops)
    >>> route = layer.router(torch.randn(2, 4))
    >>> int(route.keep_TK.sum()) == 2 - int(route.expert_ids_TK[0] == route.expert_ids_TK[1])
    True
"""

from __future__ import annotations

import dataclasses
import math

import torch

from moeflow.moe.routers.base import RouterOutput


def megatron_drops(router, args, out: RouterOutput) -> RouterOutput | None:
    """Forward hook on a router: `out` with `keep_TK` set to the pairs Megatron keeps (see the
    module doc); None (unchanged) without a capacity."""
    rc = router.config
    if rc.capacity_factor is None:
        return None
    ids, weights = out.expert_ids_TK, out.weights_TK
    num_tokens, num_experts = ids.shape[0], router.num_experts
    capacity = math.ceil((num_tokens * rc.top_k / num_experts) * rc.capacity_factor)
    if capacity > num_tokens:  # Megatron drops nothing then
        return dataclasses.replace(out, keep_TK=torch.ones_like(ids, dtype=torch.bool))
    if rc.drop_policy == "position":
        ranked = torch.zeros(num_tokens, num_experts, dtype=torch.int32, device=ids.device)
        ranked.scatter_(1, ids, 1)
    else:  # "probs": the routing probabilities, as dense as Megatron's
        ranked = torch.zeros(num_tokens, num_experts, dtype=weights.dtype, device=ids.device)
        ranked.scatter_(1, ids, weights.detach())
    _, rows = torch.topk(ranked, k=capacity, dim=0, sorted=False)
    kept = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=ids.device)
    kept.scatter_(0, rows, True)
    return dataclasses.replace(out, keep_TK=kept.gather(1, ids))
