"""`prepare(model, ctx)`: a model holding moeflow `MoELayer`s made trainable by DeepSpeed's engine
(`deepspeed.initialize`, ZeRO 0, 1, 2), and `DeepSpeedMoELayer`, the layer class the engine
counts as its own `MoE`. Imported through `moeflow.integrations.deepspeed` (see its doc).

The DeepSpeed engine recognises MoE layers by class (`deepspeed.moe.layer.MoE`) and expert
parameters by two attributes: `allreduce = False` and `group_name = "ep_size_<ep>"`. With them it
averages dense gradients over the data-parallel ranks, expert gradients over the ranks holding the
same experts (divided by the data-parallel size, as moeflow's `GradSync` does), puts the experts in
their own optimizer groups, and ZeRO partitions them only over those ranks.

`prepare`, after `moeflow.parallel.parallelize(model, ctx)` and before `deepspeed.initialize`,
does that for every `MoELayer`: it marks the expert parameters and makes each layer a
`DeepSpeedMoELayer` (an `MoELayer` that is also DeepSpeed's `MoE`; state dict and outputs
unchanged). When the engine starts, each layer creates DeepSpeed's expert groups (if no layer did
yet) and checks that they hold the same ranks as moeflow's expert group, so both speak of the
same experts. Do not also call `GradSync`: the engine reduces the gradients.

Example (one process: ep 1):
    >>> from moeflow.moe.config import MoEConfig
    >>> from moeflow.moe.layer import MoELayer
    >>> from moeflow.parallel import ParallelDims, parallelize
    >>> from moeflow.train.distributed import init_distributed, shutdown
    >>> runtime = init_distributed(60.0)
    >>> ctx = ParallelDims().build()
    >>> model = parallelize(torch.nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
    ...                                                            ffn_hidden_size=8))), ctx)
    >>> prepare(model, ctx)
    ['0.experts.w1', '0.experts.w2']
    >>> model[0].experts.w1.allreduce, model[0].experts.w1.group_name
    (False, 'ep_size_1')
    >>> shutdown(runtime)
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn

from moeflow.moe.layer import MoELayer
from moeflow.moe.walk import expert_parameters, moe_layers
from moeflow.parallel.dims import ParallelContext
from moeflow.parallel.fsdp import is_sharded

logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
from deepspeed.moe.layer import MoE as _DeepSpeedMoE  # noqa: E402
from deepspeed.utils import groups as _ds_groups  # noqa: E402


class DeepSpeedMoELayer(MoELayer, _DeepSpeedMoE):
    """An `MoELayer` the DeepSpeed engine counts as an MoE layer (made by `prepare`)."""

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: DeepSpeed's expert groups for this ep size, checked against
        moeflow's expert group."""
        if use_data_before_expert_parallel_:
            raise ValueError(
                "DeepSpeed's use_data_before_expert_parallel_ orders ranks differently from "
                "moeflow's ParallelDims (expert axis innermost); leave it False"
            )
        name = self.expert_group_name
        if name not in _ds_groups._get_expert_parallel_group_dict():
            _ds_groups._create_expert_and_data_parallel(self.ep_size)
        theirs = dist.get_process_group_ranks(_ds_groups._get_expert_parallel_group(name))
        group = self.moeflow_expert_group()
        ours = [dist.get_rank()] if group is None else dist.get_process_group_ranks(group)
        if sorted(theirs) != sorted(ours):
            raise ValueError(
                f"DeepSpeed's expert group {name} holds ranks {theirs}, moeflow's {ours}: build "
                "the ParallelContext with the same ep as DeepSpeed's ep_size"
            )

    def moeflow_expert_group(self) -> dist.ProcessGroup | None:
        """The ranks over which moeflow spreads this layer's experts (None: this rank alone)."""
        return self.expert_dispatch.group


def prepare(model: nn.Module, ctx: ParallelContext) -> list[str]:
    """Mark every expert parameter of `model` for DeepSpeed and make its MoE layers
    `DeepSpeedMoELayer`s (in place; see the module doc). Returns the expert parameter names. A
    model sharded by `moeflow.parallel.fsdp.shard_model` is refused: DeepSpeed's engine shards
    (ZeRO) and reduces the gradients itself, and one owner of the sharding is all that works."""
    if is_sharded(model):
        raise ValueError(
            "integrations.deepspeed.prepare: the model is sharded by moeflow (FSDP2: "
            'parallel.dp_shard > 1 or train.param_dtype = "bf16"), and DeepSpeed\'s engine '
            "shards it itself (ZeRO); build it without shard_model (dp_shard = 1, fp32 params) "
            "and let DeepSpeed own the sharding"
        )
    ep = ctx.dims.ep
    for name, layer in moe_layers(model):
        if layer.layout.group_size != ep:
            raise ValueError(
                f"MoE layer '{name}' spans {layer.layout.group_size} ranks, the context's ep is "
                f"{ep}: call moeflow.parallel.parallelize(model, ctx) first"
            )
        if not isinstance(layer, DeepSpeedMoELayer):
            if type(layer) is not MoELayer:
                raise ValueError(
                    f"MoE layer '{name}' is a {type(layer).__name__}; prepare() handles "
                    "MoELayer only"
                )
            layer.__class__ = DeepSpeedMoELayer
        layer.ep_size = ep
        layer.expert_group_name = f"ep_size_{ep}"
        layer.num_experts = layer.config.num_experts
        layer.num_local_experts = len(layer.local_expert_ids)
        layer.enable_expert_tensor_parallelism = False
        layer.use_residual = False
    return mark_expert_parameters(model, ep)


def mark_expert_parameters(model: nn.Module, ep: int) -> list[str]:
    """Mark every expert weight of `model` as DeepSpeed marks its experts' (`allreduce = False`,
    `group_name = "ep_size_<ep>"`), at any `ep`, 1 included: `deepspeed.moe.utils.is_moe_param`
    finds them and `split_params_into_different_moe_groups_for_optimizer` puts them in the
    expert group. Returns their names."""
    named = dict(model.named_parameters())
    for pname in expert_parameters(model):
        named[pname].allreduce = False
        named[pname].group_name = f"ep_size_{ep}"
    return list(expert_parameters(model))
