"""AdaMoE: null experts, a token-adaptive number of FFN experts (docs/methods.md, "AdaMoE").

Legend: T tokens, D model dim, n true (FFN) experts, m null experts, E = n + m, K top-k.

`logits = [x W_true ; x W_null]`, softmax over all n + m, top-K over all of them. The weights are
renormalised over the selected **true** experts only; a null pick outputs 0, costs no FLOPs and
moves no bytes; a token whose K picks are all null gets 0 (the residual carries it). The balancing
loss runs over n + m choices with the null experts' counts replaced by their mean.

Tie rule: equal scores are ranked in the column order `true 0, its nulls, true 1, its nulls, ...`
(null j belongs to true `j % n`), earlier first. It makes `convert_topk_to_null` exact: with
`W_null[j] = W_true[j % n]`, `m = r*n` and `K' = (1 + r)*K`, the top-K' picks are each of the old
top-K experts with its r null copies, also when old logits tie at the K-th place.

Example:
    >>> from moeflow.moe.config import MoEConfig, RouterConfig
    >>> cfg = MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=8,
    ...                 router=RouterConfig(type="null", num_null_experts=4, top_k=2))
    >>> out = NullExpertRouter(cfg)(torch.randn(5, 8))
    >>> out.scores_TE.shape, bool(((out.weights_TK > 0) == (out.expert_ids_TK < 4)).all())
    (torch.Size([5, 8]), True)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.moe.config import MoEConfig
from moeflow.moe.routers.base import Router, RouterOutput
from moeflow.moe.routers.registry import register_router


def tie_order(n: int, m: int) -> list[int]:
    """Column order that breaks ties: each true expert, then the null experts paired with it."""
    order = []
    for i in range(n):
        order.append(i)
        order.extend(n + j for j in range(m) if j % n == i)
    return order


def null_routing(
    logits_TE: torch.Tensor, n: int, k: int, bias_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(weights_TK, ids_TK, scores_TE)`: softmax over n + m, top-k with the tie rule, weights
    renormalised over the selected true experts (0 for null picks)."""
    m = logits_TE.shape[1] - n
    scores_TE = torch.softmax(logits_TE, dim=-1)
    order = torch.tensor(tie_order(n, m), device=logits_TE.device)
    key_TE = scores_TE if bias_E is None else scores_TE + bias_E.to(scores_TE.dtype)
    ranked = torch.argsort(key_TE[:, order], dim=-1, descending=True, stable=True)[:, :k]
    ids_TK = order[ranked]
    probs_TK = scores_TE.gather(1, ids_TK) * (ids_TK < n)
    total_T1 = probs_TK.sum(dim=-1, keepdim=True)
    weights_TK = probs_TK / torch.where(total_T1 > 0, total_T1, torch.ones_like(total_T1))
    return weights_TK, ids_TK, scores_TE


class NullExpertRouter(Router):
    """Gates `W_true: D -> n` and `W_null: D -> m` (no bias), both N(0, 0.02)."""

    def __init__(self, config: MoEConfig) -> None:
        rc = config.router
        if rc.score_function != "softmax":
            raise ValueError(
                f"moe.router.score_function ({rc.score_function!r}) must be 'softmax' for "
                "router.type = 'null' (AdaMoE's softmax runs over true and null experts)"
            )
        super().__init__(config, ("null",) * rc.num_null_experts)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.null_weight = nn.Parameter(torch.empty(rc.num_null_experts, config.hidden_size))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.weight, std=0.02, generator=generator)
        nn.init.normal_(self.null_weight, std=0.02, generator=generator)

    def balance_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        n = self.num_experts
        out = counts_E.to(torch.float64).clone()
        out[..., n:] = out[..., n:].mean(dim=-1, keepdim=True)
        return out

    def forward(self, x_TD: torch.Tensor, context=None) -> RouterOutput:
        dtype = self.compute_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x = self.prepare_input(x_TD)
            w = torch.cat([self.weight, self.null_weight]).to(dtype)
            logits_TE = F.linear(x, w)
            weights_TK, ids_TK, scores_TE = null_routing(
                logits_TE, self.num_experts, self.config.top_k, self.selection_bias()
            )
        return RouterOutput(weights_TK, ids_TK, scores_TE, logits_TE)


def null_router_from_topk(
    old: nn.Module, cfg: MoEConfig, num_null_experts: int, top_k: int
) -> tuple[NullExpertRouter, MoEConfig]:
    """AdaMoE's conversion of a trained top-k router: `W_null[j] = W_true[j % n]` and `top_k`
    raised; returns the new router and the layer config it belongs to (the layer installs them:
    `MoELayer.set_router`)."""
    n = cfg.num_experts
    rc = dataclasses.replace(cfg.router, type="null", num_null_experts=num_null_experts,
                             top_k=top_k)  # fmt: skip
    new_cfg = dataclasses.replace(cfg, router=rc)
    router = NullExpertRouter(new_cfg).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        router.weight.copy_(old.weight)
        router.null_weight.copy_(old.weight[torch.arange(num_null_experts) % n])
    router.train(old.training)
    return router, new_cfg


def convert_topk_to_null(layer: nn.Module, num_null_experts: int, top_k: int) -> None:
    """Turn a trained top-k `MoELayer` into an AdaMoE layer in place. With `num_null_experts = r *
    n` and `top_k = (1 + r) * k` the converted layer computes exactly what the original did (see
    the tie rule) until training moves it; the original must weight its top-k normalised
    (post-softmax, or `normalize_topk`)."""
    layer.set_router(*null_router_from_topk(layer.router, layer.config, num_null_experts, top_k))


register_router("null", lambda config, shared: NullExpertRouter(config))
