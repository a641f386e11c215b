"""`moeflow train --dry-run`: validate a config and build its mesh and model without training.

The model is built on the meta device, parallelized and sharded exactly as in training, so a
layout error (experts not divisible by ep, a world size that does not split into dp x ep, a
dp_shard that does not divide dp) shows up here. With `world_size`, torch's fake process group
stands in for a real job, so an 8-node recipe can be checked on a laptop. The run is planned for
`device` (default GPUs: `auto` settings resolve as on a GPU), and the memory planner
(`moeflow.train.memory_plan`) adds up what a rank needs at its peak; with `gpu_memory` it says
whether that fits.

Example:
    >>> cfg = RunConfig.from_dict({"model": {"dim": 64, "n_layers": 2, "n_heads": 4,
    ...                                      "moe": {"num_experts": 8}}, "parallel": {"ep": 4}})
    >>> report = dry_run(cfg, world_size=8)
    >>> report["dp"], report["experts_per_rank"]
    (2, 2)
"""

from __future__ import annotations

import torch

from moeflow.moe.dispatch_config import MODES
from moeflow.moe.ffn import gate_multiplier
from moeflow.moe.walk import moe_layers, split_parameters
from moeflow.parallel.dims import ParallelDims
from moeflow.train.build import build_model, check_fits, startup_bytes
from moeflow.train.config import RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.fit_advice import START_UP, advise
from moeflow.train.memory_plan import (
    activation_bytes,
    human_bytes,
    local_numel,
    loss_buffer_bytes,
    root_bytes,
    state_bytes,
    transient_bytes,
    verdict,
)
from moeflow.train.metrics import flops_per_token


def dry_run(
    cfg: RunConfig,
    world_size: int | None = None,
    device: str = "cuda",
    gpu_memory: float | None = None,
) -> dict:
    """Build the mesh and the meta-device model of `cfg` as a run on `device` ranks would;
    return what a rank would hold and need (`memory`, `peak_bytes`, and with `gpu_memory` bytes
    per device, `verdict`)."""
    runtime = init_distributed(cfg.parallel.timeout_s, fake_world_size=world_size)
    try:
        p, t = cfg.parallel, cfg.train
        target = torch.device(device)
        dp = p.dp_for(runtime.world_size)
        dims = ParallelDims(
            dp=dp, ep=p.ep, dp_shard=p.dp_shard_for(dp, target), timeout_s=p.timeout_s
        )
        ctx = dims.build("cpu")
        param_dtype = t.param_dtype
        if param_dtype == "auto":  # a planned GPU is taken to have bf16
            param_dtype = "bf16" if device == "cuda" else "fp32"
        model = build_model(cfg, ctx, torch.device("meta"), param_dtype=param_dtype)
        startup = startup_bytes(model)
        if gpu_memory is None:  # refused as the run refuses it, where the device's memory is known
            check_fits(model, target)
        dense_named, expert_named = split_parameters(model)
        dense = sum(t.numel() for _, t in dense_named)
        # What this rank holds: its shards of them under dp_shard.
        rank_params = sum(local_numel(t) for _, t in dense_named + expert_named)
        layers = [m for _, m in moe_layers(model)]
        m = cfg.model
        c = gate_multiplier(m.moe.activation)
        per_expert = (c + 1) * m.moe.ffn_hidden_size * m.moe.expert_dim
        layout = layers[0].layout if layers else None
        total = dense + per_expert * sum(x.config.num_experts for x in layers)
        active = dense + per_expert * m.moe.router.top_k * len(layers)
        autocast = t.autocast if t.autocast != "auto" else ("bf16" if device == "cuda" else "none")
        compute = "bf16" if param_dtype == "bf16" or autocast in ("bf16", "fp16") else "fp32"
        memory = plan(cfg, model, dims, compute)
        report = {
            # What the trainer's `start` record measures: fp32 weights and gradients, AdamW's two
            # moments and a 4-byte step count per parameter tensor (activations not included).
            "state_bytes_per_rank": state_bytes(model),
            "memory": memory,
            "peak_bytes": max(sum(memory.values()), startup),
            # this rank's share built whole before it is sharded (a peak of its own, at start-up)
            "startup_bytes": startup,
            "device": device,
            "param_dtype": param_dtype,
            "compute_dtype": compute,
            "dp_shard": dims.dp_shard,
            "activation_checkpointing": t.activation_checkpointing,
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
    if gpu_memory is not None:
        _judge(report, cfg, dims, device, gpu_memory)
    return report


def _judge(report: dict, cfg: RunConfig, dims, device: str, gpu_memory: float) -> None:
    """`verdict` (and for a run that does not fit, `advice`, each piece planned again by
    `moeflow.train.fit_advice`) for a device of `gpu_memory` bytes."""
    report["verdict"] = verdict(report["memory"], gpu_memory, report["startup_bytes"])
    if report["peak_bytes"] <= gpu_memory:
        return

    def plan_peak(changed: RunConfig, world: int) -> tuple[float, dict[str, float]]:
        again = dry_run(changed, world, device)
        return again["peak_bytes"], {**again["memory"], START_UP: again["startup_bytes"]}

    report["advice"] = advise(cfg, report["world_size"], dims, device, gpu_memory, plan_peak)
    report["verdict"] += "; " + report["advice"]


def plan(cfg: RunConfig, model, dims, compute: str) -> dict[str, float]:
    """The memory planner's items for one rank (see `moeflow.train.memory_plan`)."""
    checkpointing = cfg.train.activation_checkpointing
    acts = activation_bytes(cfg, compute, checkpointing)
    transient, _ = transient_bytes(model, compute, cfg.parallel.mode)
    state = state_bytes(model)
    items = {
        "weights": state["params"],
        "gradients": state["grads"],
        "optimizer": state["optimizer"],
        "root unsharded": root_bytes(model, compute),
        "largest transient": transient + acts["recompute"],
        "activations": acts["saved"],
        "loss buffers": loss_buffer_bytes(cfg),
    }
    return {k: float(v) for k, v in items.items()}


def expert_memory(model) -> list[dict]:
    """Per MoE layer: the expert-parameter bytes this rank holds (measured on its tensors) and, per
    parallel mode, the peak during a layer call (held + what the mode gathers, from the layout)."""
    out = []
    for name, layer in moe_layers(model):
        held = sum(local_numel(p) * p.element_size() for p in layer.experts.parameters())
        size = layer.experts.w1.element_size()
        c = gate_multiplier(layer.config.activation)
        d = layer.config.expert_dim
        bias = layer.config.ffn_bias
        peak = {m: held + size * layer.layout.gather_peak_elements(m, d, c, bias) for m in MODES}
        f = layer.config.ffn_hidden_size
        total = layer.config.num_experts * f * (c * (d + bias) + d) * size
        out.append({"layer": name, "held_bytes": held, "total_bytes": total, "peak_bytes": peak})
    return out


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:.0f}"


