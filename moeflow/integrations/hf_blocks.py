"""The MoE layer `convert` puts where a Hugging Face sparse MoE block was: it keeps the block's
state-dict keys, its router jitter and its router-logit outputs, so the converted model is still
the HF model to HF tooling.

- **State dict**: `state_dict()` writes the block's own keys and layouts (`gate.weight`,
  `experts.gate_up_proj [E, 2F, D]`, `experts.down_proj [E, D, F]`, Qwen2-MoE's
  `shared_expert.*_proj.weight` and `shared_expert_gate.weight`), so a state dict saved with
  `torch.save(model.state_dict())` or `save_pretrained` after conversion loads into the plain HF
  model; `load_state_dict` takes those keys or moeflow's (`router.weight`, `experts.w1`, ...), so
  one saved before conversion loads into the converted model. `hf_state_dict = False` (what
  moeflow's trainer sets: its checkpoints split experts by logical id) keeps moeflow's keys. The
  aux-loss-free bias (`router.expert_bias`) is written only when it is in use.
- **Router jitter** (`router_jitter_noise`, Mixtral): in training the layer's input is scaled by
  `U(1 - eps, 1 + eps)` noise drawn as Mixtral draws it, for the router and the experts alike.
- **Router logits**: when the HF model records them (`output_router_logits=True`), each layer
  hands its router logits `[B*S, E]` (with their graph) to HF's recorder, so `outputs.aux_loss`
  and `outputs.loss` are HF's (`load_balancing_loss_func`, with `attention_mask`, times
  `router_aux_loss_coef`). moeflow's own balancing loss would then count twice: a layer whose
  `router.aux_loss_coeff` is not 0 refuses such a forward, naming the fix.

Example (a state dict saved by the unconverted model loads into the converted one):
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> from moeflow.integrations.hf import convert
    >>> cfg = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    >>> hf = MixtralForCausalLM(cfg)
    >>> saved = hf.state_dict()
    >>> convert(hf)
    ['model.layers.0.mlp']
    >>> hf.load_state_dict(saved)  # HF's keys, into the converted layer
    <All keys matched successfully>
    >>> sorted(k for k in hf.state_dict() if ".mlp." in k)
    ['model.layers.0.mlp.experts.down_proj', 'model.layers.0.mlp.experts.gate_up_proj', \
'model.layers.0.mlp.gate.weight']
"""

from __future__ import annotations

import torch

from moeflow.moe.config import MoEConfig
from moeflow.moe.layer import MoELayer
from moeflow.moe.routing_context import RoutingContext

_COLLECTOR = None  # transformers' output recorder (False where it has none), once looked up


class HFSparseMoELayer(MoELayer):
    """An `MoELayer` standing in for the HF sparse MoE block of class `hf_block_class` (see the
    module doc); `jitter_noise` is the block's `router_jitter_noise`."""

    def __init__(self, config: MoEConfig, hf_block_class: type, jitter_noise: float = 0.0):
        super().__init__(config)
        self.hf_block_class = hf_block_class
        self.jitter_noise = float(jitter_noise)
        self.hf_state_dict = True
        self.register_state_dict_post_hook(_to_hf_keys)
        self.register_load_state_dict_pre_hook(_from_hf_keys)

    def forward_with_losses(
        self,
        x: torch.Tensor,
        overlap_degree: int | None = None,
        routing_context: RoutingContext | None = None,
        mode: str | None = None,
        two_level: bool | None = None,
    ):
        if self.training and self.jitter_noise > 0:  # Mixtral's: one draw, before the router
            eps = self.jitter_noise
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        collected = _hf_router_logits()
        if collected is not None:
            if self.config.router.aux_loss_coeff != 0:
                raise ValueError(
                    "output_router_logits=True adds transformers' balancing loss "
                    "(router_aux_loss_coef * aux_loss) to outputs.loss, and this converted "
                    f"layer also adds moeflow's (router.aux_loss_coeff = "
                    f"{self.config.router.aux_loss_coeff}): the routers would be balanced "
                    "twice. Convert with aux_loss_coeff=0 (the default) to use transformers', "
                    "or call the model with output_router_logits=False to use moeflow's"
                )
            routing_context = routing_context if routing_context is not None else RoutingContext()
        out, losses = super().forward_with_losses(
            x, overlap_degree, routing_context, mode, two_level
        )
        if collected is not None:
            collected.append(routing_context.previous_logits.to(x.dtype))
        return out, losses


