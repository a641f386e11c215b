"""Finding the MoE layers of a model and splitting its parameters into dense and expert ones.

Every part of moeflow that walks a model (gradient sync, checkpoints, the trainer, the dry run,
re-placement) asks these, so "which parameters are experts" is written once.

Example:
    >>> from moeflow.moe.config import MoEConfig
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8),
    ...                             MoELayer(MoEConfig(hidden_size=8, num_experts=2,
    ...                                                ffn_hidden_size=8)))
    >>> [name for name, _ in moe_layers(model)], sorted(expert_parameters(model))
    (['1'], ['1.experts.w1', '1.experts.w2'])
    >>> dense, expert = split_parameters(model)
    >>> [n for n, _ in dense][:2], [n for n, _ in expert]
    (['0.weight', '0.bias'], ['1.experts.w1', '1.experts.w2'])
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from moeflow.moe.layer import MoELayer


class ExpertParameter(NamedTuple):
    prefix: str  # the experts module's qualified name, e.g. "blocks.0.ffn.experts"
    name: str  # the parameter's name in it ("w1", "w2")
    layer: MoELayer


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """Every `MoELayer` of `model` with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def expert_parameters(model: nn.Module) -> dict[str, ExpertParameter]:
    """Qualified name of every expert weight (the parameters laid out over `ep`) -> where it is."""
    out = {}
    for layer_name, layer in moe_layers(model):
        prefix = f"{layer_name}.experts" if layer_name else "experts"
        for pname, _ in layer.experts.named_parameters():
            out[f"{prefix}.{pname}"] = ExpertParameter(prefix, pname, layer)
    return out


def split_parameters(
    model: nn.Module,
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """`(dense, expert)` named parameters of `model`, each in `named_parameters` order."""
    experts = expert_parameters(model)
    named = list(model.named_parameters())
    return [(n, p) for n, p in named if n not in experts], [
        (n, p) for n, p in named if n in experts
    ]


def finish_optimizer_step(model: nn.Module) -> None:
    """Call after every optimizer step (collective over each layer's balance group when the
    aux-loss-free bias is on): resets global-batch counts, updates selection biases.

    Example:
        >>> from moeflow.moe.config import MoEConfig, RouterConfig
        >>> model = torch.nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
        ...     ffn_hidden_size=8, router=RouterConfig(bias_update_rate=0.1))))
        >>> _ = model(torch.randn(6, 8))
        >>> finish_optimizer_step(model)
        >>> sorted(model[0].router.expert_bias.abs().tolist()) in ([0.0, 0.0], [0.1, 0.1])
        True
    """
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.finish_optimizer_step()


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Set the balancing-loss gradient scale of every `MoELayer` in `model`.

    Example:
        >>> from moeflow.moe.config import MoEConfig
        >>> model = torch.nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
        ...                                                ffn_hidden_size=8)))
        >>> set_aux_loss_scale(model, 1 / 4)  # 4 micro-batches per optimizer step
        >>> model[0].aux_loss_scale
        0.25
    """
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.aux_loss_scale = float(scale)
