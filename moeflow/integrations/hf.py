"""Hugging Face transformers: sparse upcycling of a dense decoder's MLPs into moeflow MoE layers,
and converting the sparse MoE blocks of Mixtral, Qwen2-MoE/Qwen3-MoE and OLMoE into them and back.

`upcycle(model, moe_config, layers=None)` (or `upcycle(model, num_experts=8, top_k=2)`, which reads
the shapes, activation and biases from the model) replaces, in place, the MLP of the chosen decoder
layers (default: all) of a Llama, Qwen2/Qwen3 or Mistral style model (`model.model.layers[i].mlp`
with `gate_proj`, `up_proj`, `down_proj`, `hidden_act = "silu"`) or of GPT-2 (`transformer.h[i].mlp`
with `c_fc`, `c_proj` and biases, `gelu_new`) with an `MoELayer` whose experts all start as copies
of that MLP (sparse upcycling, Komatsuzaki et al.): SwiGLU with `w1 = [gate_proj^T | up_proj^T]`,
`w2 = down_proj^T`; GPT-2 with `gelu_tanh`, `w1 = c_fc`, `w2 = c_proj` and their biases
(`MoEConfig.ffn_bias`). GPT-2's MLP dropout stays after the MoE layer (`nn.Sequential`). Router
modules the layers share (RMoE's GRU cell) are registered once on the model as `moe_router_shared`.
With the top-k weights summing to 1 (the default routing), the upcycled model computes the dense
model's logits at step 0. The decoder layer calls `mlp(hidden_states)`, which `MoELayer` accepts as
it is; `moeflow.parallel` (`parallelize`, `GradSync`) then works on the model as on moeflow's own
decoder. A given `MoEConfig`'s shapes, activation and `ffn_bias` must be the MLP's (a mismatch is
refused naming the field).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from moeflow.moe.config import MoEConfig, RouterConfig
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

from moeflow.integrations.hf_blocks import HFSparseMoELayer
from moeflow.integrations.hf_context import attach_routing_context
from moeflow.moe.config import MoEConfig, RouterConfig
from moeflow.moe.ffn import FeedForward
from moeflow.moe.layer import MoELayer

# transformers' activation names -> moeflow's (GPT-2's "gelu_new" is the tanh approximation).
HF_ACTIVATIONS = {
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
}  # fmt: skip


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a `*ForCausalLM` (or its base model): `model.model.layers` (Llama,
    Qwen2/Qwen3, Mistral), or `model.transformer.h` (GPT-2)."""
    for path in ("model.layers", "layers", "transformer.h", "h"):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return node
    raise ValueError(
        f"{type(model).__name__} has neither model.layers nor transformer.h: upcycle() handles "
        "Llama, Qwen2/Qwen3, Mistral and GPT-2 style decoders"
    )


def dense_ffn(mlp: nn.Module, config) -> FeedForward:
    """A copy of an HF MLP as a moeflow `FeedForward`: a Llama-style gated MLP (`gate_proj`,
    `up_proj`, `down_proj`, `hidden_act = "silu"`, with or without `mlp_bias`) as SwiGLU, or
    GPT-2's (`c_fc`, `c_proj` with biases, `activation_function`)."""
    name = type(mlp).__name__
    if all(hasattr(mlp, a) for a in ("c_fc", "c_proj")):  # GPT-2: Conv1D weights are [in, out]
        act = getattr(config, "activation_function", "gelu_new")
        if act not in HF_ACTIVATIONS:
            raise ValueError(
                f"activation_function = {act!r} has no moeflow activation; use one of "
                f"{sorted(HF_ACTIVATIONS)}"
            )
        fc, proj = mlp.c_fc, mlp.c_proj
        ffn = FeedForward(fc.weight.shape[0], fc.weight.shape[1], HF_ACTIVATIONS[act], bias=True)
        ffn.to(device=fc.weight.device, dtype=fc.weight.dtype)
        with torch.no_grad():
            for dst, src in ((ffn.w1, fc.weight), (ffn.b1, fc.bias), (ffn.w2, proj.weight),
                             (ffn.b2, proj.bias)):  # fmt: skip
                dst.copy_(src)
        return ffn
    parts = [getattr(mlp, a, None) for a in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in parts):
        raise ValueError(
            f"{name} is neither a gated MLP (gate_proj, up_proj, down_proj) nor GPT-2's (c_fc, "
            "c_proj): upcycle() handles Llama, Qwen2/Qwen3, Mistral and GPT-2 style MLPs"
        )
    hidden_act = getattr(config, "hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(
            f"hidden_act = {hidden_act!r}: moeflow's gated experts are SwiGLU (silu); upcycle "
            "a model with hidden_act='silu'"
        )
    gate, up, down = parts
    bias = gate.bias is not None
    if any((p.bias is not None) != bias for p in parts):
        raise ValueError(f"{name}: some projections have biases and some not")
    ffn = FeedForward(gate.in_features, gate.out_features, "swiglu", bias=bias)
    ffn.to(device=gate.weight.device, dtype=gate.weight.dtype)
    with torch.no_grad():
        ffn.w1.copy_(torch.cat([gate.weight.t(), up.weight.t()], dim=1))
        ffn.w2.copy_(down.weight.t())
        if bias:
            ffn.b1.copy_(torch.cat([gate.bias, up.bias]))
            ffn.b2.copy_(down.bias)
    return ffn


