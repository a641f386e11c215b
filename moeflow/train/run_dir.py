"""The output directory of a run, checked on rank 0 before any work and agreed by every rank:
taken (its lock, `moeflow.train.run_lock`), resolved (a fresh run needs it empty or
`--overwrite`; `--resume` the newest intact checkpoint in it, or the one named) and given up.

Every function here that takes a `ParallelContext` is collective over its world group: rank 0
decides and every rank raises the same `ValueError`, so a bad directory stops all ranks before
any work instead of leaving some waiting in a collective.

Example (one process; `out_dir` a fresh directory):
    >>> import tempfile
    >>> from moeflow.parallel import ParallelDims
    >>> from moeflow.train.config import RunConfig
    >>> from moeflow.train.distributed import init_distributed, shutdown
    >>> runtime = init_distributed(60.0)
    >>> ctx = ParallelDims().build()
    >>> out = Path(tempfile.mkdtemp()) / "run"
    >>> cfg = RunConfig.from_dict({"train": {"out_dir": str(out)}})
    >>> lock = lock_output(cfg, ctx)
    >>> resolve_output(cfg, ctx, resume=None, overwrite=False)[0] is None  # a fresh run
    True
    >>> release_output(lock, out, remove_if_unused=True)
    >>> out.exists()  # nothing was written: the directory it created is gone
    False
    >>> shutdown(runtime)
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from moeflow.parallel.dims import ParallelContext
from moeflow.train import checkpoint as ckpt
from moeflow.train.ckpt_integrity import verify_checkpoint
from moeflow.train.config import RunConfig
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
