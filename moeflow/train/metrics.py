"""Metrics of a training run: a JSONL file (always), a progress bar, Weights & Biases, a PNG.

Only rank 0 writes. Each line of `metrics.jsonl` is one JSON object with a `kind`: `"train"` (every
`metrics.log_every` steps: loss, aux/z losses, lr, grad norm, tokens/s for the job and per rank,
MFU, and per MoE layer the tokens per expert, dropped fraction and max load violation), `"val"`
(validation loss and bits per byte; a mixture's also per source, under `"sources"`), `"start"`,
`"placement"`, `"runtime"`, `"error"` or `"end"`; docs/training.md lists every field. On resume,
lines past the checkpoint's step are dropped first (rewritten through a temporary file), so the
file reads as one uninterrupted run.

Example:
    >>> from moeflow.moe.config import MoEConfig
    >>> flops_per_token(DecoderConfig(dim=64, n_layers=2, n_heads=4, max_seq_len=32,
    ...     moe=MoEConfig(hidden_size=64, num_experts=4, ffn_hidden_size=128)), seq_len=32)
    936960
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moeflow.models.decoder import DecoderConfig
from moeflow.moe.ffn import gate_multiplier
from moeflow.moe.layer import MoELayer


def flops_per_token(cfg: DecoderConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward = 3x forward), counting only the experts a
    token is routed to: `6 * active matmul params + 12 * n_layers * (n_heads * head_dim) *
    seq_len` (attention scores and values, PaLM's estimate)."""
    moe = cfg.moe
    g = gate_multiplier(moe.activation)
    inner = cfg.n_heads * cfg.head_width  # the queries' (and attention output's) width
    attn = cfg.dim * (2 * inner + 2 * cfg.kv_heads * cfg.head_width)
    dense_ffn = (g + 1) * cfg.dim * (cfg.dense_ffn_hidden_size or moe.ffn_hidden_size)
    moe_ffn = moe.router.top_k * (g + 1) * moe.expert_dim * moe.ffn_hidden_size
    moe_ffn += cfg.dim * moe.num_experts  # the router
    moe_ffn += 2 * cfg.dim * moe.a2a_dim if moe.a2a_dim else 0  # down and up projections
    moe_ffn += (g + 1) * cfg.dim * moe.shared_expert_ffn_hidden_size  # always-on shared expert
    moe_ffn += cfg.dim if moe.shared_expert_gate else 0
    active = cfg.vocab_size * cfg.dim  # the output head
    for i in range(cfg.n_layers):
        active += attn + (moe_ffn if cfg.is_moe_layer(i) else dense_ffn)
    return 6 * active + 12 * cfg.n_layers * inner * seq_len


def train_record(
    reduced: dict,
    *,
    step: int,
    optimizer: torch.optim.Optimizer,
    grad_norm: float,
    skipped: int,
    throughput: dict,
) -> dict:
    """A log interval's `train` record from its reduced metrics (`IntervalMetrics.reduce`) and
    its throughput fields (`moeflow.train.throughput`: tokens/s for the job and per rank, MFU)."""
    record = {
        "kind": "train",
        "step": step,
        "loss": reduced.pop("loss"),
        **{k: reduced.pop(k) for k in IntervalMetrics.LAYER_SCALARS},
        "lr": optimizer.param_groups[0]["lr"],
        "grad_norm": grad_norm,
        "skipped_steps": skipped,
        **throughput,
    }
    # Per MoE layer: kept tokens per FFN expert, routed pairs per choice (null and
    # zero-computation experts too), and how many tokens got 0..K FFN experts.
    record.update(reduced)
    return record


