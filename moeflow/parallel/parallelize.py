"""parallelize(model, ctx): shard every MoELayer's experts over `ep` and wire its dispatcher.

Layers are built without any process group (the same model code runs on one CPU process and on many
GPUs); this function makes them expert-parallel afterwards. Steps, on every rank:

1. Gather every rank's list of (layer name, config fingerprint) over the world group: ranks built
   with different MoE configs get the same error, instead of a hang in their first all-to-all.
2. Check each layer: `num_experts` divisible by `ep`, and its logical-to-physical map a permutation.
3. Keep only this rank's experts: physical slots `[ep_index * L, (ep_index + 1) * L)`, L = E / ep,
   holding the logical experts the map sends there (contiguous blocks by default).
4. Give the layer a `TokenDispatcher` over the `ep` group, and the world group as its balance
   group (global-batch balancing counts, aux-loss-free bias loads).

The model must hold the full set of experts, identical on every rank (same seed or same checkpoint),
when this is called.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from moeflow.comm.all_to_all import GroupExchange
from moeflow.comm.dispatcher import DispatchConfig, TokenDispatcher
from moeflow.comm.hierarchical import HierarchicalExchange
from moeflow.moe.layer import MoELayer
from moeflow.parallel.dims import ParallelContext


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def _check_same_configs(layers: list[tuple[str, MoELayer]], ctx: ParallelContext) -> None:
    mine = [(name, layer.config.fingerprint()) for name, layer in layers]
    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine, group=ctx.world_group)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            raise ValueError(
                f"MoE layers differ between ranks 0 and {rank}: rank 0 has {everyone[0]}, rank "
                f"{rank} has {theirs} (name, config fingerprint). Build the same model with the "
                "same MoE config on every rank."
            )


def _check_map(name: str, expert_map: torch.Tensor, num_experts: int) -> None:
    if expert_map.shape != (num_experts,) or not torch.equal(
        expert_map.sort().values.cpu(), torch.arange(num_experts)
    ):
        raise ValueError(
            f"expert map of MoE layer '{name}' ({expert_map.tolist()}) must be a permutation of "
            f"0..{num_experts - 1}"
        )


def shard_experts(layer: MoELayer, expert_map: torch.Tensor, ep_index: int, ep: int) -> None:
    """Keep the L experts that `expert_map` places on `ep_index`, in slot order."""
    num_experts = layer.config.num_experts
    local = num_experts // ep
    slot_to_logical = torch.empty_like(expert_map)
    slot_to_logical[expert_map] = torch.arange(num_experts, device=expert_map.device)
    mine_ids = slot_to_logical[ep_index * local : (ep_index + 1) * local].tolist()
    mine = torch.tensor(mine_ids, device=layer.experts.w1.device)
    full = layer.experts
    with torch.no_grad():
        w1 = full.w1.detach()[mine].clone()
        w2 = full.w2.detach()[mine].clone()
    full.w1 = nn.Parameter(w1, requires_grad=full.w1.requires_grad)
    full.w2 = nn.Parameter(w2, requires_grad=full.w2.requires_grad)
    full.num_experts = local
    layer.set_expert_placement(expert_map.tolist(), mine_ids)


def _make_exchange(ctx: ParallelContext, dispatch: DispatchConfig):
    if not dispatch.two_level:
        return GroupExchange(ctx.ep_group)
    ranks_per_node = dispatch.ranks_per_node
    if ranks_per_node is None:
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if local is None:
            raise ValueError(
                "dispatch.two_level needs dispatch.ranks_per_node, or LOCAL_WORLD_SIZE in the "
                "environment (torchrun sets it)"
            )
        ranks_per_node = int(local)
    ranks_per_node = min(ranks_per_node, ctx.dims.ep)
    intra, inter = ctx.node_groups(ranks_per_node)
    return HierarchicalExchange(ctx.ep_group, intra, inter, ranks_per_node)


def parallelize(
    model: nn.Module,
    ctx: ParallelContext,
    dispatch: DispatchConfig | None = None,
    expert_maps: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Make every `MoELayer` of `model` expert-parallel over `ctx`'s `ep` axis, in place.

    `expert_maps[name]`: the layer's logical-to-physical expert map (default: identity, i.e.
    contiguous blocks of expert ids per rank). World size 1 and ep=1 take the same path.

    Example:
        >>> parallelize.__name__
        'parallelize'
    """
    layers = moe_layers(model)
    _check_same_configs(layers, ctx)
    ep = ctx.dims.ep
    for name, layer in layers:
        if layer.config.num_experts % ep:
            raise ValueError(
                f"moe.num_experts ({layer.config.num_experts}) of layer '{name}' must be "
                f"divisible by parallel.ep ({ep})"
            )
        if layer.experts.w1.shape[0] != layer.config.num_experts:
            raise ValueError(f"MoE layer '{name}' is already parallelized")
        expert_map = (expert_maps or {}).get(name)
        if expert_map is None:
            expert_map = torch.arange(layer.config.num_experts)
        expert_map = torch.as_tensor(expert_map, dtype=torch.int64)
        _check_map(name, expert_map, layer.config.num_experts)
    exchange = _make_exchange(ctx, dispatch or DispatchConfig())
    for name, layer in layers:
        expert_map = torch.as_tensor(
            (expert_maps or {}).get(name, torch.arange(layer.config.num_experts)),
            dtype=torch.int64,
        )
        shard_experts(layer, expert_map, ctx.ep_index, ep)
        dispatcher = TokenDispatcher(exchange, layer.config.num_experts // ep, dispatch)
        dispatcher.name = f"MoE layer '{name}'"
        layer.dispatcher = dispatcher
        # Global-batch balancing and aux-loss-free bias updates count over every rank.
        layer.balance_group = ctx.world_group
    return model
