"""Router balancing losses, as pure functions (docs/methods.md, "Top-k routing").

Legend: T tokens, E experts, K top-k, B sequences, S tokens per sequence. All functions take the
router's scores in fp32 and return a 0-dim tensor; an empty batch gives 0. `mask_T` (1 for a real
token, 0 for padding; None: every token counts) leaves padding out of every mean and count, as
transformers' `load_balancing_loss_func` does with its `attention_mask`.
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


def _mean(values_T: torch.Tensor, mask_T: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    """Mean over the tokens (`dim`) that `mask_T` keeps (all without a mask); 0 where none."""
    if mask_T is None:
        return values_T.mean(dim=dim)
    m = mask_T.to(values_T.dtype)
    while m.dim() < values_T.dim():
        m = m.unsqueeze(-1)
    return (values_T * m).sum(dim=dim) / m.sum(dim=dim).clamp(min=1)


def z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: `mean_t (logsumexp_j logits_tj)^2` (over the unmasked tokens)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return _mean(torch.logsumexp(logits_TE, dim=-1).square(), mask_T)


def masked_counts(ids_TK: torch.Tensor, counts_E: torch.Tensor, mask_T: torch.Tensor | None):
    """Pairs per choice of the tokens `mask_T` keeps (`counts_E`, all pairs' counts, without a
    mask)."""
    if mask_T is None:
        return counts_E
    keep_TK = mask_T.to(counts_E.dtype).unsqueeze(1).expand_as(ids_TK)
    return torch.zeros_like(counts_E).index_add_(0, ids_TK.reshape(-1), keep_TK.reshape(-1))


def balance_loss(
    scores_TE: torch.Tensor,
    counts_E: torch.Tensor,
    weights_E: torch.Tensor | None = None,
    mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """`E * sum_i w_i f_i P_i` with `f = counts / sum(counts)` and `P = mean_t p_t`: the loss every
    router uses. With top-k counts (summing to K*T) and w = 1 it equals `load_balancing_loss`;
    routers change `counts` (AdaMoE's null mean, global-batch sums) and `w` (MoE++'s tau). With
    `mask_T`, P is the unmasked tokens' mean (`counts` must then be theirs: `masked_counts`)."""
    num_tokens, num_experts = scores_TE.shape
    if num_tokens == 0:
        return scores_TE.sum() * 0.0
    counts_E = counts_E.to(torch.float64)
    total = counts_E.sum()
    # No pair counted: f = 0, so the loss is 0 (a `where`, not an `if`: no host read).
    f_E = (counts_E / torch.where(total > 0, total, 1.0)).to(scores_TE.dtype)
    term_E = f_E * _mean(scores_TE, mask_T)
    if weights_E is not None:
        term_E = term_E * weights_E.to(scores_TE.dtype)
    return num_experts * term_E.sum()


def seq_balance_loss(
    scores_BSE: torch.Tensor,
    counts_BE: torch.Tensor,
    weights_E: torch.Tensor | None = None,
    mask_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """`balance_loss` per sequence (f and P from that sequence's tokens), averaged over B (over
    the sequences holding an unmasked token, with `mask_BS`)."""
    num_seqs, seq_len, num_experts = scores_BSE.shape
    if num_seqs == 0 or seq_len == 0:
        return scores_BSE.sum() * 0.0
    counts_BE = counts_BE.to(torch.float64)
    f_BE = (counts_BE / counts_BE.sum(dim=1, keepdim=True).clamp(min=1)).to(scores_BSE.dtype)
    term_BE = f_BE * _mean(scores_BSE, mask_BS, dim=1)
    if weights_E is not None:
        term_BE = term_BE * weights_E.to(scores_BSE.dtype)
    per_seq_B = num_experts * term_BE.sum(dim=1)
    return per_seq_B.mean() if mask_BS is None else _mean(per_seq_B, mask_BS.any(dim=1))


def layer_losses(
    rc,
    router,
    balance,
    x: torch.Tensor,
    route,
    routed_E: torch.Tensor,
    count_globally: bool,
    recomputing: bool,
    sequence_first: bool = False,
    mask_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoE layer call's (balancing loss, z-loss), before their coefficients, as the router
    config `rc`'s `aux_loss_type` asks: per micro-batch, global-batch (counts summed over the
    `BalanceState` `balance`'s group, counted once under recomputation) or per sequence (`x` read
    as `[B, S, D]`, or `[S, B, D]` with `sequence_first`). `routed_E`: the pairs per choice of
    the tokens `mask_T` keeps (`masked_counts`); padding counts in none of the terms."""
    scores_TE = route.scores_TE
    weights_E = router.balance_weights()
    zero = route.logits_TE.sum() * 0.0
    aux = zero
    if rc.aux_loss_type == "aux_loss":
        aux = balance_loss(scores_TE, router.balance_counts(routed_E), weights_E, mask_T)
    elif rc.aux_loss_type == "global_aux_loss":
        counts_E = balance.global_counts(routed_E, count_globally, recomputing)
        aux = balance_loss(scores_TE, router.balance_counts(counts_E), weights_E, mask_T)
    elif rc.aux_loss_type == "seq_aux_loss":
        num_choices = scores_TE.shape[1]
        one_hot = torch.zeros_like(scores_TE).scatter_(1, route.expert_ids_TK, 1.0)
        if mask_T is not None:  # padding's choices count in no sequence's f
            one_hot = one_hot * mask_T.to(scores_TE.dtype).unsqueeze(1)
        mask_BS = None
        if x.dim() >= 3 and sequence_first:  # tokens in [S, B] order: regroup per sequence
            seq_len = x.shape[0]
            scores_BSE = scores_TE.view(seq_len, -1, num_choices).transpose(0, 1)
            one_hot_BSE = one_hot.view(seq_len, -1, num_choices).transpose(0, 1)
            if mask_T is not None:
                mask_BS = mask_T.view(seq_len, -1).transpose(0, 1)
        else:
            seq_len = max(x.shape[-2] if x.dim() >= 3 else scores_TE.shape[0], 1)
            scores_BSE = scores_TE.view(-1, seq_len, num_choices)
            one_hot_BSE = one_hot.view(-1, seq_len, num_choices)
            if mask_T is not None:
                mask_BS = mask_T.view(-1, seq_len)
        counts_BE = router.balance_counts(one_hot_BSE.sum(dim=1))
        aux = seq_balance_loss(scores_BSE, counts_BE, weights_E, mask_BS)
    zl = z_loss(route.logits_TE, mask_T) if rc.z_loss_coeff > 0 else zero
    return aux, zl
