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


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Matrices (dim >= 2: embeddings, projections, router, experts) decay; vectors (norm
    weights, biases) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


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
) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient, as one process holding every expert would.

    After `GradSync`, dense gradients are the same on every rank and each rank holds its own
    experts' gradients, so `norm^2 = dense^2 + sum over the ep group of expert^2` (one all-reduce
    of a scalar). `row_weights[param]` (`replica_row_weights`): per-slot weights of replicated
    experts' rows, so each logical expert counts once. `max_norm` 0 only measures. Returns the
    norm before clipping.
    """
    row_weights = row_weights or {}
    grads_d = [p.grad for p in dense if p.grad is not None]
    grads_e = [(p.grad, row_weights.get(p)) for p in expert if p.grad is not None]
    device = (grads_d or [g for g, _ in grads_e])[0].device

    def sq(g: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        if w is None:
            return g.double().pow(2).sum()
        return (g.double().pow(2).reshape(g.shape[0], -1).sum(dim=1) * w).sum()

    sq_d = sum((g.double().pow(2).sum() for g in grads_d), torch.zeros((), device=device))
    sq_e = sum((sq(g, w) for g, w in grads_e), torch.zeros((), device=device))
    grads_e = [g for g, _ in grads_e]
    sq_e = sq_e.to(torch.float64)
    dist.all_reduce(sq_e, group=ep_group)
    norm = (sq_d + sq_e).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = grads_d + grads_e
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return norm
