"""parallelize(model, ctx): lay out every MoELayer's experts over `ep` and attach its communication.

Layers are built without any process group (the same model code runs on one CPU process and on many
GPUs); this function makes them parallel afterwards. Steps, on every rank:

1. Gather every rank's list of (layer name, config fingerprint) over the world group: ranks built
   with different MoE configs get the same error, instead of a hang in their first all-to-all.
2. Each layer's `ExpertLayout` over the `ep` group: Tutel's canonical layout (every rank 1/ep of
   the expert parameters: whole experts when E >= ep, an F-slice of one expert when ep > E), placed
   by `expert_slots` (re-placement, replicas) or contiguous blocks; bad sizes raise here, on every
   rank, naming the valid expert-group sizes.
3. `MoELayer.attach`: the layer keeps this rank's expert rows and F-slice and takes its exchange
   (flat or two-level all-to-all over `ep`), its expert and shard groups, the dispatch settings and
   the world group as its balance group (global-batch counts, aux-loss-free bias loads).

The model must hold the full set of experts, identical on every rank (same seed or same checkpoint),
when this is called.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist
from torch import nn

from moeflow.comm.all_to_all import GroupExchange
from moeflow.comm.hierarchical import HierarchicalExchange
from moeflow.moe.dispatch_config import DispatchConfig
from moeflow.moe.layer import MoELayer
from moeflow.moe.layout import ExpertLayout, check_sizes
from moeflow.moe.walk import moe_layers
from moeflow.parallel.dims import ParallelContext, ParallelDims


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


def _two_level_exchange(ctx: ParallelContext, dispatch: DispatchConfig):
    """The two-level all-to-all of the expert group, or None: built when `dispatch.two_level`
    asks for it, and also whenever the node size is known and splits the expert group into
    several nodes, so a layer may pick flat or two-level per call (the runtime tuner does)."""
    ranks_per_node = ctx.ranks_per_node(dispatch.ranks_per_node)
    if not dispatch.two_level:
        ep = ctx.dims.ep
        if ranks_per_node is None or not 1 < ranks_per_node < ep or ep % ranks_per_node:
            return None
    elif ranks_per_node is None:
        raise ValueError(
            "dispatch.two_level needs dispatch.ranks_per_node, or LOCAL_WORLD_SIZE in the "
            "environment (torchrun sets it)"
        )
    intra, inter = ctx.node_groups(ranks_per_node)
    return HierarchicalExchange(ctx.ep_group, intra, inter, ranks_per_node)


def expert_layouts(model: nn.Module) -> dict[str, ExpertLayout]:
    """Every MoE layer's layout, by module name.

    Example:
        >>> from moeflow.moe.config import MoEConfig
        >>> model = nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
        ...                                          ffn_hidden_size=8)))
        >>> expert_layouts(model)["0"].slots
        (0, 1)
    """
    return {name: layer.layout for name, layer in moe_layers(model)}


def _context(model: nn.Module, ctx) -> ParallelContext:
    if isinstance(ctx, ParallelContext):
        return ctx
    if isinstance(ctx, ParallelDims):
        device = next((p.device.type for p in model.parameters()), "cpu")
        return ctx.build("cpu" if device == "meta" else device)
    raise TypeError(
        f"parallelize(model, ctx): ctx must be a ParallelContext (ParallelDims(dp=..., ep=...)"
        f".build()) or the ParallelDims themselves, not {type(ctx).__name__}"
    )


def parallelize(
    model: nn.Module,
    ctx: ParallelContext | ParallelDims,
    dispatch: DispatchConfig | None = None,
    expert_slots: dict[str, list[int]] | None = None,
    replica_slots: int = 0,
) -> nn.Module:
    """Lay every `MoELayer` of `model` out over `ctx`'s `ep` axis and attach it, in place.

    `expert_slots[name]`: the logical expert of every slot, shard group after shard group (see
    `ExpertLayout`); it may hold replicas. Default: contiguous blocks of expert ids per shard
    group plus `replica_slots` replica slots per group. World size 1 and ep=1 take the same path.
    `ctx` may be the `ParallelDims` themselves: their groups are built here (collective), for the
    device type of the model's parameters.

    Example (one process; the same call on every rank of a job):
        >>> import torch.distributed as dist
        >>> from moeflow.moe.config import MoEConfig
        >>> from moeflow.parallel.dims import ParallelDims
        >>> from moeflow.train.distributed import init_distributed, shutdown
        >>> runtime = init_distributed(60.0)
        >>> model = nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
        ...                                          ffn_hidden_size=8)))
        >>> _ = parallelize(model, ParallelDims().build())
        >>> model[0].layout.group_size, model(torch.randn(3, 8)).shape
        (1, torch.Size([3, 8]))
        >>> shutdown(runtime)
    """
    ctx = _context(model, ctx)
    layers = moe_layers(model)
    _check_same_configs(layers, ctx)
    dispatch = dispatch or DispatchConfig()
    ep = ctx.dims.ep
    layouts = {}
    for name, layer in layers:
        cfg = layer.config
        where = f"MoE layer '{name}': "
        check_sizes(cfg.num_experts, cfg.ffn_hidden_size, ep, where)
        if layer.layout.group_size != 1 or layer.experts.w1.shape[0] != cfg.num_experts:
            raise ValueError(f"MoE layer '{name}' is already parallelized")
        layout = ExpertLayout.canonical(cfg.num_experts, cfg.ffn_hidden_size, ep, replica_slots)
        if expert_slots and name in expert_slots:
            try:
                layout = layout.with_slots([int(x) for x in expert_slots[name]])
            except ValueError as exc:
                raise ValueError(f"{where}{exc}") from None
        layouts[name] = layout
    exchange, two_level = GroupExchange(ctx.ep_group), _two_level_exchange(ctx, dispatch)
    for name, layer in layers:
        layout = layouts[name]
        layer.attach(
            layout,
            exchange,
            group=ctx.ep_group,
            shard_group=ctx.shard_group(layout.shards),
            dispatch=dispatch,
            balance_group=ctx.world_group,
            name=name,
            two_level_exchange=two_level,
        )
    return model


def set_parallel_mode(model: nn.Module, mode: str) -> None:
    """Make `mode` the default of every MoE layer's calls from now on (a layer call may still
    name another). Nothing moves: every mode runs from the same layout, so a model may switch
    between optimizer steps, or between micro-batches, at no cost. Every rank must switch alike.

    Example:
        >>> from moeflow.moe.config import MoEConfig
        >>> model = nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
        ...                                          ffn_hidden_size=8)))
        >>> set_parallel_mode(model, "dp")
        >>> model[0].expert_dispatch.config.mode
        'dp'
    """
    for _, layer in moe_layers(model):
        layer.expert_dispatch.config = dataclasses.replace(layer.expert_dispatch.config, mode=mode)
