"""The language-model loss of the trainer: next-token cross-entropy on logits read in at least fp32
(bf16/fp16 logits are upcast, float64 kept), and the validation loss over the fixed windows.

Example:
    >>> logits = torch.zeros(2, 3, 4, dtype=torch.bfloat16)  # uniform over 4 tokens
    >>> round(token_loss(logits, torch.zeros(2, 3, dtype=torch.long)).item(), 4)  # ln 4
    1.3863
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moeflow.train.data import eval_batches


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of `logits [..., V]` against `targets [...]`, in at least fp32."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(wide.flatten(0, -2), targets.flatten(), reduction=reduction)


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    val_tokens,
    seq_len: int,
    windows: int,
    batch_size: int,
    group: dist.ProcessGroup,
    device: torch.device,
    autocast: Callable,
    bytes_per_token: float | None,
) -> tuple[float, float | None]:
    """Mean loss (nats per token) over `windows` fixed windows of `val_tokens`, split over the
    ranks of `group` (the same value at any world size; one all-reduce), and bits per byte."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y, mask in eval_batches(val_tokens, seq_len, windows, batch_size, rank, world):
        x, y, mask = (v.to(device) for v in (x, y, mask))
        with autocast():
            logits = model(x)
        nll = token_loss(logits, y, reduction="none").view(y.shape)[mask]
        total += torch.stack([nll.double().sum(), nll.new_tensor(nll.numel(), dtype=torch.float64)])
    dist.all_reduce(total, group=group)
    model.train()
    loss = (total[0] / total[1]).item()
    return loss, (loss / math.log(2) / bytes_per_token if bytes_per_token else None)
