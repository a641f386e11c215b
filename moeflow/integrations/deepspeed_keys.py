"""DeepSpeed's state-dict layout for the DeepSpeed-style `MoE`, so that DeepSpeed's
`engine.save_checkpoint` / `load_checkpoint` work on it unchanged and a checkpoint of DeepSpeed's
own `MoE` and one of the drop-in are interchangeable.

DeepSpeed's `MoE` names its tensors (under the layer's prefix):

    deepspeed_moe.gate.wg.weight                        the gate's weight [E, D]
    deepspeed_moe.experts.deepspeed_experts.<i>.<name>  local expert i's tensors, named as in the
                                                        `expert` module given to the constructor

Local expert i of expert-parallel rank r is expert `r * L + i` (L = E / ep_size): the engine's
`save_checkpoint` writes one file per expert under that global id, `load_checkpoint` reads this
rank's. The drop-in holds its experts as grouped tensors (`experts.w1 [L, D(+1), F]` with b1 as
its last row, `experts.w2 [L, F, D]`, and every expert's b2 in the layer's whole `ffn_out_bias
[E, D]`) or, for experts moeflow does not group, as modules (`experts.local.<i>`).
`to_deepspeed` and `from_deepspeed` map between the two; the hooks make `state_dict` write
DeepSpeed's layout and `load_state_dict` take DeepSpeed's or moeflow's (`router.weight`,
`experts.w1`, ...). The expert entries of a saved state dict are copies (DeepSpeed's save copies
them too).

Loading DeepSpeed's layout with biased experts at ep > 1 is collective over the expert group: a
rank's state dict holds only its own experts' b2 and the layer needs every expert's, so the ranks
exchange them (every rank loads, as in `engine.load_checkpoint`).

Example (a biased `Linear, ReLU, Linear` expert: DeepSpeed's names and `nn.Linear`'s layouts):
    >>> from torch import nn
    >>> from moeflow.integrations.deepspeed import MoE
    >>> moe = MoE(4, nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4)), num_experts=2)
    >>> {k: tuple(v.shape) for k, v in to_deepspeed(moe, layer_tensors(moe)).items()
    ...  if ".1." not in k}  # expert 1's keys are expert 0's
    ... # doctest: +NORMALIZE_WHITESPACE
    {'deepspeed_moe.gate.wg.weight': (2, 4),
     'deepspeed_moe.experts.deepspeed_experts.0.0.weight': (6, 4),
     'deepspeed_moe.experts.deepspeed_experts.0.0.bias': (6,),
     'deepspeed_moe.experts.deepspeed_experts.0.2.weight': (4, 6),
     'deepspeed_moe.experts.deepspeed_experts.0.2.bias': (4,)}
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moeflow.moe.ffn import FeedForward

GATE = "deepspeed_moe.gate.wg.weight"
EXPERTS = "deepspeed_moe.experts.deepspeed_experts."
LOCAL = "experts.local."  # moeflow's expert modules (`ModuleExperts`)
# One expert's tensors by DeepSpeed's name: where each lives in the grouped layout (w1 =
# experts.w1[i, :D], b1 = experts.w1[i, D], w2 = experts.w2[i], b2 = ffn_out_bias[expert]) and
# whether DeepSpeed stores it transposed (`nn.Linear` keeps [out, in]).
SEQUENTIAL = {
    "0.weight": ("w1", True), "0.bias": ("b1", False),
    "2.weight": ("w2", True), "2.bias": ("b2", False),
}  # fmt: skip
FEED_FORWARD = {"w1": ("w1", False), "w2": ("w2", False), "b1": ("b1", False), "b2": ("b2", False)}


def grouped_names(expert: nn.Module) -> dict[str, tuple[str, bool]]:
    """DeepSpeed's names of one expert's tensors, for an `expert` the drop-in groups (a moeflow
    `FeedForward` or `nn.Sequential(Linear, act, Linear)`), each with where it lives."""
    table = FEED_FORWARD if isinstance(expert, FeedForward) else SEQUENTIAL
    own = dict(expert.named_parameters())
    return {name: where for name, where in table.items() if name in own}


def layer_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The drop-in's tensors in moeflow's layout, detached (no copies)."""
    out = {"router.weight": layer.router.weight.detach()}
    if layer.per_expert_modules:
        local = layer.experts.local.state_dict()
        return out | {LOCAL + key: value.detach() for key, value in local.items()}
    out |= {"experts.w1": layer.experts.w1.detach(), "experts.w2": layer.experts.w2.detach()}
    if layer.ffn_out_bias is not None:
        out["ffn_out_bias"] = layer.ffn_out_bias.detach()
    return out


def _deepspeed_slots(layer: nn.Module) -> list[int]:
    """Logical ids of this rank's expert rows, which must be DeepSpeed's local experts in order
    (rank r of the expert group holds `r*L .. r*L + L - 1`)."""
    ids = layer.local_expert_ids
    first = layer.expert_dispatch.rank * len(ids)
    if ids != list(range(first, first + len(ids))):
        raise ValueError(
            f"MoE: this rank holds experts {ids}, DeepSpeed's layout holds "
            f"{list(range(first, first + len(ids)))} here; a re-placed layer has no DeepSpeed "
            "checkpoint layout (save it with moeflow.train.checkpoint, or keep the placement)"
        )
    return ids


