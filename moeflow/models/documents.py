"""Windows of packed documents: which document each position belongs to, and the attention mask
and rotary positions that make a window compute what each of its documents alone would.

Example:
    >>> document_ids(torch.tensor([[4, 0, 6, 0]]), eod_id=0)
    tensor([[0, 0, 1, 1]])
"""

from __future__ import annotations

import torch

__all__ = ["document_attention", "document_ids"]


def document_ids(tokens_BS: torch.Tensor, eod_id: int) -> torch.Tensor:
    """The document each position belongs to inside its window, int64 `[B, S]`: documents end
    with `eod_id` (the end-of-document token belongs to the document it closes; the position
    after it starts the next), so this is the exclusive cumulative count of `eod_id` along S.
    Hand it to `MoEDecoder(tokens, document_ids_BS=...)` to keep attention inside documents.

    Example:
        >>> document_ids(torch.tensor([[5, 7, 0, 3, 0, 9]]), eod_id=0)
        tensor([[0, 0, 0, 1, 1, 2]])
    """
    eod_BS = (tokens_BS == eod_id).long()
    return eod_BS.cumsum(-1) - eod_BS


def document_attention(document_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`mask_B1SS`, `positions_BS`) for windows of packed documents: each run of equal
    neighbouring ids is one document; position i attends to j when j <= i in the same run (a
    boolean `attn_mask` for `F.scaled_dot_product_attention`, True = attend), and its rotary
    position is its offset from its run's start. Ids that recur after another document start a
    new document, so `[0, 1, 0]` is three documents.

    Example:
        >>> mask, positions = document_attention(torch.tensor([[0, 0, 1]]))
        >>> positions, mask[0, 0].int()
        (tensor([[0, 1, 0]]), tensor([[1, 0, 0],
                [1, 1, 0],
                [0, 0, 1]], dtype=torch.int32))
    """
    s = document_ids_BS.shape[1]
    index_S = torch.arange(s, device=document_ids_BS.device)
    starts_BS = torch.ones_like(document_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = document_ids_BS[:, 1:] != document_ids_BS[:, :-1]
    run_BS = starts_BS.cumsum(-1)
    start_BS = torch.where(starts_BS, index_S, 0).cummax(-1).values
    causal_SS = torch.ones(s, s, dtype=torch.bool, device=document_ids_BS.device).tril()
    mask_BSS = (run_BS[:, :, None] == run_BS[:, None, :]) & causal_SS
    return mask_BSS[:, None], index_S - start_BS