def format_report(report: dict) -> str:
    replicas = report.get("replica_slots")
    extra = f" + {replicas} replica slot(s)" if replicas else ""
    memory = [
        f"  {_layer_names(names)}: experts {human_bytes(m['held_bytes'])} per rank of "
        f"{human_bytes(m['total_bytes'])}; peak in a call: "
        + ", ".join(f"{k} {human_bytes(v)}" for k, v in m["peak_bytes"].items())
        for names, m in _grouped(report.get("expert_memory", []))
    ]
    shard = report.get("dp_shard", 1)
    sharding = (
        f" (dp_shard {shard} x dp_replicate {report['dp'] // shard}: sharded with FSDP2)"
        if shard > 1 or report.get("param_dtype") == "bf16"
        else " (replicated)"
    )
    plan = report.get("memory", {})
    planned = [
        f"  memory per rank on {report.get('device', 'cuda')} ({report.get('param_dtype')} "
        f"params, {report.get('compute_dtype')} compute, activation checkpointing "
        f"{_checkpointing(report.get('activation_checkpointing'))}): "
        + ", ".join(f"{k} {human_bytes(v)}" for k, v in plan.items() if v)
        + f"; peak {human_bytes(sum(plan.values()))} while training, "
        f"{human_bytes(report.get('startup_bytes', 0))} at start-up (this rank's dense weights and "
        "experts built whole before sharding)",
    ]
    if "verdict" in report:
        planned.append(f"  {report['verdict']}")
    return "\n".join(
        [
            f"dry run: config valid; world {report['world_size']} = dp {report['dp']} x ep "
            f"{report['ep']}{sharding}; {report['moe_layers']} MoE layers, "
            f"{report['experts_per_rank']} "
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
                f"{name} {human_bytes(n)}"
                for name, n in zip(
                    ("weights", "gradients", "AdamW"),
                    report["state_bytes_per_rank"].values(),
                    strict=True,
                )
            ),
            f"  {report['flops_per_token'] / 1e9:.4g} GFLOP per token (fwd+bwd), "
            f"{report['tokens_per_step']:,} tokens per optimizer step",
            *planned,
            "  expert parameters per MoE layer (fp32 weights; gathered experts are transient):",
            *memory,
        ]
    )


def _checkpointing(value) -> str:
    return {False: "off", True: "on"}.get(value, str(value))


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