def upcycle(
    model: nn.Module,
    moe_config: MoEConfig | None = None,
    layers: list[int] | None = None,
    *,
    num_experts: int | None = None,
    top_k: int | None = None,
    router: RouterConfig | None = None,
) -> list[int]:
    """Replace the MLPs of decoder `layers` (default: all) by `MoELayer`s upcycled from them (see
    the module doc); returns the layer indices replaced. Either a whole `moe_config` (checked
    against each MLP), or `num_experts` (with `top_k` or a whole `router`): the hidden size, FFN
    width, activation and biases are then read from each MLP.

    Example (GPT-2 as built: gelu_new and biases come from the model):
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
        >>> upcycle(gpt2, num_experts=4, top_k=2)
        [0, 1]
        >>> moe = gpt2.transformer.h[0].mlp[0].config
        >>> moe.hidden_size, moe.ffn_hidden_size, moe.activation, moe.ffn_bias, moe.router.top_k
        (32, 128, 'gelu_tanh', True, 2)
    """
    moe_config = _upcycle_config(moe_config, num_experts, top_k, router)
    stack = decoder_layers(model)
    chosen = list(range(len(stack))) if layers is None else list(layers)
    bad = [i for i in chosen if not (isinstance(i, int) and 0 <= i < len(stack))]
    if bad:
        raise ValueError(f"layers {bad} are not decoder layer indices (0..{len(stack) - 1})")
    # Router modules the MoE layers share (RMoE's GRU cell), registered once on the model, as
    # moeflow's decoder does.
    if not isinstance(getattr(model, "moe_router_shared", None), nn.ModuleDict):
        model.moe_router_shared = nn.ModuleDict()
    for i in chosen:
        mlp = stack[i].mlp
        if any(isinstance(m, MoELayer) for m in mlp.modules()):
            raise ValueError(f"decoder layer {i} already holds an MoELayer")
        ffn = dense_ffn(mlp, getattr(model, "config", None))
        d, f = ffn.w1.shape[0], ffn.w2.shape[0]
        want = {"hidden_size": d, "ffn_hidden_size": f, "activation": ffn.activation,
                "ffn_bias": ffn.b1 is not None}  # fmt: skip
        layer_config = moe_config
        if isinstance(moe_config, dict):  # read from this MLP
            layer_config = MoEConfig(**moe_config, **want)
        for key, value in want.items():
            if getattr(layer_config, key) != value:
                raise ValueError(
                    f"moe.{key} ({getattr(layer_config, key)!r}) must match decoder layer {i}'s "
                    f"MLP ({value!r}) to upcycle it: set {key}={value!r}, or pass "
                    "num_experts= instead of a MoEConfig to read it from the model"
                )
        moe = MoELayer.from_dense(ffn, layer_config, model.moe_router_shared)
        dropout = getattr(mlp, "dropout", None)  # GPT-2 drops the MLP's output in training
        has_dropout = isinstance(dropout, nn.Dropout) and dropout.p > 0
        stack[i].mlp = nn.Sequential(moe, nn.Dropout(dropout.p)) if has_dropout else moe
        stack[i].mlp.train(mlp.training)  # the model's train/eval mode, as the MLP had it
        model.moe_router_shared.to(device=ffn.w1.device, dtype=ffn.w1.dtype)
    attach_routing_context(model)
    return chosen


