"""Building a run: the output directory's checks and the parallel model, for the trainer and the
dry run alike.

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
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from moeflow.models.decoder import MoEDecoder
from moeflow.moe.layout import ExpertLayout
from moeflow.parallel import DispatchConfig
from moeflow.parallel.dims import ParallelContext
from moeflow.parallel.fsdp import shard_model
from moeflow.parallel.parallelize import parallelize
from moeflow.parallel.replace import current_expert_slots
from moeflow.train import checkpoint as ckpt
from moeflow.train.ckpt_integrity import verify_checkpoint
from moeflow.train.compile import compile_blocks
from moeflow.train.config import RunConfig
from moeflow.train.data import Corpus, check_tokens, check_validation_split
from moeflow.train.resume_config import GivenModel, resumed_config
from moeflow.train.run_lock import LOCK_NAME, RunDirectoryBusyError, RunLock
from moeflow.utils.paths import cannot_write

logger = logging.getLogger(__name__)
T = TypeVar("T")


def agree(ctx: ParallelContext, check) -> None:
    """Run `check()` (returns an error message or None) on rank 0 and raise the same `ValueError`
    on every rank, so a bad output directory stops all ranks before any work."""
    message = [check() if ctx.rank == 0 else None]
    dist.broadcast_object_list(message, src=0, group=ctx.world_group)
    if message[0]:
        raise ValueError(message[0])


def lock_output(cfg: RunConfig, ctx: ParallelContext) -> RunLock | None:
    """Create `train.out_dir` and take its run lock on rank 0 (`moeflow.train.run_lock`) before
    anything in it is read or cleared; every rank raises the same error if it is not writable or
    another run holds it. Returns rank 0's lock (None on the other ranks): release it when the run
    ends."""
    out = Path(cfg.train.out_dir)
    agree(ctx, lambda: writable_dir(out))
    held: list[RunLock] = []

    def take() -> str | None:
        try:
            held.append(RunLock.acquire(out))
        except RunDirectoryBusyError as exc:
            return str(exc)
        return None

    try:
        agree(ctx, take)
    except ValueError as exc:
        raise RunDirectoryBusyError(str(exc)) from None
    return held[0] if held else None


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


def check_steps_left(checkpoint: Path, step: int, steps: int) -> None:
    """A resumed checkpoint past `train.steps` has nothing left to train (at it: a finished run,
    validated again)."""
    if step > steps:
        raise ValueError(
            f"--resume: checkpoint {str(checkpoint)!r} is at step {step}, past train.steps "
            f"({steps}): nothing left to train; pass a larger --train.steps"
        )


def release_output(lock: RunLock | None, out_dir: Path, remove_if_unused: bool) -> None:
    """Give up `out_dir`'s lock; with `remove_if_unused` (rank 0 of a run that stopped on bad
    input before writing anything) also remove the `out_dir` it created, if it is still empty."""
    if lock is not None:
        lock.release()
    if remove_if_unused:
        with contextlib.suppress(OSError):  # not empty: something was written, keep it
            (out_dir / LOCK_NAME).unlink(missing_ok=True)
            out_dir.rmdir()


def resolve_output(
    cfg: RunConfig,
    ctx: ParallelContext,
    resume: str | None,
    overwrite: bool,
    given: GivenModel | None = None,
) -> tuple[Path | None, RunConfig, str]:
    """Check `train.out_dir` on rank 0 before any work (every rank raises the same error): a
    fresh run needs an empty one (or `overwrite`, which clears the old run's checkpoints and
    metrics), a resumed one a complete checkpoint. Returns the checkpoint to resume from (or
    None), the config to run (a resume's `[model]` is the checkpoint's, changed only as `given`
    allows: `moeflow.train.resume_config`) and its note. Take the directory's lock first."""
    out = Path(cfg.train.out_dir)
    root = out / "checkpoints"
    if resume is not None and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one of them")
    agree(ctx, lambda: writable_dir(out))
    if resume is None:

        def check_fresh() -> str | None:
            existing = ckpt.list_checkpoints(root)
            metrics = out / "metrics.jsonl"
            if not existing and not metrics.exists():
                return None
            if not overwrite:
                what = f"{len(existing)} checkpoint(s)" if existing else "a metrics.jsonl"
                return (
                    f"train.out_dir ({str(out)!r}) already holds {what} of another run; pass "
                    "--resume to continue it, --overwrite to replace it, or choose another "
                    "--train.out_dir"
                )
            shutil.rmtree(root, ignore_errors=True)
            for name in ("metrics.jsonl", "training.png"):
                (out / name).unlink(missing_ok=True)
            return None

        agree(ctx, check_fresh)
        return None, cfg, ""
    skipped: list[str] = []
    path = newest_intact(root, ctx, skipped) if resume == "latest" else Path(resume)

    def check_resume() -> tuple[RunConfig, str]:
        if path is None and skipped:
            raise ValueError(
                f"--resume: no intact checkpoint under {str(root)!r} ({len(skipped)} damaged: "
                f"{skipped[0]}); restore one from a copy, or pass --overwrite instead of --resume "
                "to start afresh (it deletes them)"
            )
        if path is None:
            raise ValueError(
                f"--resume: no checkpoint under {str(root)!r}; run without --resume to start"
            )
        try:
            meta = ckpt.read_meta(path)
        except ckpt.CheckpointError as exc:
            raise ValueError(f"--resume: {exc}") from None
        return resumed_config(cfg, meta, path, given)

    resumed, note = decided(ctx, check_resume)
    return path, resumed, note


