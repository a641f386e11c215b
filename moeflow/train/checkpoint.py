"""Sharded, atomic, resharding checkpoints with `torch.distributed.checkpoint` (DCP).

Layout of `<out_dir>/checkpoints/step_00000100/`:
- DCP files (`.metadata`, `__<rank>_0.distcp`): model and AdamW moments, by name, expert weights
  one key per **logical** expert (`moeflow.train.expert_keys`), so each rank saves and loads only
  what it holds and a checkpoint reshards: written at any `ep`, `dp_shard` or placement, loaded at
  any other. Dense weights are saved once (DCP dedups replicas; a sharded run's are DTensors).
- `moeflow.json`: step, config, world layout, learning rate; written last, by rank 0.
- `rank_<r>.json`: that rank's data position and RNG states (base64).

Save schedule (every rank calls `save_checkpoint`; each "agree" is one `all_gather_object` that
also carries every rank's error, so a failure on one rank stops all of them with the same line):
1. every rank checks its tensors are finite; agree (`NonFiniteError`: nothing is written).
2. rank 0 empties `.step_<n>.partial/`; agree.
3. DCP save into it (collective; rank 0 writes `.metadata` after every rank's data is written);
   every rank writes its `rank_<r>.json` and digests the files it wrote (size, SHA-256); agree.
4. rank 0 writes `moeflow.json` with the manifest of every file's digest, then renames the
   directory to `step_<n>` (atomic on POSIX; an existing `step_<n>` is moved aside first and
   removed after), and prunes old checkpoints; agree. A crash at any point leaves either the old
   complete checkpoint or a `.partial` directory, which `latest_checkpoint` ignores; a failed
   save removes its `.partial` directory. `out_dir` must be one shared filesystem.

Loading reads the metadata with `SafeFileSystemReader` (no pickled code runs, paths confined to the
directory, every file checked against the manifest before use: `moeflow.train.ckpt_integrity`) and
everything else from JSON.

Example:
    >>> latest_checkpoint("/nonexistent") is None
    True
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from moeflow.train.ckpt_integrity import (
    CorruptCheckpointError,
    digest,
    local_digests,
    verify_file,
)
from moeflow.train.expert_keys import model_state_dict, optimizer_state_dict
from moeflow.train.nonfinite import NonFiniteError, first_nonfinite
from moeflow.train.optim import step_count
from moeflow.train.safe_reader import SafeFileSystemReader, UnsafeCheckpointError

STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT_VERSION = 2  # 2: expert w1 stored as [D, c, F] (1: [D, c*F], before F-sharded experts)


class CheckpointError(ValueError):
    pass


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state()
        state["cuda"] = base64.b64encode(cuda.numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        raw = base64.b64decode(state["cuda"])
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "moeflow.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict,
    rank_state: dict,
    group: dist.ProcessGroup | None = None,
    keep: int = 0,
) -> Path:
    """Write checkpoint `step` (collective over `group`); returns its final directory. Refuses a
    state holding NaN or infinity (`NonFiniteError`); any failure (a full disk, a read-only
    directory) raises the same one-line `CheckpointError` on every rank, naming the intact
    previous checkpoint, and leaves no `.partial` directory behind."""
    root = Path(root)
    rank = dist.get_rank(group)
    final = root / f"step_{step:08d}"
    partial = root / f".step_{step:08d}.partial"
    state = {**model_state_dict(model), **optimizer_state_dict(model, optimizer)}
    bad = first_nonfinite(state)
    nonfinite = _agree([f"rank {rank}: {bad}"] if bad else [], group)
    if nonfinite:
        raise NonFiniteError(
            f"checkpoint step {step} not written: non-finite values in {'; '.join(nonfinite)}; "
            f"the newest finite checkpoint is {_previous(root)}",
            step,
        )

    def start() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()

    _step(rank == 0, start, "create", root, step, group)

    def write() -> dict:
        try:
            dcp.save(state, storage_writer=FileSystemWriter(partial), process_group=group)
        except CheckpointException as exc:  # every rank's failures: keep the first one
            raise _first_failure(exc) from None
        _write_json(partial / f"rank_{rank:05d}.json", {**rank_state, "rng": rng_state()})
        return local_digests(partial, rank)

    files = _step(True, write, "write", root, step, group, partial)

    def finish() -> None:
        manifest = {k: v for part in files for k, v in part.items()}
        manifest[".metadata"] = digest(partial / ".metadata")
        record = {**meta, "step": step, "format": FORMAT_VERSION, "files": manifest}
        _write_json(partial / "moeflow.json", record)
        trash = root / f".step_{step:08d}.old"
        if final.exists():
            os.replace(final, trash)
        os.replace(partial, final)
        if trash.exists():
            shutil.rmtree(trash)
        if keep:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old)

    _step(rank == 0, finish, "finish", root, step, group, partial)
    return final


def _agree(local: list, group) -> list:
    """Every rank's `local` list, concatenated in rank order (one `all_gather_object`): the save's
    barriers, which also carry each rank's errors, so one rank's failure never leaves the others
    waiting."""
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    return [item for part in gathered for item in part]


def _step(mine: bool, fn, what: str, root: Path, step: int, group, partial: Path | None = None):
    """Run `fn` where `mine`, then agree: the results of every rank, or the same
    `CheckpointError` everywhere (rank 0 removes `partial` first)."""
    result, error = None, None
    if mine:
        try:
            result = fn()
        except (Exception, CheckpointException) as exc:
            error = f"rank {dist.get_rank(group)}: {_describe(exc, root)}"
    outcomes = _agree([(result, error)], group)
    errors = [e for _, e in outcomes if e]
    if errors:
        if partial is not None and dist.get_rank(group) == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(
            f"checkpoint step {step} could not be written ({what}): {errors[0]}; the previous "
            f"checkpoint {_previous(root)} is intact"
        )
    return [r for r, _ in outcomes]


def _first_failure(exc: CheckpointException) -> BaseException:
    failures = sorted(exc.failures.items())
    return failures[0][1][0] if failures else exc


def _describe(exc: BaseException, root: Path) -> str:
    """One line for a failed write; a full disk says so whatever layer noticed it (an OSError,
    or torch's `unexpected pos` from a short write)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)
    if not full and "unexpected pos" in str(exc):
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(root).free < (64 << 20)
    if full:
        kept = len(list_checkpoints(root))
        hint = (
            f", or lower checkpoint.keep (the {kept} kept checkpoints take room)" if kept > 1 else
            " or point train.out_dir at a larger disk (one checkpoint needs more than is free)"
        )  # fmt: skip
        return f"no space left on device in {str(root)!r}; free space there{hint}"
    return f"{type(exc).__name__}: {text}"


def _previous(root: Path) -> str:
    found = latest_checkpoint(root)
    return repr(str(found)) if found is not None else "(none: this was the first)"


def read_meta(path: str | Path) -> dict:
    """The `moeflow.json` of a checkpoint directory; `CheckpointError` if missing or corrupt."""
    path = Path(path)
    file = path / "moeflow.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not file.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is incomplete (no moeflow.json); it was not finished"
        )
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {file} ({exc})") from None
    if isinstance(meta, dict) and meta.get("format") == 1:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by moeflow before format {FORMAT_VERSION} "
            "(expert w1 as [D, c*F]); resume it with the moeflow release that wrote it"
        )
    if isinstance(meta, dict) and not isinstance(meta.get("files", {}), dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its manifest is not a table")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "step" not in meta:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a moeflow checkpoint (format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, want {FORMAT_VERSION})"
        )
    return meta


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    group: dist.ProcessGroup | None = None,
) -> tuple[dict, dict | None]:
    """Load model (and optimizer moments) in place; returns `(meta, rank_state)`. `rank_state` is
    None when the checkpoint was written by a different world size (data positions and RNG states
    belong to the old ranks)."""
    path = Path(path)
    meta = read_meta(path)
    state = model_state_dict(model)
    if optimizer is not None:
        state.update(optimizer_state_dict(model, optimizer))
    manifest = meta.get("files")
    reader = SafeFileSystemReader(path, manifest)
    try:  # DCP would wrap this error in per-rank tracebacks; check the metadata first
        reader.read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: no .metadata") from None
    except (UnsafeCheckpointError, CorruptCheckpointError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {exc}") from None
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(path, manifest), process_group=group)
    # DCP's CheckpointException (a BaseException) gathers every rank's failure: name the first.
    except (Exception, CheckpointException) as exc:
        first = _first_failure(exc) if isinstance(exc, CheckpointException) else exc
        if isinstance(first, CorruptCheckpointError | UnsafeCheckpointError | OSError):
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {first}") from None
        text = " ".join(str(first).split())[:2000]
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be loaded into this model: "
            f"{type(first).__name__}: {text}"
        ) from exc
    if optimizer is not None:
        for group_ in optimizer.param_groups:
            for p in group_["params"]:
                optimizer.state[p]["step"] = step_count(group_, p, meta["optimizer_steps"])
    # A plain process (no process group) loads as the one rank of a world of one.
    rank, world = (
        (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    )
    rank_file = path / f"rank_{rank:05d}.json"
    if meta.get("world_size") != world or not rank_file.is_file():
        return meta, None
    try:
        verify_file(path, rank_file.name, manifest)
    except CorruptCheckpointError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {exc}") from None
    try:
        return meta, json.loads(rank_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {rank_file} ({exc})") from None
