"""Megatron-Core: `MoEConfig` from a `TransformerConfig` and back, and an MoE block with Megatron's
MLP interface for a layer spec.

`moe_config(tc)` reads every `moe_*` field moeflow has an equivalent for (`MAPPED`), plus
`hidden_size` and the activation (`gated_linear_unit` with `activation_func`: silu -> swiglu,
plain gelu/relu). Fields that only choose Megatron's implementation (`IGNORED`: fused kernels,
dispatcher backends, recomputation, logging, `moe_layer_freq`, which is the layer spec's
business) are skipped. Any other field set away from its default raises a `ValueError` naming it
and the value, as do values without an equivalent (e.g. `sinkhorn` balancing, biases in the
experts). Semantics (RouterConfig's docstring): Megatron's pre-softmax top-k is not renormalised
(`normalize_topk=False`); its sigmoid scores are renormalised only when k > 1; capacity has no
minimum (`min_capacity=0`); a `moe_z_loss_coeff` of None is 0; `moe_router_dtype` None and "fp32"
both route in fp32 (moeflow never routes below fp32).

`transformer_config_kwargs(cfg)` is the inverse: the `TransformerConfig` keyword arguments of an
`MoEConfig` (raising for what Megatron cannot express: other router types, renormalised
pre-softmax top-k, a minimum capacity). Round trips are exact on these fields.

Example (needs megatron-core; runs on CPU):
    >>> from megatron.core.transformer.transformer_config import TransformerConfig
    >>> tc = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
    ...     num_moe_experts=8, moe_ffn_hidden_size=128, moe_router_topk=2, add_bias_linear=False,
    ...     gated_linear_unit=True, activation_func=torch.nn.functional.silu)
    >>> cfg = moe_config(tc)
    >>> cfg.num_experts, cfg.ffn_hidden_size, cfg.activation, cfg.router.top_k
    (8, 128, 'swiglu', 2)
    >>> block = MegatronMoE(tc)
    >>> out, bias = block(torch.randn(5, 3, 64))  # [sequence, batch, hidden]
    >>> out.shape, bias
    (torch.Size([5, 3, 64]), None)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.integrations.megatron_drops import megatron_drops
from moeflow.moe.config import MoEConfig, RouterConfig
from moeflow.moe.layer import MoELayer
from moeflow.moe.routing_context import RoutingContext

# Megatron field -> where it lands in MoEConfig (documentation; the code below does the work).
MAPPED = {
    "num_moe_experts": "num_experts",
    "moe_ffn_hidden_size": "ffn_hidden_size (default: ffn_hidden_size)",
    "moe_router_topk": "router.top_k",
    "moe_router_score_function": "router.score_function",
    "moe_router_pre_softmax": "router.pre_softmax (and normalize_topk)",
    "moe_aux_loss_coeff": "router.aux_loss_coeff",
    "moe_z_loss_coeff": "router.z_loss_coeff",
    "moe_expert_capacity_factor": "router.capacity_factor",
    "moe_token_drop_policy": "router.drop_policy",
    "moe_pad_expert_input_to_capacity": "router.pad_to_capacity",
    "moe_router_load_balancing_type": "router.aux_loss_type",
    "moe_router_enable_expert_bias": "router.bias_update_rate > 0",
    "moe_router_bias_update_rate": "router.bias_update_rate",
    "moe_input_jitter_eps": "router.input_jitter_eps",
    "moe_router_dtype": "router.router_dtype",
    "moe_shared_expert_intermediate_size": "shared_expert_ffn_hidden_size",
    "moe_shared_expert_gate": "shared_expert_gate",
}
IGNORED = (
    "moe_grouped_gemm", "moe_use_legacy_grouped_gemm", "moe_token_dispatcher_type",
    "moe_enable_deepep", "moe_flex_dispatcher_backend", "moe_shared_expert_overlap",
    "moe_layer_recompute", "moe_permute_fusion", "moe_router_fusion", "moe_per_layer_logging",
    "moe_deepep_num_sms", "moe_hybridep_num_sms", "moe_layer_freq",
)  # fmt: skip
# Non-MoE fields that change the experts' math: they must keep these values.
REQUIRED = {"add_bias_linear": False, "glu_linear_offset": 0.0, "activation_func_clamp_value": None}
BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
ACTIVATIONS = {("swiglu", True): F.silu, ("gelu", False): F.gelu, ("relu", False): F.relu}


def _defaults(tc) -> dict:
    out = {}
    for f in dataclasses.fields(tc):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _check_fields(tc) -> None:
    defaults = _defaults(tc)
    for name, value in vars(tc).items():
        if not name.startswith("moe_") or name in MAPPED or name in IGNORED:
            continue
        if name in defaults and value != defaults[name]:
            raise ValueError(
                f"TransformerConfig.{name} = {value!r} has no moeflow equivalent; leave it at "
                f"{defaults[name]!r} (moeflow maps {', '.join(sorted(MAPPED))})"
            )
    for name, want in REQUIRED.items():
        if hasattr(tc, name) and getattr(tc, name) != want:
            raise ValueError(
                f"TransformerConfig.{name} = {getattr(tc, name)!r} is not supported by moeflow's "
                f"experts; set {name}={want!r}"
            )


def _activation(tc) -> str:
    for (name, gated), fn in ACTIVATIONS.items():
        if tc.activation_func is fn and bool(tc.gated_linear_unit) == gated:
            return name
    raise ValueError(
        f"TransformerConfig.activation_func = {getattr(tc.activation_func, '__name__', '?')} with "
        f"gated_linear_unit = {tc.gated_linear_unit} has no moeflow activation; use silu with "
        "gated_linear_unit=True (swiglu), or gelu / relu without it"
    )


def _one(name: str, value, kind: type):
    if isinstance(value, list | tuple):
        raise ValueError(
            f"TransformerConfig.{name} = {value!r}: moeflow takes one {kind.__name__} per layer"
        )
    return value


def moe_config(tc) -> MoEConfig:
    """The `MoEConfig` of a Megatron `TransformerConfig` (see the module doc)."""
    if not tc.num_moe_experts:
        raise ValueError("TransformerConfig.num_moe_experts is not set: it describes no MoE layer")
    _check_fields(tc)
    balancing = _one("moe_router_load_balancing_type", tc.moe_router_load_balancing_type, str)
    if balancing not in BALANCING:
        raise ValueError(
            f"TransformerConfig.moe_router_load_balancing_type = {balancing!r} has no moeflow "
            f"equivalent; use one of {list(BALANCING)}"
        )
    sigmoid = tc.moe_router_score_function == "sigmoid"
    router = RouterConfig(
        top_k=tc.moe_router_topk,
        score_function=tc.moe_router_score_function,
        pre_softmax=tc.moe_router_pre_softmax,
        normalize_topk=(tc.moe_router_topk > 1) if sigmoid else not tc.moe_router_pre_softmax,
        capacity_factor=tc.moe_expert_capacity_factor,
        min_capacity=0,
        drop_policy=tc.moe_token_drop_policy,
        pad_to_capacity=tc.moe_pad_expert_input_to_capacity,
        aux_loss_type=balancing,
        aux_loss_coeff=float(_one("moe_aux_loss_coeff", tc.moe_aux_loss_coeff, float)),
        z_loss_coeff=float(tc.moe_z_loss_coeff or 0.0),
        input_jitter_eps=tc.moe_input_jitter_eps,
        router_dtype=tc.moe_router_dtype or "fp32",
        bias_update_rate=tc.moe_router_bias_update_rate
        if tc.moe_router_enable_expert_bias
        else 0.0,
    )
    return MoEConfig(
        hidden_size=tc.hidden_size,
        num_experts=tc.num_moe_experts,
        ffn_hidden_size=tc.moe_ffn_hidden_size or tc.ffn_hidden_size,
        activation=_activation(tc),
        router=router,
        shared_expert_ffn_hidden_size=tc.moe_shared_expert_intermediate_size or 0,
        shared_expert_gate=bool(tc.moe_shared_expert_gate),
    )


def transformer_config_kwargs(cfg: MoEConfig) -> dict:
    """The `TransformerConfig` keyword arguments of `cfg` (see the module doc)."""
    r = cfg.router
    if r.type != "topk":
        raise ValueError(f"moe.router.type = {r.type!r} has no Megatron equivalent; use 'topk'")
    if r.softmax_dtype is not None:
        raise ValueError(
            f"moe.router.softmax_dtype = {r.softmax_dtype!r} has no Megatron equivalent (Megatron "
            "routes in moe_router_dtype); leave it None"
        )
    if r.min_capacity:
        raise ValueError(
            f"moe.router.min_capacity = {r.min_capacity} has no Megatron equivalent (Megatron's "
            "capacity has no minimum); set it to 0"
        )
    sigmoid = r.score_function == "sigmoid"
    if sigmoid and r.normalize_topk != (r.top_k > 1):
        raise ValueError(
            f"moe.router.normalize_topk = {r.normalize_topk} with sigmoid scores and top_k = "
            f"{r.top_k}: Megatron renormalises sigmoid scores exactly when top_k > 1"
        )
    if not sigmoid and r.pre_softmax and r.normalize_topk:
        raise ValueError(
            "moe.router.normalize_topk = True with pre_softmax: Megatron does not renormalise "
            "pre-softmax top-k weights; set normalize_topk = False"
        )
    if cfg.activation not in {name for name, _ in ACTIVATIONS}:
        raise ValueError(
            f"moe.activation ({cfg.activation!r}) has no Megatron activation_func here; use "
            f"one of {sorted({name for name, _ in ACTIVATIONS})}"
        )
    if cfg.a2a_dim is not None:
        raise ValueError(
            f"moe.a2a_dim = {cfg.a2a_dim} (the low-dimension all-to-all) has no Megatron "
            "equivalent; unset it"
        )
    if cfg.ffn_bias:
        raise ValueError(
            "moe.ffn_bias = True has no Megatron equivalent here (add_bias_linear would add "
            "biases to every linear layer, attention included); set ffn_bias = False"
        )
    (_, gated), fn = next((key, fn) for key, fn in ACTIVATIONS.items() if key[0] == cfg.activation)
    return {
        "hidden_size": cfg.hidden_size,
        "num_moe_experts": cfg.num_experts,
        "moe_ffn_hidden_size": cfg.ffn_hidden_size,
        "gated_linear_unit": gated,
        "activation_func": fn,
        "add_bias_linear": False,
        "moe_router_topk": r.top_k,
        "moe_router_score_function": r.score_function,
        "moe_router_pre_softmax": r.pre_softmax,
        "moe_expert_capacity_factor": r.capacity_factor,
        "moe_token_drop_policy": r.drop_policy,
        "moe_pad_expert_input_to_capacity": r.pad_to_capacity,
        "moe_router_load_balancing_type": r.aux_loss_type,
        "moe_aux_loss_coeff": r.aux_loss_coeff,
        "moe_z_loss_coeff": r.z_loss_coeff or None,
        "moe_input_jitter_eps": r.input_jitter_eps,
        "moe_router_dtype": r.router_dtype,
        "moe_router_enable_expert_bias": r.bias_update_rate > 0,
        **({"moe_router_bias_update_rate": r.bias_update_rate} if r.bias_update_rate else {}),
        "moe_shared_expert_intermediate_size": cfg.shared_expert_ffn_hidden_size or None,
        "moe_shared_expert_gate": cfg.shared_expert_gate,
    }


class MegatronMoE(nn.Module):
    """An `MoELayer` behind Megatron's MLP interface, for a layer spec
    (`ModuleSpec(module=MegatronMoE)` as the transformer layer's `mlp`): built from the layer's
    `TransformerConfig`, `forward(hidden_states [s, b, h], padding_mask [b, s]) -> (output,
    None)` (no bias: the experts have none). With a capacity it keeps the pairs Megatron keeps
    (`moeflow.integrations.megatron_drops`). `padding_mask` marks padding True, as Megatron's
    router reads it: padding counts in no balancing loss, z-loss or expert-bias count. The aux and
    z losses reach the router by themselves (no Megatron loss tracker); expert parallelism is
    `moeflow.parallel.parallelize` on the model."""

    def __init__(self, config, submodules=None, layer_number: int | None = None, **_: object):
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.moe = MoELayer(moe_config(config))
        self.moe.sequence_first = True  # Megatron's hidden states are [sequence, batch, hidden]
        self.moe.router.register_forward_hook(megatron_drops)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **_: object):
        context = None
        if padding_mask is not None:
            s, b = hidden_states.shape[:2]
            if tuple(padding_mask.shape) != (b, s):
                raise ValueError(
                    f"MegatronMoE: padding_mask has shape {tuple(padding_mask.shape)}, the "
                    f"hidden states [s, b, h] = {tuple(hidden_states.shape)}: give it [b, s] "
                    f"= [{b}, {s}] (True marks padding)"
                )
            context = RoutingContext(token_mask=~padding_mask.bool().transpose(0, 1))
        return self.moe(hidden_states, routing_context=context), None