def _hf_router_logits() -> list | None:
    """The list transformers is recording router logits into during this forward, or None."""
    global _COLLECTOR
    if _COLLECTOR is None:  # looked up once, not on every layer call
        try:
            from transformers.utils.output_capturing import _active_collector
        except ImportError:  # a transformers without output recorders: nothing records
            _active_collector = False
        _COLLECTOR = _active_collector
    if _COLLECTOR is False:
        return None
    collected = _COLLECTOR.get()
    return None if collected is None else collected.get("router_logits")


def _shared_keys(prefix: str) -> dict[str, str]:
    return {name: f"{prefix}shared_expert.{name}_proj.weight" for name in ("gate", "up", "down")}


def _to_hf_keys(module: HFSparseMoELayer, state: dict, prefix: str, metadata) -> None:
    """`state_dict` post-hook: moeflow's keys of this layer -> the HF block's."""
    if not module.hf_state_dict:
        return
    p = prefix
    state[f"{p}gate.weight"] = state.pop(f"{p}router.weight")
    state[f"{p}experts.gate_up_proj"] = state.pop(f"{p}experts.w1").transpose(1, 2)
    state[f"{p}experts.down_proj"] = state.pop(f"{p}experts.w2").transpose(1, 2)
    bias = state.pop(f"{p}router.expert_bias", None)
    if bias is not None and module.config.router.bias_update_rate > 0:
        state[f"{p}router.expert_bias"] = bias
    if f"{p}shared_expert.ffn.w1" in state:
        w1, w2 = state.pop(f"{p}shared_expert.ffn.w1"), state.pop(f"{p}shared_expert.ffn.w2")
        f = w2.shape[0]
        keys = _shared_keys(p)
        # Copies: two views of one tensor read as tied weights to save_pretrained.
        state[keys["gate"]], state[keys["up"]] = w1[:, :f].t().clone(), w1[:, f:].t().clone()
        state[keys["down"]] = w2.t()
        gate = state.pop(f"{p}shared_expert.gate", None)
        if gate is not None:
            state[f"{p}shared_expert_gate.weight"] = gate.t()


def _from_hf_keys(module: HFSparseMoELayer, state: dict, prefix: str, *_) -> None:
    """`load_state_dict` pre-hook: the HF block's keys of this layer (if given) -> moeflow's."""
    p = prefix
    if f"{p}gate.weight" not in state:
        return
    state[f"{p}router.weight"] = state.pop(f"{p}gate.weight")
    for hf, ours in (("gate_up_proj", "w1"), ("down_proj", "w2")):
        if f"{p}experts.{hf}" in state:
            state[f"{p}experts.{ours}"] = state.pop(f"{p}experts.{hf}").transpose(1, 2)
    # HF blocks have no aux-loss-free bias: keep the layer's own unless the dict holds one.
    state.setdefault(f"{p}router.expert_bias", module.router.expert_bias.detach().clone())
    keys = _shared_keys(p)
    if keys["gate"] in state and keys["up"] in state:
        gate, up = state.pop(keys["gate"]), state.pop(keys["up"])
        state[f"{p}shared_expert.ffn.w1"] = torch.cat([gate.t(), up.t()], dim=1)
    if keys["down"] in state:
        state[f"{p}shared_expert.ffn.w2"] = state.pop(keys["down"]).t()
    if f"{p}shared_expert_gate.weight" in state:
        state[f"{p}shared_expert.gate"] = state.pop(f"{p}shared_expert_gate.weight").t()
