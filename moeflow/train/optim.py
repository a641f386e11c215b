"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule.

Example:
    >>> cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    >>> [round(lr_at(s, cfg, total_steps=110), 3) for s in (0, 9, 10, 60, 110)]
    [0.1, 1.0, 1.0, 0.55, 0.1]
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from moeflow.parallel.fsdp import local_tensor
from moeflow.train.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `lr` over the first
    `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def implementation_for(cfg: OptimConfig, device: torch.device) -> str:
    """`optim.implementation` with `auto` resolved for the parameters' device: `fused` on CUDA,
    `foreach` elsewhere."""
    if cfg.implementation != "auto":
        return cfg.implementation
    return "fused" if device.type == "cuda" else "foreach"


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Matrices (dim >= 2: embeddings, projections, router, experts) decay; vectors (norm
    weights, biases) do not. The update runs as `optim.implementation` says
    (`implementation_for`)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    device = (decay + no_decay)[0].device if decay + no_decay else torch.device("cpu")
    how = implementation_for(cfg, device)
    kinds = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kinds[how])
    except RuntimeError as exc:  # fused kernels exist for some devices and dtypes only
        raise ValueError(
            f"optim.implementation ({cfg.implementation!r}, here {how!r}) cannot update these "
            f"parameters ({device.type}): {exc}; set optim.implementation to 'foreach'"
        ) from exc


def step_count(group: dict, param: torch.Tensor, value: float) -> torch.Tensor:
    """AdamW's per-parameter step counter where torch's own first step puts it: on the
    parameter's device in float32 for fused or capturable groups (their kernels read it there),
    else a host scalar in the default float precision. A counter made anywhere else works on CPU
    and fails in a fused update on an accelerator.

    Example:
        >>> step_count({"fused": True, "capturable": False}, torch.zeros(2), 3).dtype
        torch.float32
    """
    if group.get("fused") or group.get("capturable"):
        return torch.tensor(float(value), dtype=torch.float32, device=param.device)
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(float(value), dtype=dtype)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_grad_norm_(
    dense: list[torch.Tensor],
    expert: list[torch.Tensor],
    max_norm: float,
    ep_group: dist.ProcessGroup,
    row_weights: dict | None = None,
    shard_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient, as one process holding every expert would.

    Replicated (after `GradSync`): dense gradients are the same on every rank and each rank holds
    its own experts' gradients, so `norm^2 = dense^2 + sum over the ep group of expert^2` (one
    all-reduce of a scalar). Sharded (`shard_group`: the `dp_shard x ep` ranks of a replica,
    FSDP's DTensor gradients): every rank's local shards are disjoint parts of the whole, so both
    sums run over `shard_group` (one all-reduce of two scalars). `row_weights[param]`
    (`replica_row_weights`): per-slot weights of replicated experts' rows, so each logical expert
    counts once. The norms are taken per tensor in the gradients' dtype (no float64 copy), then
    squared and summed in float64. `max_norm` 0 only measures. Returns the norm before clipping.
    """
    row_weights = row_weights or {}
    grads_d = [local_tensor(p.grad) for p in dense if p.grad is not None]
    whole = [local_tensor(p.grad) for p in expert if p.grad is not None and p not in row_weights]
    rows = [(local_tensor(p.grad), row_weights[p]) for p in expert
            if p.grad is not None and p in row_weights]  # fmt: skip
    device = (grads_d or whole or [g for g, _ in rows])[0].device

    def squares(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), device=device, dtype=torch.float64)
        return torch.stack(torch._foreach_norm(grads)).double().square().sum()

    sq_e = squares(whole)
    for g, w in rows:
        per_row = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).double()
        sq_e = sq_e + (per_row.square() * w).sum()
    sq = torch.stack([squares(grads_d), sq_e])
    if shard_group is not None:
        dist.all_reduce(sq, group=shard_group)
    else:
        dist.all_reduce(sq[1:], group=ep_group)
    norm = sq.sum().sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = grads_d + whole + [g for g, _ in rows]
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return norm
