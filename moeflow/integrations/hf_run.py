"""`moeflow train` on a Hugging Face transformers model built from its config.

`[model] hf_config` names the model: a table (a `config.json`'s keys, `model_type` included), or
the path of a `config.json` or of a folder holding one. Its shape fields replace the reference
decoder's (`vocab_size`, `dim` = `hidden_size`, `n_layers` = `num_hidden_layers`, `n_heads` =
`num_attention_heads`, `max_seq_len` = `max_position_embeddings`); setting those in `[model]` as
well must agree, and the reference decoder's own fields (`rope_theta`, `norm_eps`, `init_std`,
`dense_ffn_hidden_size`) are refused (set the HF model's own keys in `hf_config`).

- A **dense** model (Llama, Qwen2/Qwen3, Mistral, GPT-2) is upcycled
  (`moeflow.integrations.hf.upcycle`): the MLPs of decoder layers 0, f, 2f, ... (`f =
  model.moe_layer_freq`) become `MoELayer`s of `[model.moe]` whose experts all start as copies of
  that MLP (`moe.hidden_size`, `moe.ffn_hidden_size`, `moe.activation` and `moe.ffn_bias` come
  from the MLP).
- A **sparse** model (Mixtral, Qwen2-MoE/Qwen3-MoE, OLMoE) has its MoE blocks converted
  (`moeflow.integrations.hf.convert`): the shapes, `router.top_k`, the routing semantics
  (`pre_softmax`, `normalize_topk`, `softmax_dtype`) and the shared expert come from the model
  (setting them otherwise is refused); `router.aux_loss_coeff` defaults to the model's
  `router_aux_loss_coef`; the other `[model.moe]` fields (capacity, router type, z-loss, ...) apply.

`[upcycle] weights` is a folder written by `save_pretrained`: the run starts from its weights
(every weight must load) instead of the HF init; its `config.json` is `model.hf_config` when that
is not set. Every rank builds the whole HF model with `train.seed` (so every rank holds the same
weights), then `parallelize` keeps its own experts: the model must fit one rank's memory once.
The trainer sees an `HFCausalLM` (token ids -> logits, `hf` the transformers model), so the main
job's data, checkpoints (expert keys by logical id, resharding across `ep`), metrics, tuner,
re-placement and launchers apply as to the reference decoder; `train.activation_checkpointing`
turns on HF's gradient checkpointing (non-reentrant). A converted model's checkpoint loaded at
`ep = 1` exports back to HF blocks with `moeflow.integrations.hf.export(model.hf)`.

Example (a tiny Llama, upcycled at every layer):
    >>> from moeflow.train.config import RunConfig
    >>> cfg = RunConfig.from_dict({"model": {"hf_config": {"model_type": "llama",
    ...     "vocab_size": 256, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    ...     "num_attention_heads": 4, "max_position_embeddings": 64}, "moe": {"num_experts": 4}},
    ...     "train": {"seq_len": 16}})
    >>> cfg.model.dim, cfg.model.n_layers, cfg.model.moe.ffn_hidden_size
    (32, 2, 48)
    >>> model = build_hf_model(cfg, torch.device("cpu"))
    >>> model(torch.zeros(1, 16, dtype=torch.long)).shape
    torch.Size([1, 16, 256])
    >>> model.origin.converted, model.origin.sparse  # 2 MLPs upcycled (the start line says so)
    (2, False)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from moeflow.models.decoder import DecoderConfig

# [model] fields read from the HF config, and the HF attribute each comes from.
SHAPE_FIELDS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "max_seq_len": "max_position_embeddings",
}
# The reference decoder's own fields: an HF model has its own keys for them.
DECODER_ONLY = (
    "rope_theta", "norm_eps", "init_std", "dense_ffn_hidden_size", "n_kv_heads", "head_dim",
    "first_k_dense",
)  # fmt: skip


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - the extra is part of the dev setup
        raise ValueError(
            "model.hf_config needs Hugging Face transformers: pip install 'moeflow[hf]' (with "
            "your torch pinned as a constraint)"
        ) from None
    return transformers


def read_hf_config(spec, field: str = "model.hf_config") -> dict:
    """The keys of an HF config: `spec` is a table, or the path of a `config.json` or of a folder
    holding one."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"{field} ({str(spec)!r}) is not a config.json or a folder holding one; give "
                "such a path, or the config's keys as a table"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{field}: {str(path)!r} is not valid JSON ({exc})") from None
    elif isinstance(spec, dict):
        data = dict(spec)
    else:
        raise ValueError(
            f"{field} ({spec!r}) must be a table of an HF config's keys or a path to a config.json"
        )
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ValueError(f"{field} needs a model_type (e.g. 'llama', 'mixtral')")
    return data


