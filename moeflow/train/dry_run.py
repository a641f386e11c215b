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

from moeflow.moe.layer import MoELayer
from moeflow.parallel.dims import ParallelDims
from moeflow.parallel.grad_sync import expert_parameter_names
from moeflow.train.config import RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.metrics import flops_per_token
from moeflow.train.trainer import build_model


def dry_run(cfg: RunConfig, world_size: int | None = None) -> dict:
    """Build the mesh and the meta-device model of `cfg`; return what a rank would hold."""
    runtime = init_distributed(cfg.parallel.timeout_s, fake_world_size=world_size)
    try:
        p = cfg.parallel
        dims = ParallelDims(dp=p.dp_for(runtime.world_size), ep=p.ep, timeout_s=p.timeout_s)
        ctx = dims.build("cpu")
        model = build_model(cfg, ctx, torch.device("meta"))
        experts = expert_parameter_names(model)
        named = dict(model.named_parameters())
        dense = sum(t.numel() for n, t in named.items() if n not in experts)
        local_experts = sum(t.numel() for n, t in named.items() if n in experts)
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        m = cfg.model
        per_expert = local_experts // max(sum(len(x.local_expert_ids) for x in layers), 1)
        total = dense + per_expert * sum(x.config.num_experts for x in layers)
        active = dense + per_expert * m.moe.router.top_k * len(layers)
        rank_params = dense + local_experts
        return {
            "world_size": runtime.world_size,
            "dp": dims.dp,
            "ep": dims.ep,
            "moe_layers": len(layers),
            "experts_per_rank": m.moe.num_experts // dims.ep,
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


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:.0f}"


def format_report(report: dict) -> str:
    replicas = report.get("replica_slots")
    extra = f" + {replicas} replica slot(s)" if replicas else ""
    return "\n".join(
        [
            f"dry run: config valid; world {report['world_size']} = dp {report['dp']} x ep "
            f"{report['ep']}; {report['moe_layers']} MoE layers, {report['experts_per_rank']} "
            "experts per rank" + extra,
            f"  parameters: {_count(report['total_params'])} total, "
            f"{_count(report['active_params_per_token'])} active per token, "
            f"{_count(report['params_per_rank'])} per rank "
            f"({report['train_state_gib_per_rank']:.3g} GiB of fp32 weights, grads and AdamW "
            "state per rank)",
            f"  {report['flops_per_token'] / 1e9:.4g} GFLOP per token (fwd+bwd), "
            f"{report['tokens_per_step']:,} tokens per optimizer step",
        ]
    )
