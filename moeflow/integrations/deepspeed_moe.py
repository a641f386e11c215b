"""`MoE`: DeepSpeed's `deepspeed.moe.layer.MoE` constructor and outputs on a moeflow layer, for a
one-line switch: `out, l_aux, exp_counts = moe(x)`, then `loss + coeff * l_aux`.

It takes DeepSpeed's arguments with DeepSpeed's defaults and keeps DeepSpeed's semantics: the
gating decisions of `moeflow.integrations.deepspeed_gating` (top-1 with random token selection,
top-2 with a sampled second expert and position drops, top-k with probability drops, the
weights renormalised after drops, `capacity_factor` in training and `eval_capacity_factor` in
evaluation, `noisy_gate_policy` "Jitter" or "RSample"), DeepSpeed's `l_aux` and `exp_counts`
(every routed pair before drops, on the input's device), and `used_token` at k = 1. Every expert
starts as a copy of `expert`, as in DeepSpeed, and its parameters are marked as DeepSpeed marks
its experts' (`allreduce = False`, `group_name = "ep_size_<ep>"`). Its state dict has DeepSpeed's
keys and layouts (`deepspeed_moe.gate.wg.weight`, `deepspeed_moe.experts.deepspeed_experts.<i>.
<name>`; `moeflow.integrations.deepspeed_keys`): DeepSpeed's `engine.save_checkpoint` and
`load_checkpoint` work on it, and a state dict or checkpoint of DeepSpeed's `MoE` loads into it and
back; moeflow's own layout (`router.weight`, `experts.w1`, ...) loads too.

Experts: an FFN moeflow recognises runs on moeflow's grouped expert kernels and dispatcher
(`FeedForward`, or `nn.Sequential(Linear(D, F), GELU() | ReLU(), Linear(F, D))`, biases in both
linears or in neither). Any other module (a SiLU or gated MLP, a custom module) runs per expert,
each on the tokens routed to it (`moeflow.integrations.module_experts`: the same dispatcher and
all-to-all), with the same results; a one-time warning names that slower path. With `ep_size >
1` pass `ctx`, a `ParallelContext` whose ep is `ep_size` (`ParallelDims(dp=world_size //
ep_size, ep=ep_size).build()`): the experts are laid out over it as DeepSpeed lays them out and
marked for the engine.

Arguments without a moeflow equivalent raise naming them: `use_residual` and
`enable_expert_tensor_parallelism`. `use_tutel` (a kernel choice) is accepted and ignored.

Example:
    >>> from torch import nn
    >>> expert = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    >>> moe = MoE(8, expert, num_experts=4, k=2)  # DeepSpeed's defaults otherwise
    >>> out, l_aux, exp_counts = moe(torch.randn(3, 5, 8))
    >>> out.shape, l_aux.requires_grad, int(exp_counts.sum())  # 15 tokens, 2 pairs each
    (torch.Size([3, 5, 8]), True, 30)
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from moeflow.integrations.deepspeed_gating import DeepSpeedGate
from moeflow.integrations.deepspeed_keys import (
    grouped_names,
    load_either_layout,
    save_in_deepspeed_layout,
)
from moeflow.integrations.deepspeed_prepare import (
    DeepSpeedMoELayer,
    mark_expert_parameters,
    prepare,
)
from moeflow.integrations.module_experts import ModuleExperts
from moeflow.moe.config import MoEConfig, RouterConfig
from moeflow.moe.experts import GroupedExperts
from moeflow.moe.ffn import FeedForward
from moeflow.moe.layer import MoELayer
from moeflow.parallel.dims import ParallelContext
from moeflow.parallel.parallelize import parallelize

_NOTICED: set[str] = set()  # expert classes already named in the slower-path warning


class MoE(DeepSpeedMoELayer):
    """DeepSpeed's `MoE` (see the module doc); `ctx` is moeflow's addition for `ep_size > 1`."""

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
        _check_arguments(locals())
        ffn = recognised_ffn(expert, hidden_size)
        config = MoEConfig(
            hidden_size=hidden_size,
            num_experts=num_experts,
            ffn_hidden_size=1 if ffn is None else ffn.w2.shape[0],  # 1: experts are modules
            activation="relu" if ffn is None else ffn.activation,
            ffn_bias=ffn is not None and ffn.b1 is not None,
            # Drops and l_aux are the gate's (DeepSpeed's); the caller adds l_aux itself.
            router=RouterConfig(top_k=k, aux_loss_coeff=0.0),
        )
        # MoELayer's state, built as a plain MoELayer: DeepSpeed's MoE.__init__ (next in the MRO)
        # would build its own gate and experts.
        nn.Module.__init__(self)
        self.__dict__.update(MoELayer(config).__dict__)
        gate = DeepSpeedGate(
            config, k, capacity_factor, eval_capacity_factor, min_capacity, noisy_gate_policy,
            drop_tokens, use_rts, top2_2nd_expert_sampling,
        )  # fmt: skip
        self.set_router(gate, config)
        self.per_expert_modules = ffn is None
        # DeepSpeed's names of one expert's tensors (None: the expert modules keep their own)
        self.expert_names = None if ffn is None else grouped_names(expert)
        self.register_state_dict_post_hook(save_in_deepspeed_layout)
        self.register_load_state_dict_pre_hook(load_either_layout)
        if ffn is None:
            _notice(expert)
            _check_context(ep_size, ctx)
            group = None if ctx is None else ctx.ep_group
            self.experts = ModuleExperts(expert, num_experts, group)
            self._set_deepspeed_fields(ep_size, num_experts)
            mark_expert_parameters(self, ep_size)
            return
        self.experts = GroupedExperts.from_dense(ffn, num_experts)
        if self.ffn_out_bias is not None:
            with torch.no_grad():
                self.ffn_out_bias.copy_(ffn.b2.detach().expand_as(self.ffn_out_bias))
        if ep_size > 1 or ctx is not None:
            _check_context(ep_size, ctx)
            parallelize(self, ctx)
            prepare(self, ctx)
        else:
            self._set_deepspeed_fields(1, num_experts)
            mark_expert_parameters(self, 1)  # as DeepSpeed's experts are, at every ep_size

    def _set_deepspeed_fields(self, ep_size: int, num_experts: int) -> None:
        self.ep_size, self.expert_group_name = ep_size, f"ep_size_{ep_size}"
        self.num_experts, self.num_local_experts = num_experts, num_experts // ep_size
        self.enable_expert_tensor_parallelism, self.use_residual = False, False

    def moeflow_expert_group(self):
        if self.per_expert_modules:
            return self.experts.group
        return super().moeflow_expert_group()

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None):
        gate: DeepSpeedGate = self.router
        if used_token is not None and gate.k != 1:
            raise ValueError(
                f"MoE(k={gate.k})(used_token=...): DeepSpeed masks tokens at k = 1 only (its "
                "top-2 and top-k gating ignore used_token); pass None"
            )
        gate.used_token = used_token
        try:
            if self.per_expert_modules:
                out = self._forward_modules(hidden_states)
            else:
                out, _ = MoELayer.forward_with_losses(self, hidden_states)
        finally:
            gate.used_token = None
        l_aux, exp_counts = gate.take_outputs()
        return out, l_aux, exp_counts

    def _forward_modules(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert module on the tokens routed to it and kept (on the rank holding it),
        weighted, summed per token."""
        x_TD = x.reshape(-1, x.shape[-1])
        route = self.router(x_TD)
        out = self.experts(x_TD, route.weights_TK, route.expert_ids_TK, route.keep_TK)
        return out.view_as(x)