def hf_config_object(data: dict, field: str = "model.hf_config"):
    """The transformers config of `data`; a model type transformers does not know, or a key close
    to a known one but not it (a typo HF would keep silently), raises naming it."""
    transformers = _transformers()
    kwargs = dict(data)
    model_type = kwargs.pop("model_type")
    mapping = transformers.CONFIG_MAPPING
    if model_type not in mapping:
        close = difflib.get_close_matches(model_type, list(mapping.keys()), n=3)
        raise ValueError(
            f"{field}.model_type ({model_type!r}) is not a transformers model type"
            + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    cls = mapping[model_type]
    known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))
    for key in kwargs:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
        if close:
            raise ValueError(
                f"{field}.{key} is not a {cls.__name__} key; did you mean {close[0]!r}?"
            )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, *_strict_errors()) as exc:
        reason = " ".join(str(exc).split())  # huggingface_hub's errors span several lines
        raise ValueError(f"{field}: {cls.__name__} refused it: {reason}") from None


def _strict_errors() -> tuple[type[Exception], ...]:
    """huggingface_hub's validation errors of config fields (no ValueError subclass)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: configs raise TypeError / ValueError
        return ()
    return (StrictDataclassError,)


def _meta_model(config) -> nn.Module:
    with torch.device("meta"):
        return _transformers().AutoModelForCausalLM.from_config(config)


def _sparse_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, block) of every HF sparse MoE block `convert` knows."""
    from moeflow.integrations.hf import SPARSE_BLOCKS

    out = []
    for name, module in model.named_modules():
        if type(module).__name__ in SPARSE_BLOCKS:
            found = re.search(r"layers\.(\d+)\.", name + ".")
            out.append((int(found.group(1)) if found else -1, module))
    return out


def resolve_model_section(model: dict, upcycle: dict) -> dict:
    """The `[model]` table of an HF run, completed from its `hf_config` (see the module doc)."""
    model = dict(model)
    weights = upcycle.get("weights") if isinstance(upcycle, dict) else None
    spec = model.get("hf_config")
    if spec is None:
        spec = weights
    data = read_hf_config(spec)
    config = hf_config_object(data)
    defaults = {f.name: f.default for f in dataclasses.fields(DecoderConfig)}
    bad = [k for k in DECODER_ONLY if k in model and model[k] != defaults[k]]
    if bad:
        raise ValueError(
            f"model.{bad[0]} is the reference decoder's; with model.hf_config, set the HF model's "
            "own key in model.hf_config instead"
        )
    for name, attr in SHAPE_FIELDS.items():
        value = getattr(config, attr, None)
        if not isinstance(value, int):
            raise ValueError(f"model.hf_config has no integer {attr} (needed for model.{name})")
        if name in model and model[name] != value:
            raise ValueError(
                f"model.{name} ({model[name]!r}) contradicts model.hf_config's {attr} ({value}); "
                f"remove model.{name} (it comes from hf_config)"
            )
        model[name] = value
    model["hf_config"] = data
    moe = dict(model.get("moe") or {})
    meta = _meta_model(config)
    blocks = _sparse_blocks(meta)
    if blocks:
        model["moe"] = _sparse_moe(config, blocks, moe)
        layers = sorted(i for i, _ in blocks)
        freq = layers[1] - layers[0] if len(layers) > 1 else config.num_hidden_layers
        if layers != list(range(0, config.num_hidden_layers, freq)):
            raise ValueError(
                f"model.hf_config: the sparse MoE blocks sit at decoder layers {layers}; moeflow "
                "runs MoE layers at 0, f, 2f, ... (model.moe_layer_freq): make every layer "
                "sparse (e.g. decoder_sparse_step = 1, mlp_only_layers = [])"
            )
        if model.get("moe_layer_freq", freq) != freq:
            raise ValueError(
                f"model.moe_layer_freq ({model['moe_layer_freq']}) contradicts the sparse blocks "
                f"of model.hf_config (every {freq} layer(s)); remove model.moe_layer_freq"
            )
        model["moe_layer_freq"] = freq
    else:
        from moeflow.integrations.hf import decoder_layers, dense_ffn

        layer = decoder_layers(meta)[0]
        ffn = dense_ffn(layer.mlp, config)
        fixed = {"hidden_size": ffn.w1.shape[0], "ffn_hidden_size": ffn.w2.shape[0],
                 "activation": ffn.activation, "ffn_bias": ffn.b1 is not None}  # fmt: skip
        for key, value in fixed.items():
            if key in moe and moe[key] != value:
                raise ValueError(
                    f"model.moe.{key} ({moe[key]!r}) must equal the MLP's ({value!r}) to upcycle "
                    f"it; remove model.moe.{key}"
                )
        moe.update(fixed)
        model["moe"] = moe
    return model


def _sparse_moe(config, blocks, moe: dict) -> dict:
    """`[model.moe]` of a sparse model: the blocks' own config with the user's other fields."""
    from moeflow.integrations.hf import BLOCK_FIXED, block_config

    own = block_config(blocks[0][1], config, float(config.router_aux_loss_coef)).to_dict()
    router = moe.get("router") or {}
    if not isinstance(router, dict):
        raise ValueError(f"model.moe.router must be a table of keys, got {router!r}")
    merged = {**own, **moe, "router": {**own["router"], **router}}
    for key in BLOCK_FIXED:
        theirs, mine = merged, own
        for part in key.split("."):
            theirs, mine = theirs[part], mine[part]
        if theirs != mine:
            raise ValueError(
                f"model.moe.{key} ({theirs!r}) contradicts model.hf_config's MoE blocks "
                f"({mine!r}); remove it"
            )
    return merged


