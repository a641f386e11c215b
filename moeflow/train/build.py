"""Building a run: the model, asked of `moeflow.parallel.prepare` ready to train, its memory and
data checks, and what a checkpoint records of the run, for the trainer and the dry run alike. The
output directory's checks are `moeflow.train.run_dir`'s.

Example (one process, the meta device: nothing is allocated):
    >>> from moeflow.parallel import ParallelDims
    >>> from moeflow.train.distributed import init_distributed, shutdown
    >>> runtime = init_distributed(60.0)
    >>> cfg = RunConfig.from_dict({"model": {"dim": 32, "n_layers": 1, "n_heads": 2,
    ...                                      "moe": {"num_experts": 2}}})
    >>> model = build_model(cfg, ParallelDims().build(), torch.device("meta"))
    >>> model.blocks[0].ffn.layout.local_experts(0)
    [0, 1]
    >>> shutdown(runtime)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from moeflow.data.config import DataConfig
from moeflow.data.manifest import read_manifest
from moeflow.models.decoder import MoEDecoder
from moeflow.moe.layout import ExpertLayout
from moeflow.parallel import DispatchConfig
from moeflow.parallel.dims import ParallelContext
from moeflow.parallel.prepare import prepare_model
from moeflow.parallel.replace import current_expert_slots
from moeflow.train import checkpoint as ckpt
from moeflow.train.config import RunConfig
from moeflow.train.resume_config import GivenModel


def checkpoint_meta(
    cfg: RunConfig,
    dims,
    world_size: int,
    step: int,
    optimizer,
    model,
    tuner,
    given: GivenModel | None = None,
) -> dict:
    """What a checkpoint's `moeflow.json` records beside the tensors: the config and its model
    fingerprint, the layout, the schedule position, the expert placement, the tuner's decisions
    so far (a resumed run carries on with them), and the `[model]` the user wrote (`given`: a
    resume tells from it what the user changed since, `moeflow.train.resume_config`)."""
    meta = {
        "config": cfg.to_dict(),
        "model_fingerprint": cfg.fingerprint(),
        "world_size": world_size,
        "parallel": layout_record(dims),
        "optimizer_steps": step,
        "lr": optimizer.param_groups[0]["lr"],
        "expert_slots": current_expert_slots(model),
    }
    if tuner is not None:
        meta["tuner"] = tuner.state_dict()
    if given is not None:
        meta["given"] = given.record()
    return meta


def layout_record(dims) -> dict:
    """The parallel layout a checkpoint records (a resumed run on the same one keeps the tuner's
    decisions)."""
    return {"dp": dims.dp, "ep": dims.ep, "dp_shard": dims.dp_shard}


def take_special_ids(config, data: DataConfig) -> None:
    """A Hugging Face model trained on prepared data takes its tokenizer's special ids (end of
    document as `eos_token_id`, and `bos`/`pad` where the tokenizer has them) from the manifest,
    so the config it is saved with names the ids it was trained on."""
    if data.kind != "prepared":
        return
    tok = read_manifest(data.source_list()[0].path).tokenizer
    for key, value in (("eos_token_id", tok.eod_id), ("bos_token_id", tok.bos_id),
                       ("pad_token_id", tok.pad_id)):  # fmt: skip
        if value is not None:
            setattr(config, key, value)


# The config field that sizes a tensor the user may not think of as a weight.
SIZED_BY = {"rope_cos": "model.max_seq_len", "rope_sin": "model.max_seq_len"}


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on `device` (the machine's RAM for the CPU), None where unknown (a GPU
    this machine does not have: a dry run plans for one)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def startup_bytes(model: nn.Module) -> int:
    """What this rank materialises before sharding: its parameters and buffers whole (every
    dense weight, its own experts), as `build_model` initialises them (for a sharded model on
    the meta device, the unsharded sizes)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_fits(model: nn.Module, device: torch.device, total: float | None = None) -> None:
    """Before anything is allocated (the model is still on the meta device): refuse a model whose
    parameters and buffers on this rank alone exceed the device's memory (`total` bytes, default
    `device`'s own), naming the largest tensor and the setting that sizes it."""
    total = device_memory(device) if total is None else total
    tensors = [*model.named_parameters(), *model.named_buffers()]
    if total is None or not tensors:
        return
    need = startup_bytes(model)
    if need <= total:
        return
    name, largest = max(tensors, key=lambda item: item[1].numel() * item[1].element_size())
    field = SIZED_BY.get(name.rsplit(".", 1)[-1], "the model's shape ([model])")
    raise ValueError(
        f"the model needs {need / 2**30:,.1f} GiB on this rank before any activation, more than "
        f"this {device.type} device's {total / 2**30:,.1f} GiB; the largest tensor is {name} "
        f"{tuple(largest.shape)}, sized by {field}: lower it"
    )