def _check_context(ep_size: int, ctx: ParallelContext | None) -> None:
    if (ep_size > 1 or ctx is not None) and (ctx is None or ctx.dims.ep != ep_size):
        raise ValueError(
            f"MoE(ep_size={ep_size}) needs ctx=ParallelDims(dp=world_size // {ep_size}, "
            f"ep={ep_size}).build() (got "
            f"{'no ctx' if ctx is None else f'a ctx with ep {ctx.dims.ep}'})"
        )


def _check_arguments(args: dict) -> None:
    refuse = {
        "use_residual": "residual MoE (PR-MoE) is not supported",
        "enable_expert_tensor_parallelism": "moeflow slices experts over ranks itself when "
        "ep > num_experts",
    }
    for name, fix in refuse.items():
        if args[name]:
            raise ValueError(f"MoE({name}={args[name]!r}) has no moeflow equivalent: {fix}")
    policy = args["noisy_gate_policy"]
    if policy not in (None, "None", "Jitter", "RSample"):
        raise ValueError(
            f"MoE(noisy_gate_policy={policy!r}) must be None, 'None', 'Jitter' or 'RSample'"
        )
    if args["num_experts"] % args["ep_size"]:
        raise ValueError(
            f"MoE(num_experts={args['num_experts']}) must be divisible by ep_size "
            f"({args['ep_size']}), as in DeepSpeed"
        )


def _notice(expert: nn.Module) -> None:
    name = type(expert).__name__
    if name not in _NOTICED:
        _NOTICED.add(name)
        warnings.warn(
            f"MoE(expert={name}): not an FFN moeflow recognises, so each expert runs as its own "
            "module on its tokens (correct, slower than the grouped FFN kernels; pass a "
            "FeedForward or nn.Sequential(Linear, GELU or ReLU, Linear) for those)",
            stacklevel=3,
        )


def recognised_ffn(expert: nn.Module, hidden: int) -> FeedForward | None:
    """`expert` as a moeflow `FeedForward` (a copy of its weights and biases) if it is one moeflow
    runs on its grouped kernels (see the module doc), else None."""
    if isinstance(expert, FeedForward):
        return expert
    parts = list(expert) if isinstance(expert, nn.Sequential) else []
    act = None
    if len(parts) == 3 and type(parts[1]) is nn.ReLU:
        act = "relu"
    elif len(parts) == 3 and type(parts[1]) is nn.GELU:
        act = "gelu_tanh" if parts[1].approximate == "tanh" else "gelu"
    ok = (
        act is not None
        and type(parts[0]) is nn.Linear
        and type(parts[2]) is nn.Linear
        and (parts[0].bias is None) == (parts[2].bias is None)
        and parts[0].in_features == hidden == parts[2].out_features
    )
    if not ok:
        return None
    bias = parts[0].bias is not None
    ffn = FeedForward(hidden, parts[0].out_features, act, bias=bias)
    with torch.no_grad():
        ffn.w1.copy_(parts[0].weight.t())
        ffn.w2.copy_(parts[2].weight.t())
        if bias:
            ffn.b1.copy_(parts[0].bias)
            ffn.b2.copy_(parts[2].bias)
    return ffn.to(parts[0].weight.device, parts[0].weight.dtype)
