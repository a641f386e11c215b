"""What a `moeflow train` run did: `TrainResult`, the unigram baseline, the start line and the
closing summary.

Example:
    >>> from moeflow.moe.config import MoEConfig
    >>> from moeflow.moe.layer import MoELayer
    >>> layer = MoELayer(MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=8))
    >>> parameter_counts(layer)  # (held by this rank, the whole model's): all here
    (400, 400)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from moeflow.data.source import Corpus
from moeflow.moe.walk import expert_parameters
from moeflow.parallel.fsdp import local_tensor
from moeflow.train.throughput import rate_text


@dataclass
class TrainResult:
    """What a run did. `losses[i]`: the mean training loss (over micro-batches and ranks) of the
    `log_every` steps up to `loss_steps[i]`."""

    out_dir: Path
    first_step: int
    last_step: int
    losses: list[float] = field(default_factory=list)
    loss_steps: list[int] = field(default_factory=list)
    val_loss: float | None = None
    val_bpb: float | None = None
    unigram_bpb: float | None = None
    unigram_loss: float | None = None  # nats per token
    checkpoint: Path | None = None
    metrics_path: Path | None = None
    plot_path: Path | None = None
    stopped_by_signal: bool = False
    # "SIGTERM" or "SIGINT" where this rank was asked to stop (checkpointed and stopped early)
    stop_signal: str | None = None
    # this run's throughput (`Throughput.run`: tokens/s for the job and per rank, MFU, train_s)
    throughput: dict | None = None
    world_size: int = 1


def describe_validation(record: dict) -> str:
    """A `val` record as a line: the mixture's loss, then each source's."""

    def one(r: dict) -> str:
        bpb = r.get("val_bpb")
        return f"{r['val_loss']:.4f} nats/token" + (
            f", {bpb:.3f} bits/byte" if bpb is not None else ""
        )

    per = record.get("sources") or {}
    tail = "".join(f"; {name} {one(r)}" for name, r in per.items())
    return f"step {record['step']}: validation {one(record)}{tail}"


def summary_lines(result: TrainResult) -> str:
    """The end-of-run summary: validation against the unigram baseline, where things went."""
    lines = []
    if result.val_bpb is not None:
        verdict = "below" if result.val_bpb < (result.unigram_bpb or math.inf) else "NOT below"
        lines.append(
            f"validation {result.val_bpb:.3f} bits/byte vs unigram baseline "
            f"{result.unigram_bpb:.3f} ({verdict} the baseline)"
        )
    elif result.val_loss is not None:  # ids whose bytes of text are not known
        verdict = "below" if result.val_loss < (result.unigram_loss or math.inf) else "NOT below"
        lines.append(
            f"validation loss {result.val_loss:.4f} nats/token (perplexity "
            f"{math.exp(min(result.val_loss, 700)):.1f}) vs unigram baseline "
            f"{result.unigram_loss:.4f} ({verdict} the baseline; bits per byte need the bytes of "
            "text per token: prepare the data with `moeflow data prepare`)"
        )
    if result.throughput is not None and result.last_step > result.first_step:
        steps = result.last_step - result.first_step
        lines.append(
            f"throughput: {rate_text(result.throughput, result.world_size)} over {steps} "
            f"step(s), {result.throughput['train_s']:.2f} s of training"
        )
    lines.append(f"checkpoint: {result.checkpoint}")
    lines.append(f"metrics:    {result.metrics_path}")
    if result.plot_path is not None:
        lines.append(f"plot:       {result.plot_path}")
    return "\n".join(lines)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(this rank's, the whole model's) parameters: a rank holds its experts (its slots of each
    layer's `ExpertLayout`, F-slices included) and, sharded (FSDP), its shards of everything; the
    model counts every expert once, whole."""
    experts = expert_parameters(model)
    held = total = 0
    for name, p in model.named_parameters():
        held += local_tensor(p).numel()
        if name in experts:  # rows of this rank's slots, each 1/shards of an expert
            layout = experts[name].layer.layout
            total += p.numel() // max(p.shape[0], 1) * layout.shards * layout.num_experts
        else:
            total += p.numel()  # a DTensor's numel is the whole tensor's
    return held, total


def describe_run(
    model: nn.Module,
    dims,
    runtime,
    corpus: Corpus,
    step: int,
    steps: int,
    checkpoint: Path | None = None,
) -> str:
    """The first line a run prints: ranks and layout, the model's parameters and this rank's
    share of them (its experts, its shards), where a Hugging Face model's weights came from
    (`checkpoint`: the one resumed), data, steps."""
    held, total = parameter_counts(model)
    layout = f"dp={dims.dp}" + (f", dp_shard={dims.dp_shard}" if dims.dp_shard > 1 else "")
    if held == total:
        params = f"{total / 1e6:.2f}M parameters, all on this rank"
    else:
        why = [w for w, on in (("experts", dims.ep > 1), ("shards", dims.dp_shard > 1)) if on]
        params = (
            f"{total / 1e6:.2f}M parameters, {held / 1e6:.2f}M on this rank (its "
            f"{' and '.join(why) or 'share'})"
        )
    origin = getattr(model, "origin", None)
    source = f"; {origin.describe(checkpoint)}" if origin is not None else ""
    return (
        f"moeflow train: {runtime.world_size} rank(s) ({layout}, ep={dims.ep}) on "
        f"{runtime.device.type}; {params}{source}; data: {corpus.description}, "
        f"{corpus.train_tokens() / 1e6:.2f}M train / {corpus.val_tokens() / 1e6:.2f}M validation "
        "tokens; "
        f"steps {step} -> {steps}"
    )
