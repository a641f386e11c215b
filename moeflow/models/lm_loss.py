"""The language-model loss without `[tokens, vocab]` logits: next-token cross-entropy on logits
read in at least fp32 (bf16/fp16 logits are upcast, float64 kept), whole or a chunk of tokens at a
time.

`chunked_token_loss` computes the same loss from the output head's input without ever holding the
`[tokens, vocab]` logits: each chunk of tokens gets its logits, its summed loss, and drops them
(activation checkpointing per chunk), and the backward recomputes one chunk's logits at a time.
At 4,096 tokens and a 151,936-token vocabulary the fp32 logits alone are 2.5 GB (and their
gradient as much again); a chunk of 1,024 tokens holds 0.6 GB. It costs one more head matmul per
chunk in the backward.

Example:
    >>> logits = torch.zeros(2, 3, 4, dtype=torch.bfloat16)  # uniform over 4 tokens
    >>> round(token_loss(logits, torch.zeros(2, 3, dtype=torch.long)).item(), 4)  # ln 4
    1.3863
    >>> h, w = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    >>> y = torch.randint(0, 5, (2, 6))
    >>> plain = token_loss(h @ w.T, y)
    >>> torch.allclose(chunked_token_loss(h, w, y, chunk_tokens=5), plain, rtol=1e-12)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of `logits [..., V]` against `targets [...]`, in at least fp32."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(wide.flatten(0, -2), targets.flatten(), reduction=reduction)


def chunked_token_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """`token_loss(hidden @ weight.T, targets)` (the mean over tokens) from `hidden [..., D]` and
    the head's `weight [V, D]`, `chunk_tokens` tokens' logits at a time (see the module doc)."""
    h_ND, t_N = hidden.flatten(0, -2), targets.flatten()
    n = t_N.numel()
    if n <= chunk_tokens:  # one chunk: the plain loss, nothing to recompute
        return token_loss(F.linear(h_ND, weight), t_N)
    total = h_ND.new_zeros((), dtype=torch.promote_types(h_ND.dtype, torch.float32))
    for start in range(0, n, chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_loss_sum, h_ND[part], weight, t_N[part], use_reentrant=False
        )
    return total / n


def _chunk_loss_sum(h_ND: torch.Tensor, weight: torch.Tensor, t_N: torch.Tensor) -> torch.Tensor:
    return token_loss(F.linear(h_ND, weight), t_N, reduction="sum")
