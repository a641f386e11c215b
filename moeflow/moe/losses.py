"""Router balancing losses, as pure functions (PAPERS.md, "Baseline top-k routing").

Legend: T tokens, E experts, K top-k, B sequences, S tokens per sequence. All functions take the
router's scores in fp32 and return a 0-dim tensor; an empty batch gives 0.
"""

from __future__ import annotations

import torch


def load_balancing_loss(
    scores_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Switch/GShard loss with Megatron's normalisation: `E/(K*T^2) * sum_i (sum_t p_ti) * count_i`.

    `scores_TE` are the full-distribution router probabilities, `counts_E` the number of tokens
    whose top-k contains expert i (before capacity drops). Equals 1 at perfect balance with uniform
    scores. Compute it per layer; averaging per-layer losses keeps one layer's imbalance visible.
    """
    num_tokens, num_experts = scores_TE.shape
    if num_tokens == 0:
        return scores_TE.sum() * 0.0
    scale = num_experts / (top_k * num_tokens * num_tokens)
    return (scores_TE.sum(dim=0) * counts_E.to(scores_TE.dtype)).sum() * scale


def seq_load_balancing_loss(
    scores_BSE: torch.Tensor, counts_BE: torch.Tensor, top_k: int
) -> torch.Tensor:
    """The same loss computed per sequence (f and P from that sequence's tokens), averaged over
    B."""
    num_seqs, seq_len, num_experts = scores_BSE.shape
    if num_seqs == 0 or seq_len == 0:
        return scores_BSE.sum() * 0.0
    scale = num_experts / (top_k * seq_len * seq_len)
    per_seq_B = (scores_BSE.sum(dim=1) * counts_BE.to(scores_BSE.dtype)).sum(dim=1) * scale
    return per_seq_B.mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: `mean_t (logsumexp_j logits_tj)^2`."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
