"""The trainer's loss: the model's next-token loss on one micro-batch (`moeflow.models.lm_loss`:
never the `[tokens, vocab]` fp32 logits when chunked), the forward's autocast, and the validation
loss over the fixed windows.

Example:
    >>> from moeflow.models.decoder import MoEDecoder
    >>> from moeflow.train.config import RunConfig
    >>> model = MoEDecoder(RunConfig.from_dict({"model": {"dim": 8,
    ...     "n_layers": 1, "n_heads": 2, "max_seq_len": 8, "moe": {"num_experts": 2}},
    ...     "train": {"seq_len": 8}}).model)
    >>> x = torch.randint(0, 256, (2, 8))
    >>> chunked, plain = model_loss(model, x, x, chunk_tokens=4), token_loss(model(x), x)
    >>> torch.allclose(chunked, plain, rtol=1e-5)  # the same loss, 4 tokens' logits at a time
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from moeflow.data.stream import eval_batches
from moeflow.models.lm_loss import chunked_token_loss, token_loss

__all__ = ["autocast", "chunked_token_loss", "model_loss", "token_loss", "validation_loss"]


def autocast(mode: str, device: torch.device):
    """The forward's autocast context for `train.autocast` (`auto`: bf16 on CUDA, none elsewhere;
    `none`, `bf16`, `fp16`)."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    if mode == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_loss(
    model: nn.Module,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of `model` on one micro-batch: a model that computes its own loss
    (`MoEDecoder(tokens, targets, loss_chunk_tokens)`: chunked when `chunk_tokens` > 0) does,
    inside its forward (where a sharded model's head is gathered); else from its logits.
    `documents`: each position's document in its window (attention stays inside it)."""
    extra = {} if documents is None else {"document_ids_BS": documents}
    if getattr(model, "computes_loss", False):
        return model(tokens, targets, loss_chunk_tokens=chunk_tokens, **extra)
    return token_loss(model(tokens, **extra), targets)


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
    documents: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> tuple[float, float | None]:
    """Mean loss (nats per token) over `windows` fixed windows of `val_tokens`, split over the
    ranks of `group` (the same value at any world size; one all-reduce), and bits per byte.
    `documents`: a window's document ids (or None) from its tokens, for document masking."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y, mask in eval_batches(val_tokens, seq_len, windows, batch_size, rank, world):
        x, y, mask = (v.to(device) for v in (x, y, mask))
        docs = documents(x) if documents is not None else None
        with autocast():
            logits = model(x) if docs is None else model(x, document_ids_BS=docs)
        nll = token_loss(logits, y, reduction="none").view(y.shape)[mask]
        total += torch.stack([nll.double().sum(), nll.new_tensor(nll.numel(), dtype=torch.float64)])
    dist.all_reduce(total, group=group)
    model.train()
    loss = (total[0] / total[1]).item()
    return loss, (loss / math.log(2) / bytes_per_token if bytes_per_token else None)
