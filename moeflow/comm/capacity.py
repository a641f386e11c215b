"""Expert capacity and token dropping, as pure functions (no communication).

Legend: T tokens, E experts, K top-k. A "pair" is one (token, slot) choice; pair index = t*K + k.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int = 0
) -> int:
    """`C = max(ceil(T*K/E * capacity_factor), min_capacity)`.

    Megatron's `get_capacity` with `min_capacity=0`; DeepSpeed applies `min_capacity` (default 4).
    """
    capacity = math.ceil(num_tokens * top_k / num_experts * capacity_factor)
    return max(capacity, min_capacity)


def rank_within_expert(
    expert_ids: torch.Tensor, priority: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """For each pair, how many pairs of the same expert come before it in `priority` order.

    `priority` must be distinct per pair (lower is earlier). Sorting is stable and deterministic.
    """
    n = expert_ids.numel()
    # One sort on a combined key: expert major, priority minor.
    key = expert_ids.to(torch.int64) * n + priority
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(expert_ids, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    sorted_experts = expert_ids[order]
    ranks_sorted = torch.arange(n, device=expert_ids.device) - starts[sorted_experts]
    ranks = torch.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def capacity_keep_mask(
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    drop_policy: str,
) -> torch.Tensor:
    """Bool `[T, K]`: which pairs keep a slot when each expert takes at most `capacity` pairs.

    - `"probs"`: per expert, the pairs with the highest weight (ties: earlier pair first). Same
      selection as Megatron's `apply_router_token_dropping(drop_policy="probs")`.
    - `"position"`: first choices before second choices, then token order (GShard/DeepSpeed
      `top2gating`). Megatron's "position" ranks by token order only; the two agree for K=1.
    """
    num_tokens, top_k = expert_ids_TK.shape
    ids = expert_ids_TK.reshape(-1)
    n = ids.numel()
    if drop_policy == "probs":
        # Priority = position in a stable descending sort of the weights.
        by_weight = torch.argsort(weights_TK.reshape(-1).detach(), descending=True, stable=True)
        priority = torch.empty_like(by_weight)
        priority[by_weight] = torch.arange(n, device=ids.device)
    elif drop_policy == "position":
        t = torch.arange(num_tokens, device=ids.device).repeat_interleave(top_k)
        k = torch.arange(top_k, device=ids.device).repeat(num_tokens)
        priority = k * num_tokens + t
    else:
        raise ValueError(f"drop_policy ({drop_policy!r}) must be 'probs' or 'position'")
    ranks = rank_within_expert(ids, priority, num_experts)
    return (ranks < capacity).view(num_tokens, top_k)
