"""apply_placement: re-place the experts of a running model, with their optimizer state.

Per MoE layer whose map changes, on every rank (collective over the `ep` group; every dp replica
does the same within its own `ep` group):
1. `migrate_rows` moves the expert weights, their gradients if any, and every per-row optimizer
   tensor (AdamW's `exp_avg`, `exp_avg_sq`) from the old slots to the new ones (one
   `all_to_all_single` per tensor).
2. The moved rows are copied **in place** into the same `Parameter`s and state tensors, so the
   optimizer's parameter groups, `GradSync`'s buckets and any other reference stay valid.
3. `set_expert_placement` records the new logical-to-physical map in the layer, whose dispatcher
   uses it from the next forward on. Router, bias and balancing counts use logical ids and are
   untouched; checkpoints store logical ids, so they do not change.

Call it between optimizer steps. The model's math does not change: only which rank computes which
expert.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moeflow.moe.layer import MoELayer
from moeflow.parallel.parallelize import moe_layers
from moeflow.placement.migrate import local_ids, migrate_rows


def current_expert_maps(model: nn.Module) -> dict[str, list[int]]:
    """Every MoE layer's logical-to-physical map, by module name.

    Example:
        >>> from moeflow.moe.config import MoEConfig
        >>> model = nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
        ...                                          ffn_hidden_size=8)))
        >>> current_expert_maps(model)
        {'0': [0, 1]}
    """
    return {name: list(layer.expert_map_ids) for name, layer in moe_layers(model)}


def _per_row_state(optimizer: torch.optim.Optimizer | None, param: nn.Parameter) -> list:
    if optimizer is None or param not in optimizer.state:
        return []
    state = optimizer.state[param]
    return [
        key for key, value in state.items() if torch.is_tensor(value) and value.shape == param.shape
    ]


def apply_placement(
    model: nn.Module,
    expert_maps: dict[str, list[int]],
    ep_group: dist.ProcessGroup | None,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Re-place every layer named in `expert_maps` (see the module doc); returns how many experts
    changed rank, summed over layers.

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
    unknown = sorted(set(expert_maps) - set(layers))
    if unknown:
        raise ValueError(f"no MoE layer named {unknown}; the model's MoE layers: {sorted(layers)}")
    ranks = 1 if ep_group is None else dist.get_world_size(ep_group)
    rank = 0 if ep_group is None else dist.get_rank(ep_group)
    moved = 0
    for name, new_map in expert_maps.items():
        layer: MoELayer = layers[name]
        new_map = [int(p) for p in new_map]
        old_map = list(layer.expert_map_ids)
        if new_map == old_map:
            continue
        local = layer.config.num_experts // ranks
        if layer.experts.w1.shape[0] != local:
            raise ValueError(
                f"MoE layer '{name}' holds {layer.experts.w1.shape[0]} experts but the ep group "
                f"of {ranks} ranks gives it {local}: parallelize the model first"
            )
        moved += sum(old_map[e] // local != new_map[e] // local for e in range(len(old_map)))
        for param in layer.experts.parameters():
            keys = _per_row_state(optimizer, param)
            tensors = [param.data, *(optimizer.state[param][k] for k in keys)]
            if param.grad is not None:
                tensors.append(param.grad)
            new = migrate_rows(tensors, old_map, new_map, ep_group)
            with torch.no_grad():
                for target, value in zip(tensors, new, strict=True):
                    target.copy_(value)
        layer.set_expert_placement(new_map, local_ids(new_map, rank, local))
    return moved
