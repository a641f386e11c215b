"""Hugging Face transformers: sparse upcycling of a dense decoder's MLPs into moeflow MoE layers.

`upcycle(model, moe_config, layers=None)` replaces, in place, the MLP of the chosen decoder layers
(default: all) of a Llama, Qwen2/Qwen3 or Mistral style model (`model.model.layers[i].mlp` with
`gate_proj`, `up_proj`, `down_proj`, no biases, `hidden_act = "silu"`) with an `MoELayer` whose
experts all start as copies of that MLP (sparse upcycling, Komatsuzaki et al.): SwiGLU with
`w1 = [gate_proj^T | up_proj^T]`, `w2 = down_proj^T`. With the top-k weights summing to 1
(the default routing), the upcycled model computes the dense model's logits at step 0. The
decoder layer calls `mlp(hidden_states)`, which `MoELayer` accepts as it is; `moeflow.parallel`
(`parallelize`, `GradSync`) then works on the model as on moeflow's own decoder. Models whose
MLPs have biases or another activation (GPT-2's `gelu_new` with biases) are refused, naming why.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from moeflow.moe.config import MoEConfig
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32,
    ...     intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)).double()
    >>> ids = torch.randint(0, 64, (2, 7))
    >>> dense = model(ids).logits
    >>> upcycle(model, MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=48))
    [0, 1]
    >>> torch.allclose(model(ids).logits, dense, rtol=1e-10, atol=1e-12)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from moeflow.moe.config import MoEConfig
from moeflow.moe.ffn import FeedForward
from moeflow.moe.layer import MoELayer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a `*ForCausalLM` (or its base model): `model.model.layers`."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no model.layers: upcycle() handles Llama, Qwen2/Qwen3 "
            "and Mistral style decoders"
        )
    return layers


def dense_ffn(mlp: nn.Module, hidden_act: str) -> FeedForward:
    """A copy of a Llama-style gated MLP as a moeflow SwiGLU `FeedForward`."""
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in parts):
        raise ValueError(
            f"{type(mlp).__name__} is not a gated MLP (gate_proj, up_proj, down_proj): upcycle() "
            "handles Llama, Qwen2/Qwen3 and Mistral style MLPs"
        )
    if any(p.bias is not None for p in parts):
        raise ValueError(f"{type(mlp).__name__} has biases (mlp_bias): moeflow's experts have none")
    if hidden_act != "silu":
        raise ValueError(
            f"hidden_act = {hidden_act!r}: moeflow's gated experts are SwiGLU (silu); upcycle "
            "a model with hidden_act='silu'"
        )
    gate, up, down = parts
    ffn = FeedForward(gate.in_features, gate.out_features, "swiglu")
    ffn.to(device=gate.weight.device, dtype=gate.weight.dtype)
    with torch.no_grad():
        ffn.w1.copy_(torch.cat([gate.weight.t(), up.weight.t()], dim=1))
        ffn.w2.copy_(down.weight.t())
    return ffn


def upcycle(model: nn.Module, moe_config: MoEConfig, layers: list[int] | None = None) -> list[int]:
    """Replace the MLPs of decoder `layers` (default: all) by `MoELayer`s upcycled from them (see
    the module doc); returns the layer indices replaced."""
    stack = decoder_layers(model)
    chosen = list(range(len(stack))) if layers is None else list(layers)
    bad = [i for i in chosen if not (isinstance(i, int) and 0 <= i < len(stack))]
    if bad:
        raise ValueError(f"layers {bad} are not decoder layer indices (0..{len(stack) - 1})")
    hidden_act = getattr(getattr(model, "config", None), "hidden_act", "silu")
    for i in chosen:
        mlp = stack[i].mlp
        if isinstance(mlp, MoELayer):
            raise ValueError(f"decoder layer {i} already holds an MoELayer")
        ffn = dense_ffn(mlp, hidden_act)
        d, f = ffn.w1.shape[0], ffn.w2.shape[0]
        if (moe_config.hidden_size, moe_config.ffn_hidden_size) != (d, f):
            raise ValueError(
                f"moe.hidden_size / moe.ffn_hidden_size ({moe_config.hidden_size}, "
                f"{moe_config.ffn_hidden_size}) must match decoder layer {i}'s MLP ({d}, {f}) to "
                f"upcycle it: set hidden_size={d}, ffn_hidden_size={f}"
            )
        if moe_config.activation != "swiglu":
            raise ValueError(
                f"moe.activation ({moe_config.activation!r}) must be 'swiglu' to upcycle a gated "
                "silu MLP"
            )
        stack[i].mlp = MoELayer.from_dense(ffn, moe_config)
    return chosen
