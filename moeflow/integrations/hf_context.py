"""One routing context per forward of a Hugging Face model: its decoder layers call
`mlp(hidden_states)` with none, so the MoE layers that `upcycle` and `convert` put in (MoE++'s
gating residual, RMoE's recurrent router) get theirs from hooks, and HF gradient checkpointing's
recomputation starts from the context as it was (statistics counted once).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from moeflow.integrations.hf import upcycle
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
    ...     num_hidden_layers=2, num_attention_heads=4))
    >>> upcycle(model, num_experts=2, top_k=1)  # attaches the flow
    [0, 1]
    >>> _ = model(torch.zeros(1, 5, dtype=torch.long))
    >>> model._moeflow_context_flow.context.layers_seen  # both MoE layers saw this forward's
    2
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from moeflow.moe.layer import MoELayer
from moeflow.moe.routing_context import RoutingContext
from moeflow.moe.walk import moe_layers


class _ContextFlow:
    """One `RoutingContext` per forward of an HF model, handed to its MoE layers in call order
    (the HF decoder layers call `mlp(hidden_states)` with none). A second call of a layer within
    the same forward is activation checkpointing's recomputation: it starts from a copy of the
    context as it was before the layer's first call. If that first call ran without grad
    (reentrant checkpointing), the recomputation is the real training call; otherwise it is
    marked `recomputing`, so losses and balancing counts are counted once. The model call's
    `attention_mask` (2-D) is each layer's token mask: padding counts in no balancing loss.
    Reentrant checkpointing cannot carry the gradient between the routers of MoE++ (gating
    residual) and RMoE layers, so it is refused for them, naming the fix."""

    def __init__(self, model: nn.Module) -> None:
        self.context = RoutingContext()
        self.before: dict[int, tuple[RoutingContext, bool]] = {}
        self.attention_mask: torch.Tensor | None = None
        self.handles = [model.register_forward_pre_hook(self._new_forward, with_kwargs=True)]
        for _, layer in moe_layers(model):
            self.handles.append(layer.register_forward_pre_hook(self._give, with_kwargs=True))

    def _new_forward(self, module, args, kwargs) -> None:
        self.context, self.before = RoutingContext(), {}
        self.attention_mask = _attention_mask(module, args, kwargs)

    def __getstate__(self) -> dict:
        """A copy of the model (`copy.deepcopy`, pickling) starts with no forward in flight: the
        context and snapshots hold the last forward's graph, which only that forward's backward
        reads, and which a copy cannot take along."""
        return {**self.__dict__, "context": RoutingContext(), "before": {}, "attention_mask": None}

    def _give(self, layer: MoELayer, args, kwargs):
        if kwargs.get("routing_context") is not None or (len(args) > 2 and args[2] is not None):
            return None  # the caller passes its own
        self.context.token_mask = _token_mask(self.attention_mask, args[0] if args else None)
        first = self.before.get(id(layer))
        if first is None:
            self.before[id(layer)] = (self.context.copy(), torch.is_grad_enabled())
            context = self.context
        else:
            context = first[0].copy()
            context.recomputing = first[1]
            if not first[1] and context.layers_seen and _reads_context(layer):
                raise ValueError(
                    "reentrant gradient checkpointing cuts the gradient that flows from one MoE "
                    f"layer's router to the next ({layer.config.router.type!r} routers read the "
                    "previous layer's routing): use model.gradient_checkpointing_enable("
                    'gradient_checkpointing_kwargs={"use_reentrant": False})'
                )
        return args, {**kwargs, "routing_context": context}


def _attention_mask(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The `attention_mask` argument of an HF model's forward call (keyword or positional)."""
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    names = list(inspect.signature(model.forward).parameters)
    i = names.index("attention_mask") if "attention_mask" in names else len(args)
    return args[i] if i < len(args) else None


def _token_mask(mask: torch.Tensor | None, x: torch.Tensor | None) -> torch.Tensor | None:
    """The padding mask of the MoE layer input `x` `[B, S, D]`: a 2-D attention mask `[B, L]`
    covers the cached tokens then the S new ones (generation), so its last S columns. Other
    masks (4-D, packed) say nothing of padding per token: None."""
    if mask is None or mask.dim() != 2 or x is None or x.dim() != 3:
        return None
    if mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
        return None
    return mask[:, mask.shape[1] - x.shape[1] :]


def _reads_context(layer: MoELayer) -> bool:
    r = layer.config.router
    return r.type == "rmoe" or (r.type == "moepp" and r.gating_residual)


def attach_routing_context(model: nn.Module) -> None:
    """Pass a routing context through the MoE layers of `model` on every forward (MoE++'s gating
    residual, RMoE's recurrent router read it), handling HF gradient checkpointing; `upcycle` and
    `convert` call it. Idempotent: a second call re-attaches (e.g. after more layers became MoE)."""
    old = getattr(model, "_moeflow_context_flow", None)
    if old is not None:
        for handle in old.handles:
            handle.remove()
    model._moeflow_context_flow = _ContextFlow(model)
