"""Top-k routing: logits -> (weights, expert ids), softmax or sigmoid scores (PAPERS.md, baseline).

Legend: T tokens, D model dim, E experts, K top-k. Router math runs in fp32 (fp64 for fp64 inputs or
`router_dtype="fp64"`), outside any autocast region.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.moe.config import RouterConfig


@dataclass(frozen=True)
class RouterOutput:
    """What a router hands to the layer.

    `weights_TK` / `expert_ids_TK`: the k choices per token, best first. `scores_TE`: the
    full-distribution probabilities the balancing loss uses (softmax over all experts, or sigmoid
    scores normalised per token). `logits_TE`: raw logits, for the z-loss.
    """

    weights_TK: torch.Tensor
    expert_ids_TK: torch.Tensor
    scores_TE: torch.Tensor
    logits_TE: torch.Tensor


def topk_routing(
    logits_TE: torch.Tensor, config: RouterConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure top-k routing on logits. Returns `(weights_TK, expert_ids_TK, scores_TE)`.

    Matches Megatron-Core's `topk_routing_with_score_function` (pre/post softmax, sigmoid with
    normalisation) and, with `pre_softmax=True, normalize_topk=True`, DeepSpeed's `topkgating`.
    """
    k = config.top_k
    if config.score_function == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
        if config.pre_softmax:
            weights_TK, ids_TK = torch.topk(scores_TE, k, dim=-1)
            if config.normalize_topk:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        else:
            # The softmax over the k selected logits is normalised by construction.
            top_logits_TK, ids_TK = torch.topk(logits_TE, k, dim=-1)
            weights_TK = torch.softmax(top_logits_TK, dim=-1)
    else:
        sig_TE = torch.sigmoid(logits_TE)
        weights_TK, ids_TK = torch.topk(sig_TE, k, dim=-1)
        if config.normalize_topk:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        scores_TE = sig_TE / (sig_TE.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK, ids_TK, scores_TE


class TopKRouter(nn.Module):
    """Linear gate `W_r: D -> E` (no bias) followed by `topk_routing`.

    The gate is initialised N(0, 0.02) like Megatron's router, so early routing is near uniform.
    """

    def __init__(self, hidden_size: int, num_experts: int, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.config.router_dtype == "fp64" or x.dtype == torch.float64:
            return torch.float64
        return torch.float32

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        dtype = self.compute_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x = x_TD.to(dtype)
            eps = self.config.input_jitter_eps
            if eps is not None and self.training:
                x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
            logits_TE = F.linear(x, self.weight.to(dtype))
            weights_TK, ids_TK, scores_TE = topk_routing(logits_TE, self.config)
        return RouterOutput(weights_TK, ids_TK, scores_TE, logits_TE)