def _upcycle_config(
    moe_config: MoEConfig | None, num_experts: int | None, top_k: int | None, router
) -> MoEConfig | dict:
    """`upcycle`'s config: the one given, or the fields the MLPs do not fix (a dict)."""
    if moe_config is not None:
        if num_experts is not None or top_k is not None or router is not None:
            raise ValueError(
                "upcycle: pass either a MoEConfig or num_experts/top_k/router, not both (the "
                "MoEConfig already holds them)"
            )
        if not isinstance(moe_config, MoEConfig):
            raise TypeError(f"upcycle: moe_config must be a MoEConfig, not {type(moe_config)}")
        return moe_config
    if num_experts is None:
        raise ValueError(
            "upcycle: pass num_experts (and top_k, or a RouterConfig as router) to read the rest "
            "from the model, or a whole MoEConfig"
        )
    if router is not None and top_k is not None and router.top_k != top_k:
        raise ValueError(f"upcycle: top_k ({top_k}) contradicts router.top_k ({router.top_k})")
    if router is None:
        router = RouterConfig() if top_k is None else RouterConfig(top_k=top_k)
    return {"num_experts": num_experts, "router": router}


# The sparse MoE blocks `convert` knows (transformers 5.x): a `gate` router (weight [E, D], top_k,
# norm_topk_prob except Mixtral, which always renormalises) and `experts` (gate_up_proj
# [E, 2F, D], down_proj [E, D, F]); Qwen2-MoE adds a gated shared expert.
SPARSE_BLOCKS = (
    "MixtralSparseMoeBlock",
    "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "OlmoeSparseMoeBlock",
)


def block_config(block: nn.Module, config, aux_loss_coeff: float | None = None) -> MoEConfig:
    """The `MoEConfig` computing what the HF sparse MoE `block` computes: softmax over all
    experts in float32 (as HF does, `softmax_dtype="fp32"`), top-k, renormalised when the block
    does, dropless. `aux_loss_coeff` (moeflow's own per-layer balancing loss) defaults to 0: a
    converted model balances as HF does, through `output_router_logits=True` (HF's loss, pooled
    over the layers, from the logits the layers record; `moeflow.integrations.hf_blocks`)."""
    name = type(block).__name__
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(
            f"{name}: hidden_act = {config.hidden_act!r}; moeflow's experts are SwiGLU"
        )
    gate, experts = block.gate, block.experts
    renormalise = True if name.startswith("Mixtral") else bool(gate.norm_topk_prob)
    aux_loss_coeff = 0.0 if aux_loss_coeff is None else aux_loss_coeff
    shared = getattr(block, "shared_expert", None)
    return MoEConfig(
        hidden_size=gate.weight.shape[1],
        num_experts=gate.weight.shape[0],
        ffn_hidden_size=experts.gate_up_proj.shape[1] // 2,
        router=RouterConfig(
            top_k=gate.top_k, pre_softmax=True, normalize_topk=renormalise, softmax_dtype="fp32",
            aux_loss_coeff=float(aux_loss_coeff),
        ),
        shared_expert_ffn_hidden_size=0 if shared is None else shared.down_proj.in_features,
        shared_expert_gate=getattr(block, "shared_expert_gate", None) is not None,
    )  # fmt: skip


