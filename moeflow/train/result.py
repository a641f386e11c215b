"""What a `moeflow train` run did: `TrainResult`, the unigram baseline and the closing summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeflow.train.data import Corpus


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
    checkpoint: Path | None = None
    metrics_path: Path | None = None
    plot_path: Path | None = None
    stopped_by_signal: bool = False
    # "SIGTERM" or "SIGINT" where this rank was asked to stop (checkpointed and stopped early)
    stop_signal: str | None = None


def unigram_bpb(corpus: Corpus) -> float | None:
    """Bits per byte of the best context-free model of the validation bytes (training byte
    frequencies, add-one): the baseline a language model must beat."""
    if corpus.bytes_per_token is None:
        return None
    counts = torch.bincount(torch.from_numpy(corpus.train.astype("int64")), minlength=256)
    logp = ((counts.double() + 1) / (counts.sum() + 256)).log2()
    return -logp[torch.from_numpy(corpus.val.astype("int64"))].mean().item()


def summary_lines(result: TrainResult) -> str:
    """The end-of-run summary: validation against the unigram baseline, where things went."""
    lines = []
    if result.val_bpb is not None:
        verdict = "below" if result.val_bpb < (result.unigram_bpb or math.inf) else "NOT below"
        lines.append(
            f"validation {result.val_bpb:.3f} bits/byte vs unigram baseline "
            f"{result.unigram_bpb:.3f} ({verdict} the baseline)"
        )
    elif result.val_loss is not None:
        lines.append(f"validation loss {result.val_loss:.4f} nats/token")
    lines.append(f"checkpoint: {result.checkpoint}")
    lines.append(f"metrics:    {result.metrics_path}")
    if result.plot_path is not None:
        lines.append(f"plot:       {result.plot_path}")
    return "\n".join(lines)


def describe_run(model, dims, runtime, corpus: Corpus, step: int, steps: int) -> str:
    """The first line a run prints: ranks and layout, parameters on this rank, data, steps."""
    n_params = sum(p.numel() for p in model.parameters())
    return (
        f"moeflow train: {runtime.world_size} rank(s) (dp={dims.dp}, ep={dims.ep}) on "
        f"{runtime.device.type}; {n_params / 1e6:.2f}M parameters on this rank; data: "
        f"{corpus.description}, {len(corpus.train) / 1e6:.2f}M train / "
        f"{len(corpus.val) / 1e6:.2f}M validation tokens; steps {step} -> {steps}"
    )


def baseline_loss(unigram: float | None, bytes_per_token: float | None) -> float | None:
    """The unigram baseline in nats per token (what the loss plot draws), from bits per byte."""
    if unigram is None or not bytes_per_token:
        return None
    return unigram * math.log(2) * bytes_per_token
