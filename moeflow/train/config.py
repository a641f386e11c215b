"""The run config of `moeflow train`: small dataclasses, one per component, loaded from TOML.

A TOML file has one table per section; `[model.moe]` and `[model.moe.router]` nest the MoE layer's
own config (`moe.hidden_size` defaults to `model.dim`):

    [model]                   # DecoderConfig
    dim = 128
    [model.moe]               # MoEConfig
    num_experts = 8
    [model.moe.router]        # RouterConfig
    top_k = 2
    [data]  [optim]  [train]  [parallel]  [metrics]  [checkpoint]  [placement]

Overrides from the command line use dotted keys: `--train.steps 50 --model.moe.router.top_k 1`; a
value is read as a TOML value (`3`, `1e-3`, `true`, `"text"`, `[0.9, 0.95]`), or as a plain string
if it is not one. Unknown keys raise a `ValueError` naming the closest known keys.

Example:
    >>> cfg = RunConfig.from_dict({"train": {"steps": 10}}, overrides=["--optim.lr", "1e-3"])
    >>> cfg.train.steps, cfg.optim.lr
    (10, 0.001)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeflow.data.config import DataConfig
from moeflow.models.decoder import DecoderConfig
from moeflow.moe.layout import ExpertLayout
from moeflow.parallel.tuner_config import TunerConfig
from moeflow.train.config_loader import build_dataclass, deep_copy, parse_overrides, set_dotted
from moeflow.train.nonfinite import POLICIES
from moeflow.train.parallel_config import ParallelConfig
from moeflow.train.placement_config import PlacementRunConfig
from moeflow.utils.validate import check_choice, check_int, check_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


FP32_MAX = 3.4028234663852886e38


@dataclass(kw_only=True, frozen=True)
class OptimConfig:
    """AdamW with two parameter groups: matrices (embeddings, attention, experts, router) get
    `weight_decay`; vectors (norms) do not. Learning rate: linear warmup over `warmup_steps`, then
    cosine from `lr` to `lr * min_lr_ratio` at the last step. `grad_clip` 0 disables clipping.
    `implementation`: how AdamW updates the tensors: `fused` (one kernel for all of them),
    `foreach` (one kernel per operation over all of them) or `for_loop` (per tensor); `auto` is
    `fused` on CUDA and `foreach` elsewhere. All compute the same update up to fp32 rounding."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    implementation: str = "auto"

    def __post_init__(self) -> None:
        check_choice("optim.implementation", self.implementation, OPTIM_IMPLEMENTATIONS)
        if not 0 < self.lr <= FP32_MAX:
            raise ValueError(
                f"optim.lr ({self.lr!r}) must be > 0 and at most {FP32_MAX:.3g}, the largest "
                "fp32 number (AdamW applies it in the parameters' dtype); typical values are "
                "1e-4 to 1e-2"
            )
        if not self.weight_decay >= 0:
            raise ValueError(f"optim.weight_decay ({self.weight_decay!r}) must be >= 0")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"optim.betas ({self.betas!r}) must be two numbers in [0, 1)")
        object.__setattr__(self, "betas", betas)
        check_int("optim.warmup_steps", self.warmup_steps, minimum=0)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio ({self.min_lr_ratio!r}) must be in [0, 1]")
        if not self.grad_clip >= 0:
            raise ValueError(f"optim.grad_clip ({self.grad_clip!r}) must be >= 0 (0: off)")


