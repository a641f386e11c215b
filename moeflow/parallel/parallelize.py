"""parallelize(model, ctx): shard every MoELayer's experts over `ep` and wire its dispatcher.

Layers are built without any process group (the same model code runs on one CPU process and on many
GPUs); this function makes them expert-parallel afterwards. Steps, on every rank:

1. Gather every rank's list of (layer name, config fingerprint) over the world group: ranks built
   with different MoE configs get the same error, instead of a hang in their first all-to-all.
2. Check each layer: `num_experts` divisible by `ep`, and its placement valid (every expert in
   some slot, ranks with equal slot counts, no rank holding an expert twice).
3. Keep only this rank's experts: physical slots `[ep_index * L, (ep_index + 1) * L)` (L = E / ep,
   or more with replicas), holding the logical experts the placement puts there (contiguous blocks
   by default).
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


def map_to_slots(expert_map: list[int]) -> list[int]:
    """Logical-to-physical map (a permutation) -> slot list (`slots[map[e]] = e`)."""
    slots = [-1] * len(expert_map)
    for e, p in enumerate(expert_map):
        slots[int(p)] = e
    return slots


def initial_slots(num_experts: int, ep: int, replica_slots: int = 0) -> list[int]:
    """Contiguous blocks of E / ep experts per rank, then `replica_slots` more per rank holding
    copies of the next ranks' first experts (never one the rank already holds).

    Example:
        >>> initial_slots(4, 2), initial_slots(4, 2, replica_slots=1)
        ([0, 1, 2, 3], [0, 1, 2, 2, 3, 0])
    """
    own = num_experts // ep
    if replica_slots and own + replica_slots > num_experts:
        raise ValueError(
            f"placement.replica_slots ({replica_slots}) + {own} experts per rank exceeds the "
            f"{num_experts} experts: a rank holds at most one copy of each"
        )
    slots = []
    for g in range(ep):
        block = list(range(g * own, (g + 1) * own))
        extra = [(g * own + own + j) % num_experts for j in range(replica_slots)]
        slots += block + extra
    return slots


def check_slots(name: str, slots: list[int], num_experts: int, ep: int) -> None:
    """Raise unless `slots` places every expert, in `ep` ranks of equal slot counts (at least
    E / ep), with no rank holding an expert twice."""
    ok = len(slots) % ep == 0 and len(slots) >= num_experts
    ok = ok and all(isinstance(x, int) and 0 <= x < num_experts for x in slots)
    ok = ok and sorted(set(slots)) == list(range(num_experts))
    per_rank = len(slots) // ep if ok else 0
    ok = ok and all(
        len(set(slots[g * per_rank : (g + 1) * per_rank])) == per_rank for g in range(ep)
    )
    if not ok:
        raise ValueError(
            f"expert placement of MoE layer '{name}' ({slots}) must list, for each of {ep} "
            f"ranks in turn, the same number (>= {num_experts // ep}) of distinct expert ids, "
            f"every id in 0..{num_experts - 1} at least once"
        )


def shard_experts(layer: MoELayer, slots: list[int], ep_index: int, ep: int) -> None:
    """Keep the experts that `slots` gives rank `ep_index`, in slot order."""
    local = len(slots) // ep
    mine_ids = slots[ep_index * local : (ep_index + 1) * local]
    mine = torch.tensor(mine_ids, device=layer.experts.w1.device)
    full = layer.experts
    with torch.no_grad():
        w1 = full.w1.detach()[mine].clone()
        w2 = full.w2.detach()[mine].clone()
    full.w1 = nn.Parameter(w1, requires_grad=full.w1.requires_grad)
    full.w2 = nn.Parameter(w2, requires_grad=full.w2.requires_grad)
    full.num_experts = local
    layer.set_expert_placement(slots, ep_index, local)


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
    expert_maps: dict[str, torch.Tensor | list[int]] | None = None,
    expert_slots: dict[str, list[int]] | None = None,
) -> nn.Module:
    """Make every `MoELayer` of `model` expert-parallel over `ctx`'s `ep` axis, in place.

    Placement per layer name: `expert_maps[name]`, a logical-to-physical map (a permutation), or
    `expert_slots[name]`, the logical expert of every physical slot, rank after rank, which may
    hold replicas (more than E / ep slots per rank; see `initial_slots`). Default: contiguous
    blocks of expert ids per rank. World size 1 and ep=1 take the same path.

    Example:
        >>> parallelize.__name__
        'parallelize'
    """
    layers = moe_layers(model)
    _check_same_configs(layers, ctx)
    ep = ctx.dims.ep
    placements = {}
    for name, layer in layers:
        n = layer.config.num_experts
        if n % ep:
            raise ValueError(
                f"moe.num_experts ({n}) of layer '{name}' must be divisible by parallel.ep ({ep})"
            )
        if layer.experts.w1.shape[0] != n:
            raise ValueError(f"MoE layer '{name}' is already parallelized")
        if expert_slots and name in expert_slots:
            slots = [int(x) for x in expert_slots[name]]
        elif expert_maps and name in expert_maps:
            expert_map = [int(x) for x in torch.as_tensor(expert_maps[name]).tolist()]
            if sorted(expert_map) != list(range(n)):
                raise ValueError(
                    f"expert map of MoE layer '{name}' ({expert_map}) must be a permutation of "
                    f"0..{n - 1}"
                )
            slots = map_to_slots(expert_map)
        else:
            slots = list(range(n))
        check_slots(name, slots, n, ep)
        placements[name] = slots
    exchange = _make_exchange(ctx, dispatch or DispatchConfig())
    for name, layer in layers:
        slots = placements[name]
        shard_experts(layer, slots, ctx.ep_index, ep)
        dispatcher = TokenDispatcher(exchange, len(slots) // ep, dispatch)
        dispatcher.name = f"MoE layer '{name}'"
        layer.dispatcher = dispatcher
        # Global-batch balancing and aux-loss-free bias updates count over every rank.
        layer.balance_group = ctx.world_group
    return model
