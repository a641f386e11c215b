"""Expert capacity and token dropping, as pure functions (no communication).

Legend: T tokens, E experts, K top-k. A "pair" is one (token, slot) choice; pair index = t*K + k.
"""

from __future__ import annotations

import math

import torch

from moeflow.comm.host_read import count_per_value, read_to_host


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int = 0
) -> int:
    """`C = max(ceil(T*K/E * capacity_factor), min_capacity)`.

    Megatron's `get_capacity` with `min_capacity=0`; DeepSpeed applies `min_capacity` (default 4).
    """
    capacity = math.ceil(num_tokens * top_k / num_experts * capacity_factor)
    return max(capacity, min_capacity)


def nothing_dropped(counts_E: torch.Tensor, capacity: int) -> bool:
    """True where the pairs routed to each expert (`counts_E`) are known to fit `capacity`, so
    `capacity_keep_mask` would keep every pair and need not run (its sort costs ~0.8 ms at 8192
    pairs on a CPU core pair, 1% of a coarse layer step).

    Only read where the counts live on the CPU, where reading them is free. On an accelerator
    the answer is False (run the mask): reading them would be a host sync of its own, before the
    dispatcher's one count exchange.

    Example:
        >>> nothing_dropped(torch.tensor([3, 5, 4]), capacity=5)
        True
        >>> nothing_dropped(torch.tensor([6, 1]), capacity=5)
        False
    """
    if counts_E.device.type != "cpu":
        return False
    return counts_E.numel() == 0 or read_to_host(counts_E.max(), "CPU loads") <= capacity


def rank_within_expert(
    expert_ids: torch.Tensor, priority: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """For each pair, how many pairs of the same expert come before it in `priority` order.

    `priority` must be distinct per pair (lower is earlier). Sorting is stable and deterministic.
    """
    n = expert_ids.numel()
    # One sort on a combined key: expert major, priority minor.
    key = expert_ids.to(torch.int64) * n + priority
    return _ranks(expert_ids, torch.argsort(key, stable=True), num_experts)


def _ranks(expert_ids: torch.Tensor, order: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each pair's rank within its expert, given `order`: the pairs sorted expert-major."""
    n = expert_ids.numel()
    counts = count_per_value(expert_ids, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    sorted_experts = expert_ids[order]
    ranks_sorted = torch.arange(n, device=expert_ids.device) - starts[sorted_experts]
    ranks = torch.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def _by_weight_order(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    """Pairs sorted by expert, then weight descending, then pair index, in one stable sort of an
    int64 key (expert in the high 32 bits, the weight's fp32 bit pattern mapped to an order-
    preserving unsigned integer in the low 32, reversed): None for float64 weights, whose order
    does not fit in 32 bits."""
    if weights.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    bits = weights.float().view(torch.int32).to(torch.int64)
    # IEEE floats compare as their bit patterns when non-negative; negative ones in reverse
    # (and -0.0 equals +0.0).
    key = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # in (-2^31, 2^31)
    descending = (2**31 - 1) - key  # in [0, 2^32)
    return torch.argsort(ids.to(torch.int64) * 2**32 + descending, stable=True)


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
        order = _by_weight_order(ids, weights_TK.reshape(-1).detach())
        if order is not None:
            return (_ranks(ids, order, num_experts) < capacity).view(num_tokens, top_k)
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