def build_model(
    cfg: RunConfig,
    ctx: ParallelContext,
    device: torch.device,
    expert_slots: dict[str, list[int]] | None = None,
    dtype: torch.dtype | None = None,
    param_dtype: str | None = None,
) -> nn.Module:
    """Build on the meta device, keep only this rank's experts (placed by `expert_slots`,
    default contiguous blocks plus `placement.replica_slots` replicas per shard group), then
    materialise and initialise: a large model is never whole on one rank. With `train.compile`,
    compile its blocks; with `dp_shard` > 1 or bf16 `param_dtype`, shard it (FSDP2): initialised
    whole on this rank first (its experts only), so the values do not depend on the sharding.
    `moeflow.parallel.prepare_model` orders these steps. `param_dtype`:
    `train.param_dtype` resolved (default: for `device`; the dry run plans for another). A
    Hugging Face model (`model.hf_config`) is an `HFCausalLM` (`moeflow.integrations.hf_run`).
    `dtype`: the parameters' dtype after initialisation (default: as built, fp32)."""
    if cfg.model.hf_config is not None:
        from moeflow.integrations.hf_run import build_hf_model

        # Built whole on every rank with train.seed (same weights everywhere), then parallelize
        # keeps this rank's experts.
        model = build_hf_model(cfg, torch.device("meta" if device.type == "meta" else "cpu"))
        take_special_ids(model.hf.config, cfg.data)
    else:
        with torch.device("meta"):
            model = MoEDecoder(cfg.model)
    p = cfg.parallel
    dispatch = DispatchConfig(  # "auto": the tuner's reference candidate until it decides
        mode="ep" if p.mode == "auto" else p.mode,
        overlap_degree=1 if p.overlap_degree == "auto" else p.overlap_degree,
        two_level=p.two_level is True,
        ranks_per_node=p.ranks_per_node,
    )
    return prepare_model(
        model,
        ctx,
        dispatch,
        _materialiser(cfg, device, dtype),
        expert_slots=expert_slots,
        replica_slots=cfg.placement.replica_slots,  # validated against parallel.ep by RunConfig
        compile=cfg.train.compile and device.type != "meta",
        param_dtype=param_dtype or cfg.train.param_dtype_for(device),
    )


def _materialiser(
    cfg: RunConfig, device: torch.device, dtype: torch.dtype | None
) -> Callable[[nn.Module], None]:
    """`build_model`'s step between parallelizing and compiling (`prepare_model`): refuse a rank's
    part that cannot fit `device` (`check_fits`), allocate and initialise it there (the decoder
    from `train.seed`; nothing on the meta device), cast it to `dtype` and switch activation
    checkpointing as `train.activation_checkpointing` says."""

    def materialise(model: nn.Module) -> None:
        check_fits(model, device)
        if isinstance(model, MoEDecoder) and device.type != "meta":
            model.to_empty(device=device)
            model.init_weights(seed=cfg.train.seed)
        elif device.type != "meta":
            model.to(device)
        if dtype is not None:
            model.to(dtype)
        model.activation_checkpointing = cfg.train.activation_checkpointing

    return materialise


def saved_slots(
    cfg: RunConfig, ctx: ParallelContext, resume_path: Path | None
) -> dict[str, list[int]] | None:
    """The expert placement a resumed checkpoint ran with (same `ep` and slot count only):
    resuming keeps a re-placed run's placement. Values load by logical id whatever the
    placement."""
    if resume_path is None:
        return None
    meta = ckpt.read_meta(resume_path)
    slots = meta.get("expert_slots")
    if meta.get("parallel", {}).get("ep") != ctx.dims.ep or not isinstance(slots, dict):
        return None
    m = cfg.model.moe
    layout = ExpertLayout.canonical(
        m.num_experts, m.ffn_hidden_size, ctx.dims.ep, cfg.placement.replica_slots
    )
    if any(not isinstance(v, list) or len(v) != len(layout.slots) for v in slots.values()):
        return None
    return slots