@dataclasses.dataclass(frozen=True)
class HFOrigin:
    """Where an HF run's model came from (the run's start line says it): the model type, the
    weights it started from (`weights`: an `upcycle.weights` folder; None: HF's initialisation
    from the config, seeded by `seed`), and how many of its `layers` became moeflow MoE layers
    (`converted`: sparse MoE blocks converted, or dense MLPs upcycled to `num_experts` copies)."""

    model_type: str
    weights: str | None
    seed: int
    sparse: bool
    converted: int
    layers: int
    num_experts: int

    def describe(self, checkpoint: Path | None = None) -> str:
        """One clause of the start line; `checkpoint`: the one a resumed run loaded instead."""
        what = "sparse MoE blocks converted" if self.sparse else "MLPs upcycled"
        what = f"{self.converted} of {self.layers} layers' {what}"
        if not self.sparse:
            what += f" to {self.num_experts} experts each"
        start = (
            f"upcycle.weights ({self.weights!r})"
            if self.weights is not None
            else f"HF's init (train.seed {self.seed})"
        )
        if checkpoint is not None:
            start = f"checkpoint {checkpoint.name} (the run began from {start})"
        return f"Hugging Face {self.model_type}: {what}; weights: {start}"


class HFCausalLM(nn.Module):
    """An HF causal LM as the trainer sees a model: token ids `[B, S]` -> logits `[B, S, V]`.
    `activation_checkpointing` switches HF's gradient checkpointing (non-reentrant); `origin`
    (`HFOrigin`) says where it came from."""

    def __init__(self, hf: nn.Module, origin: HFOrigin | None = None) -> None:
        super().__init__()
        self.hf = hf
        self.origin = origin
        self.records_router_logits = hasattr(getattr(hf, "config", None), "output_router_logits")

    @property
    def activation_checkpointing(self) -> bool:
        return bool(getattr(self.hf, "is_activation_checkpointing", False))

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        if on:
            self.hf.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        elif self.activation_checkpointing:
            self.hf.gradient_checkpointing_disable()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # The run's balancing loss is moeflow's per-layer one (`[model.moe]`), not HF's as well.
        no_hf_aux = {"output_router_logits": False} if self.records_router_logits else {}
        return self.hf(input_ids=ids, use_cache=False, **no_hf_aux).logits


def build_hf_model(cfg, device: torch.device) -> HFCausalLM:
    """The HF model of `cfg` (a `RunConfig` whose `model.hf_config` is set) with its MoE layers,
    whole (not parallelized), on `device`: CPU memory, or the meta device (nothing allocated).
    Seeded by `train.seed` without touching the global RNG stream."""
    from moeflow.integrations.hf import convert, upcycle

    transformers = _transformers()
    config = hf_config_object(cfg.model.hf_config)
    config.use_cache = False
    weights = cfg.upcycle.weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        if device.type == "meta":
            hf = _meta_model(config)
        elif weights is not None:
            hf = _load_weights(transformers, weights, config)
        else:
            hf = transformers.AutoModelForCausalLM.from_config(config)
        hf.to(torch.float32)
        n, converted = config.num_hidden_layers, len(_sparse_blocks(hf))
        sparse = converted > 0
        if sparse:
            convert(hf, moe_config=cfg.model.moe, hf_state_dict=False)  # logical expert keys
        else:
            layers = [i for i in range(n) if cfg.model.is_moe_layer(i)]
            upcycle(hf, cfg.model.moe, layers)
            converted = len(layers)
    origin = HFOrigin(
        model_type=cfg.model.hf_config["model_type"], weights=weights, seed=cfg.train.seed,
        sparse=sparse, converted=converted, layers=n, num_experts=cfg.model.moe.num_experts,
    )  # fmt: skip
    return HFCausalLM(hf, origin)


def _load_weights(transformers, folder: str, config) -> nn.Module:
    try:
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, config=config, output_loading_info=True, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
            raise ValueError(
                f"upcycle.weights ({folder!r}) holds pickled objects besides tensors, which "
                "moeflow does not unpickle (that can run any code); save the model again with "
                "save_pretrained(..., safe_serialization=True) where you trust it"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"upcycle.weights ({folder!r}) could not be loaded: {first}; point it at a "
            "save_pretrained folder of the model"
        ) from None
    missing = [*info.get("missing_keys", ()), *info.get("mismatched_keys", ())]
    if missing:
        raise ValueError(
            f"upcycle.weights ({folder!r}) does not hold every weight of model.hf_config "
            f"(missing or mismatched: {sorted(map(str, missing))[:5]}); point it at a "
            "save_pretrained folder of the same model"
        )
    return hf
