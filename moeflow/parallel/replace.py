"""apply_placement: re-place the experts of a running model, with their optimizer state.

Per MoE layer whose placement changes, on every rank (collective over the `ep` group; every dp
replica does the same within its own `ep` group):
1. `migrate_rows` moves the expert weights, their gradients if any, and every per-row optimizer
   tensor (AdamW's `exp_avg`, `exp_avg_sq`) from the old slots to the new ones (one
   `all_to_all_single` per tensor). A new replica is a copy of an old one, moments included.
2. The moved rows are copied **in place** into the same `Parameter`s and state tensors, so the
   optimizer's parameter groups, `GradSync`'s buckets and any other reference stay valid. A
   sharded model (`shard_model`) moves its local shards: the ranks of an `ep` group hold the
   same shard index, so rows move between ranks holding the same part of them.
3. `MoELayer.set_layout` records the new layout in the layer, whose dispatch uses it from the
   next forward on. Router, bias and balancing counts use logical ids and are untouched;
   checkpoints store logical ids, so they do not change.

Call it between optimizer steps. The model's math does not change: only which rank computes which
expert (replicas of an expert hold the same weights and moments and get the same summed gradient,
see `GradSync`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moeflow.moe.layer import MoELayer
from moeflow.moe.layout import ExpertLayout
from moeflow.moe.walk import moe_layers
from moeflow.parallel.fsdp import local_tensor
from moeflow.parallel.migrate import migrate_rows
from moeflow.placement.problem import Placement


def current_expert_slots(model: nn.Module) -> dict[str, list[int]]:
    """Every MoE layer's placement (the logical expert of each global slot), by module name.

    Example:
        >>> from moeflow.moe.config import MoEConfig
        >>> model = nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
        ...                                          ffn_hidden_size=8)))
        >>> current_expert_slots(model)
        {'0': [0, 1]}
    """
    return {name: list(layer.layout.slots) for name, layer in moe_layers(model)}


def layouts_placement(layouts: list[ExpertLayout]) -> Placement:
    """The planner's view of the layers' layouts: per layer, per shard group, its experts (a
    shard group is one placement 'rank')."""
    return Placement([[lay.group_experts(v) for v in range(lay.num_groups)] for lay in layouts])


def placement_slots(placement: Placement, layer: int) -> list[int]:
    """A planned placement of one layer as the slot list of an `ExpertLayout`."""
    groups = placement.layers[layer]
    if len({len(ids) for ids in groups}) != 1:
        raise ValueError(
            f"layer {layer}'s placement holds {sorted(len(i) for i in groups)} experts per "
            "shard group; a running MoE layer has the same row count on every rank"
        )
    return [e for ids in groups for e in ids]


def _per_row_state(optimizer: torch.optim.Optimizer | None, param: nn.Parameter) -> list:
    if optimizer is None or param not in optimizer.state:
        return []
    state = optimizer.state[param]
    return [
        key for key, value in state.items() if torch.is_tensor(value) and value.shape == param.shape
    ]


def apply_placement(
    model: nn.Module,
    expert_slots: dict[str, list[int]],
    ep_group: dist.ProcessGroup | None,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Re-place every layer named in `expert_slots` (see the module doc); returns how many expert
    copies are new on their rank, summed over layers and ranks.

    Example:
        >>> from moeflow.moe.config import MoEConfig
        >>> model = nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
        ...                                          ffn_hidden_size=8)))
        >>> w1 = model[0].experts.w1.detach().clone()
        >>> apply_placement(model, {"0": [1, 0]}, ep_group=None)
        0
        >>> torch.equal(model[0].experts.w1[0], w1[1]), model[0].local_expert_ids
        (True, [1, 0])
    """
    layers = dict(moe_layers(model))
    unknown = sorted(set(expert_slots) - set(layers))
    if unknown:
        raise ValueError(f"no MoE layer named {unknown}; the model's MoE layers: {sorted(layers)}")
    moved = 0
    for name, slots in expert_slots.items():
        layer: MoELayer = layers[name]
        old = layer.layout
        if list(slots) == list(old.slots):
            continue
        try:
            new = old.with_slots([int(x) for x in slots])
        except ValueError as exc:
            raise ValueError(f"MoE layer '{name}': {exc}") from None
        if new.slots_per_group != old.slots_per_group:
            raise ValueError(
                f"MoE layer '{name}' holds {old.slots_per_group} expert rows per rank; the new "
                f"placement gives {new.slots_per_group} (the row count is fixed when the model "
                "is parallelized)"
            )
        for v in range(old.num_groups):  # every rank of a shard group receives its slices
            moved += old.shards * len(set(new.group_experts(v)) - set(old.group_experts(v)))
        for param in layer.experts.parameters():
            keys = _per_row_state(optimizer, param)
            # A sharded model's (FSDP) local shards: every rank of an ep group holds the same
            # shard index, so its rows move as they would whole.
            tensors = [local_tensor(param).detach()]
            tensors += [local_tensor(optimizer.state[param][k]) for k in keys]
            if param.grad is not None:
                tensors.append(local_tensor(param.grad))
            rows = migrate_rows(tensors, old, new, ep_group)
            with torch.no_grad():
                for target, value in zip(tensors, rows, strict=True):
                    target.copy_(value)
        layer.set_layout(new)
    return moved


def replica_row_weights(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """For the expert weights of layers with replicas: per local slot, 1 / copies of its expert,
    so that a sum over every rank's slots counts each logical expert once (gradient norms)."""
    out = {}
    for _, layer in moe_layers(model):
        copies = layer.layout.copies()
        if max(copies) == 1:
            continue
        w = torch.tensor([1.0 / copies[e] for e in layer.local_expert_ids], dtype=torch.float64)
        for param in layer.experts.parameters():
            out[param] = w.to(param.device)
    return out