def convert(
    model: nn.Module,
    aux_loss_coeff: float | None = None,
    moe_config: MoEConfig | None = None,
    hf_state_dict: bool = True,
) -> list[str]:
    """Replace, in place, every HF sparse MoE block of `model` (`SPARSE_BLOCKS`) by an
    `HFSparseMoELayer` computing the same outputs (`block_config`; the block's router jitter and
    router-logit outputs included), with its weights; returns the module names. `moe_config`
    (e.g. another router type or a capacity) replaces `block_config`'s; its shapes, top-k,
    routing semantics and shared expert must be the blocks' own. `hf_state_dict`: the layers'
    state-dict keys are the HF blocks' (loading takes both); False keeps moeflow's."""
    config = model.config
    names = []
    for name, block in list(model.named_modules()):
        if type(block).__name__ not in SPARSE_BLOCKS:
            continue
        cfg = block_config(block, config, aux_loss_coeff)
        if moe_config is not None:
            _check_same_blocks(name, cfg, moe_config)
            cfg = moe_config
        w = block.gate.weight
        jitter = getattr(block, "jitter_noise", 0.0)
        layer = HFSparseMoELayer(cfg, type(block), jitter).to(device=w.device, dtype=w.dtype)
        layer.hf_state_dict = hf_state_dict
        with torch.no_grad():
            layer.router.weight.copy_(w)
            layer.experts.w1.copy_(block.experts.gate_up_proj.transpose(1, 2))
            layer.experts.w2.copy_(block.experts.down_proj.transpose(1, 2))
            if layer.shared_expert is not None:
                _copy_ffn(block.shared_expert, layer.shared_expert.ffn)
                if layer.shared_expert.gate is not None:
                    layer.shared_expert.gate.copy_(block.shared_expert_gate.weight.t())
        _replace(model, name, layer)
        names.append(name)
    attach_routing_context(model)
    return names


# The `MoEConfig` fields an HF sparse block fixes: its shapes, routing semantics, shared expert.
BLOCK_FIXED = (
    "hidden_size", "num_experts", "ffn_hidden_size", "activation", "a2a_dim", "ffn_bias",
    "shared_expert_ffn_hidden_size", "shared_expert_gate",
    "router.top_k", "router.pre_softmax", "router.normalize_topk", "router.softmax_dtype",
)  # fmt: skip


def _check_same_blocks(name: str, own: MoEConfig, given: MoEConfig) -> None:
    for key in BLOCK_FIXED:
        a, b = own, given
        for part in key.split("."):
            a, b = getattr(a, part), getattr(b, part)
        if a != b:
            raise ValueError(
                f"moe_config.{key} ({b!r}) differs from HF block '{name}' ({a!r}): convert keeps "
                "the blocks' shapes and routing"
            )


def export(model: nn.Module) -> list[str]:
    """The inverse of `convert`: every converted `MoELayer` back into its HF block class with the
    trained weights, in place, so `save_pretrained` writes a checkpoint plain transformers loads.
    The layers must hold every expert (export from one process); returns the module names."""
    names = []
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, HFSparseMoELayer):
            continue
        cls = layer.hf_block_class
        if layer.layout.group_size != 1:
            raise ValueError(
                f"MoE layer '{name}' is spread over {layer.layout.group_size} ranks: export needs "
                "every expert in one process (load the checkpoint with parallel.ep = 1)"
            )
        w = layer.router.weight
        block = cls(model.config).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            block.gate.weight.copy_(w)
            block.experts.gate_up_proj.copy_(layer.experts.w1.transpose(1, 2))
            block.experts.down_proj.copy_(layer.experts.w2.transpose(1, 2))
            if layer.shared_expert is not None:
                _copy_ffn(layer.shared_expert.ffn, block.shared_expert)
                if layer.shared_expert.gate is not None:
                    block.shared_expert_gate.weight.copy_(layer.shared_expert.gate.t())
        _replace(model, name, block)
        names.append(name)
    attach_routing_context(model)  # the MoE layers left, if any
    return names


def _copy_ffn(src: nn.Module, dst: nn.Module) -> None:
    """Between an HF gated MLP (gate_proj, up_proj, down_proj) and a moeflow `FeedForward`."""
    if isinstance(dst, FeedForward):
        dst.w1.copy_(torch.cat([src.gate_proj.weight.t(), src.up_proj.weight.t()], dim=1))
        dst.w2.copy_(src.down_proj.weight.t())
    else:
        f = src.w2.shape[0]
        dst.gate_proj.weight.copy_(src.w1[:, :f].t())
        dst.up_proj.weight.copy_(src.w1[:, f:].t())
        dst.down_proj.weight.copy_(src.w2.t())


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