AUTOCAST = ("auto", "none", "bf16", "fp16")
OPTIM_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")
PARAM_DTYPES = ("auto", "fp32", "bf16")


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """The loop. Each optimizer step sees `micro_batch_size * grad_accum_steps` sequences of
    `seq_len` tokens per rank. `autocast`: `auto` is bf16 on GPU and off on CPU.
    `activation_checkpointing`: recompute each block in backward instead of keeping its
    activations (`true`), or `"selective"`: recompute it but keep what its MoE layer received
    and sent back, so the recomputation repeats no all-to-all (a Hugging Face model checkpoints
    fully either way). Validation runs
    every `eval_every` steps (0: only at the end) on `eval_windows` fixed windows, split over the
    ranks, so its value does not depend on the world size. `on_nonfinite`: what a NaN or
    infinite loss or gradient norm does (`moeflow.train.nonfinite`): `stop` (exit non-zero before
    the update, naming the step) or `skip` (drop the update and count it; `max_nonfinite_skips`
    in a row stop the run). `loss_chunk_tokens`: the loss computes the logits of this many tokens
    at a time and never holds all of them (`moeflow.train.loss`; 0: all at once); a micro-batch of
    no more tokens than that takes the plain loss. `param_dtype`: the dtype the forward and
    backward compute in from the fp32 master weights (`bf16`: FSDP's mixed precision, fp32
    master weights, optimizer state and gradient reduction; the model is sharded, see
    `parallel.dp_shard`); `auto` is bf16 on GPUs that have it and fp32 elsewhere. `compile`:
    compile each transformer block with `torch.compile` (`moeflow.parallel.compile`)."""

    steps: int = 300
    seed: int = 0
    seq_len: int = 128
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    autocast: str = "auto"
    activation_checkpointing: bool | str = False
    eval_every: int = 100
    eval_windows: int = 64
    out_dir: str = "runs/default"
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
    loss_chunk_tokens: int = 4096
    param_dtype: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        check_choice("train.param_dtype", self.param_dtype, PARAM_DTYPES)
        if not isinstance(self.compile, bool):
            raise ValueError(f"train.compile ({self.compile!r}) must be true or false")
        if self.activation_checkpointing not in (False, True, "selective"):
            raise ValueError(
                f"train.activation_checkpointing ({self.activation_checkpointing!r}) must be "
                'false, true (every block recomputed in backward) or "selective" (recomputed, '
                "keeping the MoE layers' all-to-all results)"
            )
        check_choice("train.on_nonfinite", self.on_nonfinite, POLICIES)
        check_int("train.loss_chunk_tokens", self.loss_chunk_tokens, minimum=0)
        check_int("train.max_nonfinite_skips", self.max_nonfinite_skips)
        for name in ("steps", "seq_len", "micro_batch_size", "grad_accum_steps", "eval_windows"):
            check_int(f"train.{name}", getattr(self, name))
        check_int("train.seed", self.seed, minimum=0)
        check_int("train.eval_every", self.eval_every, minimum=0)
        check_choice("train.autocast", self.autocast, AUTOCAST)
        if not self.out_dir:
            raise ValueError("train.out_dir must be a non-empty path")
        check_path("train.out_dir", self.out_dir)

    def param_dtype_for(self, device: torch.device) -> str:
        """`param_dtype` with `auto` resolved for `device`; bf16 where the device has none is
        refused, naming the fix."""
        if self.param_dtype == "auto":
            return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if (
            self.param_dtype == "bf16"
            and device.type == "cuda"
            and not torch.cuda.is_bf16_supported()
        ):
            raise ValueError(
                f'train.param_dtype = "bf16": this GPU ({torch.cuda.get_device_name(device)}) '
                'has no bf16; set train.param_dtype = "fp32" (and train.autocast = "fp16")'
            )
        return self.param_dtype


