"""`moeflow train --dry-run`: validate a config and build its mesh and model without training.

The model is built on the meta device and parallelized exactly as in training, so a layout error
(experts not divisible by ep, a world size that does not split into dp x ep) shows up here. With
`world_size`, torch's fake process group stands in for a real job, so an 8-node recipe can be
checked on a laptop.

Example:
    >>> cfg = RunConfig.from_dict({"model": {"dim": 64, "n_layers": 2, "n_heads": 4,
    ...                                      "moe": {"num_experts": 8}}, "parallel": {"ep": 4}})
    >>> report = dry_run(cfg, world_size=8)
    >>> report["dp"], report["experts_per_rank"]
    (2, 2)
"""

from __future__ import annotations

import torch

from moeflow.moe.ffn import gate_multiplier
from moeflow.moe.walk import moe_layers, split_parameters
from moeflow.parallel.dims import ParallelDims
from moeflow.parallel.dispatch import MODES
from moeflow.train.build import build_model
from moeflow.train.config import RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.metrics import flops_per_token


def dry_run(cfg: RunConfig, world_size: int | None = None) -> dict:
    """Build the mesh and the meta-device model of `cfg`; return what a rank would hold."""
    runtime = init_distributed(cfg.parallel.timeout_s, fake_world_size=world_size)
    try:
        p = cfg.parallel
        dims = ParallelDims(dp=p.dp_for(runtime.world_size), ep=p.ep, timeout_s=p.timeout_s)
        ctx = dims.build("cpu")
        model = build_model(cfg, ctx, torch.device("meta"))
        dense_named, expert_named = split_parameters(model)
        dense = sum(t.numel() for _, t in dense_named)
        local_experts = sum(t.numel() for _, t in expert_named)
        layers = [m for _, m in moe_layers(model)]
        m = cfg.model
        c = gate_multiplier(m.moe.activation)
        per_expert = (c + 1) * m.moe.ffn_hidden_size * m.moe.expert_dim
        layout = layers[0].layout if layers else None
        total = dense + per_expert * sum(x.config.num_experts for x in layers)
        active = dense + per_expert * m.moe.router.top_k * len(layers)
        rank_params = dense + local_experts
        tensors = len(dense_named) + len(expert_named)
        return {
            # What the trainer's `start` record measures: fp32 weights and gradients, AdamW's two
            # moments and a 4-byte step count per parameter tensor (activations not included).
            "state_bytes_per_rank": {
                "params": 4 * rank_params,
                "grads": 4 * rank_params,
                "optimizer": 8 * rank_params + 4 * tensors,
            },
            "expert_memory": expert_memory(model),
            "world_size": runtime.world_size,
            "dp": dims.dp,
            "ep": dims.ep,
            "moe_layers": len(layers),
            # expert rows per rank (replicas included), each an F-slice 1/shards of an expert
            "experts_per_rank": layout.slots_per_group - cfg.placement.replica_slots
            if layout
            else 0,
            "expert_shards": layout.shards if layout else 1,
            "replica_slots": cfg.placement.replica_slots,
            "total_params": total,
            "active_params_per_token": active,
            "params_per_rank": rank_params,
            # fp32 weights + grads + AdamW's two moments; activations not included
            "train_state_gib_per_rank": rank_params * 16 / 2**30,
            "flops_per_token": flops_per_token(m, cfg.train.seq_len),
            "tokens_per_step": cfg.train.micro_batch_size
            * cfg.train.grad_accum_steps
            * cfg.train.seq_len
            * runtime.world_size,
        }
    finally:
        shutdown(runtime)


def expert_memory(model) -> list[dict]:
    """Per MoE layer: the expert-parameter bytes this rank holds (measured on its tensors) and, per
    parallel mode, the peak during a layer call (held + what the mode gathers, from the layout)."""
    out = []
    for name, layer in moe_layers(model):
        held = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
        size = layer.experts.w1.element_size()
        c = gate_multiplier(layer.config.activation)
        d = layer.config.expert_dim
        bias = layer.config.ffn_bias
        peak = {m: held + size * layer.layout.gather_peak_elements(m, d, c, bias) for m in MODES}
        f = layer.config.ffn_hidden_size
        total = layer.config.num_experts * f * (c * (d + bias) + d) * size
        out.append({"layer": name, "held_bytes": held, "total_bytes": total, "peak_bytes": peak})
    return out


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:.0f}"


def format_report(report: dict) -> str:
    replicas = report.get("replica_slots")
    extra = f" + {replicas} replica slot(s)" if replicas else ""
    memory = [
        f"  {_layer_names(names)}: experts {_bytes(m['held_bytes'])} per rank of "
        f"{_bytes(m['total_bytes'])}; peak in a call: "
        + ", ".join(f"{k} {_bytes(v)}" for k, v in m["peak_bytes"].items())
        for names, m in _grouped(report.get("expert_memory", []))
    ]
    return "\n".join(
        [
            f"dry run: config valid; world {report['world_size']} = dp {report['dp']} x ep "
            f"{report['ep']}; {report['moe_layers']} MoE layers, {report['experts_per_rank']} "
            + (
                "experts per rank"
                if report.get("expert_shards", 1) == 1
                else f"expert per rank as 1/{report['expert_shards']} F-slice"
            )
            + extra,
            f"  parameters: {_count(report['total_params'])} total, "
            f"{_count(report['active_params_per_token'])} active per token, "
            f"{_count(report['params_per_rank'])} per rank "
            f"({report['train_state_gib_per_rank']:.3g} GiB of fp32 weights, grads and AdamW "
            "state per rank)",
            "  state per rank: "
            + ", ".join(
                f"{name} {_bytes(n)}"
                for name, n in zip(
                    ("weights", "gradients", "AdamW"),
                    report["state_bytes_per_rank"].values(),
                    strict=True,
                )
            ),
            f"  {report['flops_per_token'] / 1e9:.4g} GFLOP per token (fwd+bwd), "
            f"{report['tokens_per_step']:,} tokens per optimizer step",
            "  expert parameters per MoE layer (fp32 weights; gathered experts are transient):",
            *memory,
        ]
    )


def _grouped(entries: list[dict]) -> list[tuple[list[str], dict]]:
    """Layers with the same figures as one entry (32 identical MoE layers print one line)."""
    groups: dict[str, tuple[list[str], dict]] = {}
    for entry in entries:
        figures = {k: v for k, v in entry.items() if k != "layer"}
        key = repr(sorted(figures.items()))
        groups.setdefault(key, ([], entry))[0].append(entry["layer"])
    return list(groups.values())


def _layer_names(names: list[str]) -> str:
    """One layer's name, or how many and the first and last.

    Example:
        >>> _layer_names(["blocks.0.ffn"]), _layer_names([f"blocks.{i}.ffn" for i in range(32)])
        ('blocks.0.ffn', '32 MoE layers (blocks.0.ffn ... blocks.31.ffn)')
    """
    if len(names) == 1:
        return names[0]
    return f"{len(names)} MoE layers ({names[0]} ... {names[-1]})"
