"""The trainer's side of the runtime tuner (`moeflow.parallel.tuner`): building it from the run
config on the cost model calibrated on the run's own groups, and one line per decision.

Example:
    >>> describe_decision({"layer": "blocks.0.ffn", "choice": "dp", "tokens_per_rank": 1024,
    ...     "measured_ms": {"dp": 28.9, "ep": 32.1}, "imbalance": 1.61,
    ...     "reason": "fastest", "skipped": {}})
    'blocks.0.ffn runs dp (28.9 ms; ep 32.1 ms) at 1024 tokens/rank, load 1.61: fastest'
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moeflow.parallel.calibrate import load_or_calibrate
from moeflow.parallel.dims import ParallelContext
from moeflow.parallel.tuner import RuntimeTuner
from moeflow.parallel.tuner_replay import SAME_RUN, run_mismatch, run_of
from moeflow.train.config import RunConfig


def build_tuner(
    cfg: RunConfig, ctx: ParallelContext, model: nn.Module, out_dir: Path, device: torch.device
) -> RuntimeTuner | None:
    """The runtime tuner when `parallel.mode`, `overlap_degree` or `two_level` is "auto" (and
    there is an expert group to tune for), on the cost model calibrated on this run's groups
    (`<out_dir>/calibration.json`, measured once). Collective when it calibrates, or reads
    `tuner.replay`: a record of another seed, world size or layout, or one this run would not
    replay (it tunes nothing), is refused in one line before any work."""
    p, moe = cfg.parallel, cfg.model.moe
    replay = None if cfg.tuner.replay is None else read_replay(cfg, ctx)
    untuned = "auto" not in (p.mode, p.overlap_degree, p.two_level) or ctx.dims.ep == 1
    if untuned and replay is not None:
        why = (
            "parallel.ep is 1: there is no expert group to tune"
            if ctx.dims.ep == 1
            else 'none of parallel.mode, overlap_degree and two_level is "auto"'
        )
        raise ValueError(
            f"tuner.replay ({cfg.tuner.replay!r}): this run makes no tuner decision to replay "
            f"({why}); drop tuner.replay"
        )
    if untuned:
        return None
    dtype = compute_dtype(cfg, device)  # the GEMM rate of the dtype the experts run in
    hw, _ = load_or_calibrate(ctx, out_dir, moe.hidden_size, moe.ffn_hidden_size, dtype, device)
    return RuntimeTuner(
        model, ctx, hw, cfg.tuner,
        mode=None if p.mode == "auto" else p.mode,
        overlap=None if p.overlap_degree == "auto" else p.overlap_degree,
        two_level=None if p.two_level == "auto" else p.two_level,
        replay=replay, seed=cfg.train.seed,
    )  # fmt: skip


def read_replay(cfg: RunConfig, ctx: ParallelContext) -> dict[tuple[str, int], dict]:
    """The decisions of `tuner.replay` (read on rank 0, the same on every rank), each made in
    this run's seed, world size and layout, or a `ValueError` naming both values."""
    found = [recorded_decisions(Path(cfg.tuner.replay)) if ctx.rank == 0 else None]
    dist.broadcast_object_list(found, src=0, group=ctx.world_group)  # one reader
    if isinstance(found[0], str):
        raise ValueError(found[0])
    run = run_of(ctx, cfg.train.seed)
    for record in found[0].values():
        problem = run_mismatch(record["run"], run)
        if problem is not None:
            raise ValueError(f"tuner.replay ({cfg.tuner.replay!r}): {problem}; {SAME_RUN}")
    return found[0]


def compute_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """The dtype the run's expert GEMMs run in: bf16 parameters (`train.param_dtype`), else the
    autocast dtype (`train.autocast`, `auto`: bf16 on CUDA), else float32."""
    if cfg.train.param_dtype_for(device) == "bf16":
        return torch.bfloat16
    mode = cfg.train.autocast
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode, torch.float32)


def recorded_decisions(path: Path) -> dict[tuple[str, int], dict] | str:
    """The tuner decisions (`kind: "runtime"` records) of a run's metrics file (`path`, or
    `path/metrics.jsonl`) by (layer, step); or why there are none, as a message."""
    file = path / "metrics.jsonl" if path.is_dir() else path
    where = f"tuner.replay ({str(path)!r})"
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return f"{where} cannot be read: {getattr(exc, 'strerror', None) or exc}"
    found = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            return f"{where}: line {number} of {file.name} is not JSON; give a run's metrics.jsonl"
        if isinstance(record, dict) and record.get("kind") == "runtime":
            step, choice = record.get("step"), (record.get("mode"), record.get("overlap"))
            if (
                not isinstance(step, int)
                or not isinstance(choice[1], int)
                or "two_level" not in record
            ):
                return f"{where}: line {number} is not a tuner decision moeflow wrote"
            if not isinstance(record.get("run"), dict) or len(record.get("situation", ())) != 3:
                return (
                    f"{where}: line {number} is a tuner decision that does not say which run and "
                    "situation it was made in (written before moeflow recorded them), so a "
                    "replay could not check it; record the run again"
                )
            found[(str(record.get("layer")), step)] = record
    if not found:
        return (
            f'{where} holds no tuner decision (no record of kind "runtime"); replay a run that '
            'ran with parallel.mode, overlap_degree or two_level = "auto"'
        )
    return found


def describe_decision(record: dict) -> str:
    """One line for a `kind: "runtime"` record: what was chosen, against what, and why."""
    ms = record["measured_ms"]
    others = ", ".join(f"{k} {v:.1f}" for k, v in ms.items() if k != record["choice"])
    skipped = f"; skipped {', '.join(record['skipped'])}" if record["skipped"] else ""
    return (
        f"{record['layer']} runs {record['choice']} ({ms.get(record['choice'], 0.0):.1f} ms; "
        f"{others or 'no other'} ms) at {record['tokens_per_rank']} tokens/rank, load "
        f"{record['imbalance']:.2f}: {record['reason']}{skipped}"
    )


def tuning_summary(tuner: RuntimeTuner, loop_seconds: float) -> tuple[dict, str]:
    """The `end` record's tuning fields and the closing line about the tuner."""
    share = tuner.tuning_seconds / max(loop_seconds, 1e-9)
    fields = {"tuning_s": round(tuner.tuning_seconds, 3), "tuning_share": round(share, 4)}
    line = (
        f"tuner: {len(tuner.cache)} decisions, {tuner.tuning_seconds:.2f} s of tuning "
        f"({fields['tuning_share']:.1%} of the training loop)"
    )
    return fields, line
