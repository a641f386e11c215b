"""DeepSpeed: train a model holding moeflow MoE layers with `deepspeed.initialize` (ZeRO 0, 1, 2).

The DeepSpeed engine recognises MoE layers by class (`deepspeed.moe.layer.MoE`) and expert
parameters by two attributes: `allreduce = False` and `group_name = "ep_size_<ep>"`. With them it
averages dense gradients over the data-parallel ranks, expert gradients over the ranks holding the
same experts (divided by the data-parallel size, as moeflow's `GradSync` does), puts the experts in
their own optimizer groups, and ZeRO partitions them only over those ranks.

`prepare(model, ctx)`, after `moeflow.parallel.parallelize(model, ctx)` and before
`deepspeed.initialize`, does that for every `MoELayer`: it marks the expert parameters and makes
each layer a `DeepSpeedMoELayer` (an `MoELayer` that is also DeepSpeed's `MoE`; state dict and
outputs unchanged). When the engine starts, each layer creates DeepSpeed's expert groups (if no
layer did yet) and checks that they hold the same ranks as moeflow's expert group, so both speak
of the same experts. Do not also call `GradSync`: the engine reduces the gradients.

Checkpoints: `engine.save_checkpoint` does not work with these layers yet. DeepSpeed 0.19.8's MoE
checkpoint code expects its own expert naming (`deepspeed_moe.experts.deepspeed_experts.<i>`) and
fails on moeflow's `experts.w1` with a `TypeError`. Save the weights with moeflow's
`moeflow.train.checkpoint.save_checkpoint` (DCP, resharding across ep) meanwhile.

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

import torch
import torch.distributed as dist
from torch import nn

from moeflow.moe.config import MoEConfig, RouterConfig
from moeflow.moe.experts import GroupedExperts
from moeflow.moe.ffn import FeedForward
from moeflow.moe.layer import MoELayer
from moeflow.moe.walk import expert_parameters, moe_layers
from moeflow.parallel.dims import ParallelContext
from moeflow.parallel.fsdp import is_sharded
from moeflow.parallel.parallelize import parallelize

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
        group = self.expert_dispatch.group
        ours = [dist.get_rank()] if group is None else dist.get_process_group_ranks(group)
        if sorted(theirs) != sorted(ours):
            raise ValueError(
                f"DeepSpeed's expert group {name} holds ranks {theirs}, moeflow's {ours}: build "
                "the ParallelContext with the same ep as DeepSpeed's ep_size"
            )


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


class MoE(DeepSpeedMoELayer):
    """DeepSpeed's `deepspeed.moe.layer.MoE` constructor and return on a moeflow layer, for a
    one-line switch: `out, l_aux, exp_counts = moe(x)`, then `loss + coeff * l_aux`.

    Mapping: softmax over all experts then top-`k` (`pre_softmax`), the k weights renormalised
    when k > 1 (DeepSpeed's top-2 gating); `drop_tokens=False` is dropless, else capacity
    `capacity_factor` with `min_capacity`, earliest tokens kept, first choices before second ones
    (`drop_policy="position"`; DeepSpeed renormalises a token's surviving weights after a drop,
    moeflow keeps them). `noisy_gate_policy="Jitter"` is `input_jitter_eps=0.01`. `expert`: a
    moeflow `FeedForward`, or `nn.Sequential(Linear(D, F, bias=False), GELU() | ReLU(),
    Linear(F, D, bias=False))`; every expert starts as a copy of it, as in DeepSpeed. `l_aux` is
    the balancing loss with Megatron's normalisation (DeepSpeed's `topkgating`; its top-2 gating
    counts first choices only), differentiable and not otherwise applied; `exp_counts` are the
    tokens routed to each expert (on the CPU). With `ep_size > 1` pass `ctx`, a
    `ParallelContext` whose ep is `ep_size` (`ParallelDims(ep=ep_size).build()`): the experts are
    laid out over it and marked for the engine (`prepare`).

    Arguments without a moeflow equivalent raise naming them: `use_residual`,
    `enable_expert_tensor_parallelism`, `noisy_gate_policy="RSample"`, an `eval_capacity_factor`
    other than `capacity_factor`, `use_rts=True` (random token selection) when tokens can be
    dropped, and `top2_2nd_expert_sampling=True` with k = 2. `use_tutel` (a kernel choice) is
    accepted and ignored.

    Example:
        >>> from moeflow.moe.ffn import FeedForward
        >>> moe = MoE(8, FeedForward(8, 16, "gelu"), num_experts=4, k=2, drop_tokens=False,
        ...           top2_2nd_expert_sampling=False)
        >>> out, l_aux, exp_counts = moe(torch.randn(3, 5, 8))
        >>> out.shape, l_aux.requires_grad, int(exp_counts.sum())
        (torch.Size([3, 5, 8]), True, 30)
    """

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module,
        num_experts: int = 1,
        ep_size: int = 1,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        use_residual: bool = False,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        use_tutel: bool = False,
        enable_expert_tensor_parallelism: bool = False,
        top2_2nd_expert_sampling: bool = True,
        ctx: ParallelContext | None = None,
    ) -> None:
        refuse = {
            "use_residual": (use_residual, "residual MoE (PR-MoE) is not supported"),
            "enable_expert_tensor_parallelism": (
                enable_expert_tensor_parallelism,
                "moeflow slices experts over ranks itself when ep > num_experts",
            ),
            "noisy_gate_policy": (noisy_gate_policy == "RSample", "use None or 'Jitter'"),
            "eval_capacity_factor": (
                eval_capacity_factor != capacity_factor,
                "moeflow has one capacity; pass eval_capacity_factor=capacity_factor",
            ),
            "use_rts": (
                use_rts and drop_tokens,
                "random token selection: pass use_rts=False (the earliest tokens are kept) or "
                "drop_tokens=False",
            ),
            "top2_2nd_expert_sampling": (
                top2_2nd_expert_sampling and k == 2,
                "sampled second experts: pass top2_2nd_expert_sampling=False",
            ),
        }
        for name, (bad, fix) in refuse.items():
            if bad:
                value = locals()[name]
                raise ValueError(f"MoE({name}={value!r}) has no moeflow equivalent: {fix}")
        if noisy_gate_policy not in (None, "None", "Jitter", "RSample"):
            raise ValueError(
                f"MoE(noisy_gate_policy={noisy_gate_policy!r}) must be None, 'None' or 'Jitter'"
            )
        ffn = _as_feed_forward(expert, hidden_size)
        config = MoEConfig(
            hidden_size=hidden_size,
            num_experts=num_experts,
            ffn_hidden_size=ffn.w2.shape[0],
            activation=ffn.activation,
            ffn_bias=ffn.b1 is not None,
            router=RouterConfig(
                top_k=k,
                pre_softmax=True,
                normalize_topk=k > 1,
                capacity_factor=capacity_factor if drop_tokens else None,
                min_capacity=min_capacity,
                drop_policy="position",
                aux_loss_coeff=0.0,  # returned as l_aux: the caller adds it
                input_jitter_eps=0.01 if noisy_gate_policy == "Jitter" else None,
            ),
        )
        # MoELayer's state, built as a plain MoELayer: DeepSpeed's MoE.__init__ (next in the MRO)
        # would build its own gate and experts.
        nn.Module.__init__(self)
        self.__dict__.update(MoELayer(config).__dict__)
        self.experts = GroupedExperts.from_dense(ffn, num_experts)
        if self.ffn_out_bias is not None:
            with torch.no_grad():
                self.ffn_out_bias.copy_(ffn.b2.detach().expand_as(self.ffn_out_bias))
        if ep_size > 1 or ctx is not None:
            if ctx is None or ctx.dims.ep != ep_size:
                raise ValueError(
                    f"MoE(ep_size={ep_size}) needs ctx=ParallelDims(ep={ep_size}).build() (got "
                    f"{'no ctx' if ctx is None else f'a ctx with ep {ctx.dims.ep}'})"
                )
            parallelize(self, ctx)
            prepare(self, ctx)
        else:
            self.ep_size, self.expert_group_name = 1, "ep_size_1"
            self.num_experts, self.num_local_experts = num_experts, num_experts
            self.enable_expert_tensor_parallelism, self.use_residual = False, False
            mark_expert_parameters(self, 1)  # as DeepSpeed's experts are, at every ep_size

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None):
        if used_token is not None:
            raise ValueError("MoE(used_token=...) is not supported: moeflow routes every token")
        out, (aux, _) = MoELayer.forward_with_losses(self, hidden_states)
        counts = self.last_stats.tokens_per_expert.detach().to("cpu")
        return out, aux, counts


def _as_feed_forward(expert: nn.Module, hidden: int) -> FeedForward:
    """`expert` as a moeflow `FeedForward` (a copy of its weights, and biases if it has them)."""
    if isinstance(expert, FeedForward):
        return expert
    parts = list(expert) if isinstance(expert, nn.Sequential) else []
    act = None
    if len(parts) == 3 and isinstance(parts[1], nn.ReLU):
        act = "relu"
    elif len(parts) == 3 and isinstance(parts[1], nn.GELU):
        act = "gelu_tanh" if parts[1].approximate == "tanh" else "gelu"
    ok = (
        act is not None
        and isinstance(parts[0], nn.Linear)
        and isinstance(parts[2], nn.Linear)
        and (parts[0].bias is None) == (parts[2].bias is None)
        and parts[0].in_features == hidden == parts[2].out_features
    )
    if not ok:
        raise ValueError(
            f"MoE(expert={type(expert).__name__}): moeflow's experts are FFNs; pass a moeflow "
            f"FeedForward or nn.Sequential(nn.Linear({hidden}, F), nn.GELU() or nn.ReLU(), "
            f"nn.Linear(F, {hidden})) (both linears with biases or both without)"
        )
    bias = parts[0].bias is not None
    ffn = FeedForward(hidden, parts[0].out_features, act, bias=bias)
    with torch.no_grad():
        ffn.w1.copy_(parts[0].weight.t())
        ffn.w2.copy_(parts[2].weight.t())
        if bias:
            ffn.b1.copy_(parts[0].bias)
            ffn.b2.copy_(parts[2].bias)
    return ffn.to(parts[0].weight.device, parts[0].weight.dtype)