def decided(ctx: ParallelContext, decide: Callable[[], T]) -> T:
    """`decide()` on rank 0, its value (or the `ValueError` it raised) on every rank."""
    box: list = [None, None]
    if ctx.rank == 0:
        try:
            box[1] = decide()
        except ValueError as exc:
            box[0] = str(exc)
    dist.broadcast_object_list(box, src=0, group=ctx.world_group)
    if box[0] is not None:
        raise ValueError(box[0])
    return box[1]


def writable_dir(out: Path) -> str | None:
    """Why `train.out_dir` cannot hold a run (it is a file, cannot be created, or is not
    writable: a probe file is created and removed), or None; it is created if missing."""
    where = f"train.out_dir ({str(out)!r})"
    if out.exists() and not out.is_dir():
        return f"{where} is a file, not a directory; choose another train.out_dir"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{where} cannot be created: {exc.strerror or exc} ({exc.filename}); choose another"
    problem = cannot_write(out)
    if problem is not None:
        return f"{where} is not writable: {problem}; choose a writable train.out_dir"
    return None


def newest_intact(root: Path, ctx: ParallelContext, skipped: list[str]) -> Path | None:
    """`--resume` with no path: the newest checkpoint whose files all match their manifest
    (`verify_checkpoint`, the files split over the ranks); each damaged newer one is appended to
    `skipped` and named in a warning. Collective over the world group."""
    found = [[str(p) for p in reversed(ckpt.list_checkpoints(root))]]
    dist.broadcast_object_list(found, src=0, group=ctx.world_group)  # one list for every rank
    for candidate in map(Path, found[0]):
        try:
            problem = verify_checkpoint(
                candidate, ckpt.read_meta(candidate).get("files"), ctx.world_group
            )
        except ckpt.CheckpointError as exc:
            problem = str(exc)
        if problem is None:
            return candidate
        skipped.append(f"{candidate.name}: {problem}")
        if ctx.rank == 0:
            logger.warning("--resume: skipping the damaged checkpoint %s (%s)", candidate, problem)
    return None


def check_data(cfg: RunConfig, ctx: ParallelContext, corpus: Corpus, train_offset: int) -> None:
    """Before the first step, on every rank (collective): one validation window at least, and,
    for token files, every id below `model.vocab_size`; each rank scans its own training shard
    (starting at `train_offset`) and a slice of the validation tokens, and every rank raises the
    first problem found."""
    rank, world = ctx.rank, dist.get_world_size(ctx.world_group)
    problem = None
    try:
        check_validation_split(corpus.val, cfg.train.seq_len)
        if corpus.bytes_per_token is None:  # ids from files, not bytes
            vocab, shard = cfg.model.vocab_size, len(corpus.train) // world
            mine = corpus.train[train_offset : train_offset + shard]
            check_tokens(mine, vocab, "train.bin", offset=train_offset)
            step = -(-len(corpus.val) // world)
            part = corpus.val[rank * step : (rank + 1) * step]
            check_tokens(part, vocab, "val.bin", offset=rank * step)
    except ValueError as exc:
        problem = str(exc)
    problems: list = [None] * world
    dist.all_gather_object(problems, problem, group=ctx.world_group)
    first = next((p for p in problems if p), None)
    if first:
        raise ValueError(first)


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
    materialise and initialise: a large model is never whole on one rank. With `dp_shard` > 1
    or bf16 `param_dtype`, shard it (FSDP2, `moeflow.parallel.fsdp`): initialised whole on this
    rank first (its experts only), so the values do not depend on the sharding. `param_dtype`:
    `train.param_dtype` resolved (default: for `device`; the dry run plans for another). A
    Hugging Face model (`model.hf_config`) is an `HFCausalLM` (`moeflow.integrations.hf_run`).
    `dtype`: the parameters' dtype after initialisation (default: as built, fp32)."""
    if cfg.model.hf_config is not None:
        from moeflow.integrations.hf_run import build_hf_model

        # Built whole on every rank with train.seed (same weights everywhere), then parallelize
        # keeps this rank's experts.
        model = build_hf_model(cfg, torch.device("meta" if device.type == "meta" else "cpu"))
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
    replicas = cfg.placement.replica_slots  # validated against parallel.ep by RunConfig
    parallelize(model, ctx, dispatch, expert_slots=expert_slots, replica_slots=replicas)
    check_fits(model, device)
    if isinstance(model, MoEDecoder) and device.type != "meta":
        model.to_empty(device=device)
        model.init_weights(seed=cfg.train.seed)
    elif device.type != "meta":
        model.to(device)
    if dtype is not None:
        model.to(dtype)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile and device.type != "meta":
        compile_blocks(model)  # before sharding, as torchtitan orders them
    param_dtype = param_dtype or cfg.train.param_dtype_for(device)
    if ctx.dims.dp_shard > 1 or param_dtype != "fp32":  # bf16 compute copies are FSDP's
        shard_model(model, ctx, param_dtype)
    return model


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