class IntervalMetrics:
    """What the trainer logs, summed on the device per micro-batch between two log steps (no host
    sync until `reduce`): the loss and the MoE layers' statistics (`MoELayer.last_stats`).

    Example:
        >>> from moeflow.moe.config import MoEConfig
        >>> layer = MoELayer(MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=8))
        >>> _ = layer(torch.randn(4, 8))
        >>> m = IntervalMetrics([layer], torch.device("cpu"))
        >>> m.add(torch.tensor(2.0), [layer]); m.add(torch.tensor(4.0), [layer])
        >>> r = m.reduce(None, world_size=1)
        >>> counts = layer.last_stats.tokens_per_expert.tolist()
        >>> r["loss"], r["tokens_per_expert"][0] == [2 * n for n in counts]
        (3.0, True)
    """

    # `MoEStats` fields logged under their own names: scalars summed over micro-batches and
    # layers (logged as means), vectors per layer (logged as integer sums)
    LAYER_SCALARS = (
        "aux_loss",
        "z_loss",
        "dropped_fraction",
        "max_load_violation",
        "ffn_experts_per_token",
    )
    LAYER_VECTORS = ("tokens_per_expert", "routed_per_choice", "ffn_experts_histogram")

    def __init__(self, layers: list[MoELayer], device: torch.device) -> None:
        opts = {"device": device, "dtype": torch.float64}
        self.scalars = torch.zeros(1 + len(self.LAYER_SCALARS), **opts)  # loss, then the above
        sizes = [
            [m.config.num_experts, m.router.num_choices, m.config.router.top_k + 1] for m in layers
        ]
        self.vectors = {
            key: [torch.zeros(s[i], **opts) for s in sizes]
            for i, key in enumerate(self.LAYER_VECTORS)
        }
        self.micro_batches = 0
        self.num_layers = len(layers)

    def add(self, loss: torch.Tensor, layers: list[MoELayer]) -> None:
        """One micro-batch: its loss, and every layer's `last_stats`."""
        self.scalars[0] += loss.detach().double()
        self.micro_batches += 1
        for i, layer in enumerate(layers):
            stats = layer.last_stats
            for j, field in enumerate(self.LAYER_SCALARS):
                self.scalars[1 + j] += getattr(stats, field).double()
            for key in self.LAYER_VECTORS:
                self.vectors[key][i] += getattr(stats, key).double()

    def reduce(self, group: dist.ProcessGroup | None, world_size: int) -> dict:
        """One all-reduce over `group` and one host sync: the loss and layer scalars as means
        over micro-batches, ranks (and layers), the per-layer vectors as integer sums."""
        parts = [self.scalars, *[v for key in self.LAYER_VECTORS for v in self.vectors[key]]]
        flat = torch.cat(parts)
        if group is not None:
            dist.all_reduce(flat, group=group)
        host = flat.tolist()  # the one host sync of a log interval
        micro = max(self.micro_batches * world_size, 1)
        layers = max(self.num_layers, 1)
        out = {"loss": host[0] / micro}
        for j, key in enumerate(self.LAYER_SCALARS):
            out[key] = host[1 + j] / micro / layers
        offset = len(self.scalars)
        for key in self.LAYER_VECTORS:
            out[key] = []
            for v in self.vectors[key]:
                out[key].append([int(x) for x in host[offset : offset + v.numel()]])
                offset += v.numel()
        return out


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop the records of steps > `after_step` (a resumed run writes them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= after_step and record.get("kind") != "end":
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


class MetricsLogger:
    """Rank 0's sink for metrics; on other ranks every method does nothing."""

    @classmethod
    def for_run(cls, cfg, out_dir: Path, rank0: bool, first_step: int, quiet: bool):
        """The logger of a `RunConfig`'s run (`[metrics]`: progress bar, Weights & Biases)."""
        m = cfg.metrics
        wandb_cfg = None
        if m.wandb:
            wandb_cfg = {
                "project": m.wandb_project, "mode": m.wandb_mode, "dir": str(out_dir),
                "config": cfg.to_dict(), "resume": "allow",
            }  # fmt: skip
        progress = m.progress and not quiet
        return cls(out_dir, rank0, cfg.train.steps, first_step, progress, wandb_cfg)

    def __init__(
        self,
        out_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        progress: bool,
        wandb_cfg: dict | None,
    ) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.records: list[dict] = []
        self.bar = self.wandb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, start_step)
        self.records = (
            [json.loads(line) for line in self.path.read_text().splitlines()]
            if (self.path.is_file())
            else []
        )
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, unit="step", mininterval=1.0,
                dynamic_ncols=True, file=sys.stderr,
            )  # fmt: skip
        if wandb_cfg is not None:
            try:
                import wandb
            except ImportError:
                raise ValueError(
                    "metrics.wandb = true needs the wandb package: pip install 'moeflow[wandb]' "
                    "(or set metrics.wandb = false)"
                ) from None
            self.wandb = wandb.init(**wandb_cfg)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            flat = {
                f"{record['kind']}/{k}": v
                for k, v in record.items()
                if isinstance(v, int | float) and k != "step"
            }
            self.wandb.log(flat, step=record["step"])

    def advance(self, step: int, postfix: str) -> None:
        """Move the progress bar to `step`, showing `postfix` (the loss and throughput)."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.refresh()

    def message(self, text: str) -> None:
        """Print a line on rank 0 (above the progress bar); an empty one prints nothing."""
        if not self.enabled or not text:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_run(records: list[dict], path: Path, baseline_loss: float | None = None) -> Path:
    """Loss curves (with the unigram baseline, if given, in nats per token) and a per-layer
    expert-load heatmap (share of tokens per expert, summed over the run) into a PNG. Needs
    matplotlib (`pip install 'moeflow[plot]'`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(
            "metrics.plot = true needs matplotlib: pip install 'moeflow[plot]' "
            "(or set metrics.plot = false)"
        ) from None
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (nats)")
    if val:
        ax_loss.plot(
            [r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss (nats)"
        )
    for name in val[-1].get("sources", {}) if val else ():  # a mixture: each source's loss
        points = [(r["step"], r["sources"][name]["val_loss"]) for r in val if "sources" in r]
        ax_loss.plot(*zip(*points, strict=True), ".:", label=f"val loss, {name}")
    if baseline_loss is not None:
        ax_loss.axhline(baseline_loss, color="gray", linestyle="--", label="unigram baseline")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("loss")
    ax_loss.legend()
    loads = [r["tokens_per_expert"] for r in train if r.get("tokens_per_expert")]
    if loads:
        layers = len(loads[0])
        total = [[sum(rec[i][e] for rec in loads) for e in range(len(loads[0][i]))]
                 for i in range(layers)]  # fmt: skip
        share = [[c / max(sum(row), 1) for c in row] for row in total]
        image = ax_load.imshow(share, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax_load, label="share of routed tokens")
        ax_load.set_xlabel("expert (logical id)")
        ax_load.set_ylabel("MoE layer")
        ax_load.set_yticks(range(layers))
    ax_load.set_title("expert load over the run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