@dataclass(kw_only=True, frozen=True)
class MetricsConfig:
    """Logging: a JSONL line every `log_every` steps (always), a progress bar on rank 0, Weights &
    Biases if `wandb` (offline unless `wandb_mode = "online"`), and `plot` a PNG at the end. MFU
    divides the model's FLOP/s per rank by `peak_flops` (FLOP/s per device; 0: the device's dense
    peak where moeflow knows it, `moeflow.train.throughput`, else no MFU)."""

    log_every: int = 10
    progress: bool = True
    wandb: bool = False
    wandb_project: str = "moeflow"
    wandb_mode: str = "offline"
    plot: bool = True
    peak_flops: float = 0.0

    def __post_init__(self) -> None:
        check_int("metrics.log_every", self.log_every)
        check_choice("metrics.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))
        if not self.peak_flops >= 0:
            raise ValueError(f"metrics.peak_flops ({self.peak_flops!r}) must be >= 0")


@dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    """A checkpoint every `every` steps (0: only at the end and on SIGTERM); the newest `keep`
    complete ones are kept (0: all)."""

    every: int = 0
    keep: int = 2

    def __post_init__(self) -> None:
        check_int("checkpoint.every", self.every, minimum=0)
        check_int("checkpoint.keep", self.keep, minimum=0)


@dataclass(kw_only=True, frozen=True)
class UpcycleConfig:
    """`[upcycle]` of a Hugging Face run: `weights`, a `save_pretrained` folder whose weights start
    the run (its config.json is `model.hf_config` when that is not set). See
    `moeflow.integrations.hf_run`."""

    weights: str | None = None

    def __post_init__(self) -> None:
        if self.weights is not None:
            check_path("upcycle.weights", self.weights)
        if self.weights is not None and not (Path(self.weights) / "config.json").is_file():
            raise ValueError(
                f"upcycle.weights ({self.weights!r}) is not a folder written by save_pretrained "
                "(no config.json in it)"
            )


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    model: DecoderConfig = field(default_factory=DecoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    placement: PlacementRunConfig = field(default_factory=PlacementRunConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) must be <= model.max_seq_len "
                f"({self.model.max_seq_len})"
            )
        replicas, ep = self.placement.replica_slots, self.parallel.ep
        if replicas and ep == 1:
            raise ValueError(
                f"placement.replica_slots ({replicas}) needs parallel.ep > 1: with one "
                "expert-parallel rank every expert is already local"
            )
        # The expert layout over parallel.ep (sizes and replicas), checked before any work.
        moe = self.model.moe
        ExpertLayout.canonical(moe.num_experts, moe.ffn_hidden_size, ep, replicas)
        d = self.data
        if d.kind == "tokens" and d.token_dtype == "uint16" and self.model.vocab_size > 65536:
            raise ValueError(
                f"model.vocab_size ({self.model.vocab_size}) does not fit uint16 token files "
                '(ids < 65,536); write them as uint32 and set data.token_dtype = "uint32"'
            )
        if d.kind in ("stdlib", "text") and self.model.vocab_size < 256:
            raise ValueError(
                f"model.vocab_size ({self.model.vocab_size}) must be >= 256 for byte tokens "
                f"(data.kind = {self.data.kind!r})"
            )
        if d.document_mask and self.model.hf_config is not None:
            raise ValueError(
                "data.document_mask masks the attention of moeflow's decoder; a [model] "
                "hf_config model attends across documents: leave data.document_mask unset"
            )

    @classmethod
    def from_dict(cls, data: dict, overrides: list[str] | None = None) -> RunConfig:
        data = deep_copy(data)
        for key, value in parse_overrides(overrides or []):
            set_dotted(data, key, value)
        model = data.setdefault("model", {})
        upcycle = data.get("upcycle")
        hf = isinstance(model, dict) and model.get("hf_config") is not None
        weights = isinstance(upcycle, dict) and upcycle.get("weights") is not None
        if isinstance(model, dict) and (hf or weights):
            from moeflow.integrations.hf_run import resolve_model_section

            build_dataclass(UpcycleConfig, upcycle or {}, "upcycle.", cls)  # its checks first
            model = data["model"] = resolve_model_section(model, upcycle or {})
        if isinstance(model, dict):
            moe = model.setdefault("moe", {})
            if isinstance(moe, dict) and "hidden_size" not in moe:
                # moe.hidden_size comes from model.dim: a bad dim is named as itself.
                check_int("model.dim", model.get("dim", DecoderConfig.dim))
            if isinstance(moe, dict):
                moe.setdefault("hidden_size", model.get("dim", DecoderConfig.dim))
                moe.setdefault("num_experts", 8)
                moe.setdefault("ffn_hidden_size", 2 * moe["hidden_size"])
        return build_dataclass(cls, data, "")

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
        check_path("the config file", str(path))
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config file {str(path)!r} is a directory; pass a .toml file")
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        raw = path.read_bytes()
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:  # TOML is UTF-8: say where the first other byte is
            line = raw.count(b"\n", 0, exc.start) + 1
            column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise ValueError(
                f"config file {str(path)!r} is not UTF-8: byte 0x{raw[exc.start]:02x} at line "
                f"{line}, column {column}; TOML files are UTF-8: save it as UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        return cls.from_dict(data, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, sections: tuple[str, ...] = ("model",)) -> str:
        """A hash of `sections`; fields added since checkpoints were first written count only
        when set, so a checkpoint of an older release still resumes."""
        data = {s: self.to_dict()[s] for s in sections}
        for path, default in LATER_FIELDS:
            *parents, leaf = path
            node = data
            for key in parents:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict) and node.get(leaf, default) == default:
                node.pop(leaf, None)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Fields added to the model config after the first checkpoints, with the default that means "not
# used": left out of the fingerprint at that default.
LATER_FIELDS = (
    (("model", "hf_config"), None),
    (("model", "moe", "shared_expert_ffn_hidden_size"), 0),
    (("model", "moe", "shared_expert_gate"), False),
    (("model", "moe", "ffn_bias"), False),
    (("model", "moe", "router", "softmax_dtype"), None),
    (("model", "moe", "a2a_dim"), None),
    (("model", "moe", "expert_kernel"), "auto"),
    (("model", "n_kv_heads"), None),
    (("model", "head_dim"), None),
    (("model", "first_k_dense"), 0),
    (("model", "moe", "router", "n_group"), 1),
    (("model", "moe", "router", "topk_group"), 1),
    (("model", "moe", "router", "routed_scaling_factor"), 1.0),
)