def _parts(layer: nn.Module, w1, w2, b2, slot: int, expert: int) -> dict[str, torch.Tensor]:
    """Views of one expert's tensors in the grouped layout."""
    D = layer.config.hidden_size
    parts = {"w1": w1[slot, :D], "w2": w2[slot]}
    if w1.shape[1] > D:
        parts["b1"] = w1[slot, D]
    if b2 is not None:
        parts["b2"] = b2[expert]
    return parts


def to_deepspeed(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The drop-in's `tensors` (moeflow's layout, `layer_tensors`) in DeepSpeed's layout. Takes
    the entries it maps out of `tensors`; what is left there has no DeepSpeed name."""
    out = {GATE: tensors.pop("router.weight")}
    if layer.per_expert_modules:
        for key in [k for k in tensors if k.startswith(LOCAL)]:
            out[EXPERTS + key.removeprefix(LOCAL)] = tensors.pop(key)
        return out
    w1, w2 = tensors.pop("experts.w1"), tensors.pop("experts.w2")
    b2 = tensors.pop("ffn_out_bias", None)
    for i, expert in enumerate(_deepspeed_slots(layer)):
        parts = _parts(layer, w1, w2, b2, i, expert)
        for name, (part, transposed) in layer.expert_names.items():
            value = parts[part].detach()
            out[f"{EXPERTS}{i}.{name}"] = (value.t() if transposed else value).clone(
                memory_format=torch.contiguous_format
            )
    return out


def from_deepspeed(
    layer: nn.Module, given: dict[str, torch.Tensor], current: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`given` (every DeepSpeed key of the layer) in moeflow's layout; `current` is
    `layer_tensors(layer)`. Collective over the expert group with biased grouped experts at
    ep > 1 (module doc)."""
    out = {"router.weight": given[GATE]}
    if layer.per_expert_modules:
        n = len(EXPERTS)
        return out | {LOCAL + k[n:]: v for k, v in given.items() if k.startswith(EXPERTS)}
    w1, w2 = current["experts.w1"].clone(), current["experts.w2"].clone()
    b2 = current.get("ffn_out_bias")
    b2 = None if b2 is None else b2.clone()
    for i, expert in enumerate(_deepspeed_slots(layer)):
        parts = _parts(layer, w1, w2, b2, i, expert)
        for name, (part, transposed) in layer.expert_names.items():
            value = given[f"{EXPERTS}{i}.{name}"]
            parts[part].copy_(value.t() if transposed else value)
    out |= {"experts.w1": w1, "experts.w2": w2}
    if b2 is not None:
        _gather_bias_rows(layer, b2)
        out["ffn_out_bias"] = b2
    return out


def _gather_bias_rows(layer: nn.Module, b2_ED: torch.Tensor) -> None:
    """Every rank's rows of `b2_ED` (its own experts', just loaded) written on every rank of the
    layer's expert group."""
    group = layer.moeflow_expert_group()
    size = 1 if group is None else dist.get_world_size(group)
    if size == 1:
        return
    rows = b2_ED[layer.local_expert_ids].contiguous()
    parts = [torch.empty_like(rows) for _ in range(size)]
    dist.all_gather(parts, rows, group=group)
    for rank, part in enumerate(parts):
        b2_ED[layer.layout.local_experts(rank)] = part


def save_in_deepspeed_layout(layer: nn.Module, state_dict: dict, prefix: str, _meta) -> None:
    """`state_dict` post-hook: the layer's entries under DeepSpeed's names."""
    own = [key for key in state_dict if key.startswith(prefix)]
    tensors = {key[len(prefix) :]: state_dict.pop(key) for key in own}
    mapped = to_deepspeed(layer, tensors)
    state_dict.update({prefix + key: value for key, value in (mapped | tensors).items()})


def load_either_layout(
    layer: nn.Module,
    state_dict: dict,
    prefix: str,
    _meta,
    _strict: bool,
    missing_keys: list[str],
    _unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """`load_state_dict` pre-hook: DeepSpeed's layout rewritten into moeflow's, which torch then
    loads; its missing keys named as DeepSpeed names them. moeflow's layout passes unchanged."""
    if not any(key.startswith(prefix + "deepspeed_moe.") for key in state_dict):
        state_dict.pop(prefix + "router.expert_bias", None)  # saved before the gate dropped it
        return
    current = layer_tensors(layer)
    given = {}
    for key, want in to_deepspeed(layer, dict(current)).items():
        value = state_dict.pop(prefix + key, None)
        if value is None:
            missing_keys.append(prefix + key)
            value = want
        elif value.shape != want.shape:
            error_msgs.append(
                f"size mismatch for {prefix}{key}: copying a param with shape "
                f"{tuple(value.shape)} from checkpoint, the shape in current model is "
                f"{tuple(want.shape)}."
            )
            value = want
        given[key] = value
    for key, value in from_deepspeed(layer, given, current).items():
        state_dict[prefix + key] = value
