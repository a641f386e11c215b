"""MoEStats: what one MoE layer's forward measured (routing balance, drops, FFN experts per token).

Legend: T tokens, K top-k, E FFN experts (plus null or zero-computation choices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.comm.host_read import count_per_value
from moeflow.comm.pipeline import ChunkPlan
from moeflow.moe.routers.base import RouterOutput


@dataclass(frozen=True)
class MoEStats:
    """What the last forward measured, detached (read them with `.item()` when logging).

    `aux_loss` / `z_loss` are the unscaled loss values (before their coefficients);
    `tokens_per_expert` counts the pairs each FFN expert computed (after drops); `dropped_fraction`
    is the share of FFN (token, slot) pairs dropped by capacity; `max_load_violation` is `(max_i
    routed_i - mean) / mean` over the FFN experts before drops (DeepSeek's MaxVio; 0 is perfect
    balance). `routed_per_choice` counts the pairs of every choice (null and zero-computation
    experts too); `ffn_experts_per_token` is the mean number of FFN experts that computed each
    token, and `ffn_experts_histogram[j]` the number of tokens that got j of them. `expert_ids`
    are the `[T, K]` logical choices (routing statistics). The traffic of the call: its parallel
    `mode`, the (token, slot) rows the forward all-to-all sent to other ranks (`sent_rows`,
    `sent_bytes`: a row is the token's values, and the pair's router weight where the experts
    apply it (F <= D, `MoEConfig`); null and zero-computation pairs never travel), the
    expert-weight bytes its gather received (`gathered_bytes`), and the dispatch plan
    (`dispatch`: split sizes and expert blocks of every chunk).

    Example:
        >>> from moeflow.moe.config import MoEConfig
        >>> from moeflow.moe.layer import MoELayer
        >>> moe = MoELayer(MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=8))
        >>> _ = moe(torch.randn(6, 8))
        >>> moe.last_stats.dropped_fraction.item()
        0.0
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor
    max_load_violation: torch.Tensor
    routed_per_choice: torch.Tensor
    ffn_experts_per_token: torch.Tensor
    ffn_experts_histogram: torch.Tensor
    expert_ids: torch.Tensor
    traffic: Traffic


@dataclass(frozen=True)
class Traffic:
    """What one forward moved between ranks (see `MoEStats`)."""

    mode: str
    sent_rows: int
    sent_bytes: int
    gathered_bytes: int
    dispatch: ChunkPlan


def measure_stats(
    routed_E: torch.Tensor,
    kept_E: torch.Tensor,
    keep_TK: torch.Tensor | None,
    losses: tuple[torch.Tensor, torch.Tensor],
    route: RouterOutput,
    num_experts: int,
    top_k: int,
    traffic: Traffic,
) -> MoEStats:
    """The stats of one forward from its routed and kept counts (detached, on the device: no
    host sync). `keep_TK`: the pairs an FFN expert computed (None: all of them)."""
    n, k = num_experts, top_k
    with torch.no_grad():
        routed_ffn = routed_E[:n].float()
        num_ffn_pairs = routed_ffn.sum()
        dropped = (num_ffn_pairs - kept_E.sum()) / num_ffn_pairs.clamp(min=1)
        mean = routed_ffn.mean().clamp(min=1e-9)
        if keep_TK is None:
            ffn_T = torch.full(route.expert_ids_TK.shape[:1], k, device=routed_E.device)
        else:
            ffn_T = keep_TK.sum(dim=1)
        return MoEStats(
            aux_loss=losses[0].detach(),
            z_loss=losses[1].detach(),
            tokens_per_expert=kept_E.detach(),
            dropped_fraction=dropped,
            max_load_violation=(routed_ffn.max() - mean) / mean
            if route.expert_ids_TK.numel()
            else mean * 0,
            routed_per_choice=routed_E.detach(),
            ffn_experts_per_token=ffn_T.float().mean()
            if ffn_T.numel()
            else torch.zeros((), device=routed_E.device),
            ffn_experts_histogram=count_per_value(ffn_T, k + 1),
            expert_ids=route.expert_ids_TK.detach(),
            traffic=traffic,
        )
