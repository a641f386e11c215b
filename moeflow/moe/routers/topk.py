"""Top-k routing: logits -> (weights, expert ids), softmax or sigmoid scores (docs/methods.md,
"Top-k routing").

Legend: T tokens, D model dim, E experts, K top-k. Router math runs in fp32 (fp64 for fp64 inputs or
`router_dtype="fp64"`), outside any autocast region.

Example:
    >>> from moeflow.moe.config import RouterConfig
    >>> w, ids, _ = topk_routing(torch.tensor([[0.0, 2.0, 1.0]]), RouterConfig(top_k=2))
    >>> ids.tolist(), [round(v, 3) for v in w[0].tolist()]
    ([[1, 2]], [0.731, 0.269])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.moe.config import MoEConfig, RouterConfig
from moeflow.moe.routers.base import Router, RouterOutput
from moeflow.moe.routers.registry import register_router

__all__ = ["RouterOutput", "TopKRouter", "topk_routing"]


def _select(
    key_TE: torch.Tensor, config: RouterConfig, bias_E: torch.Tensor | None
) -> torch.Tensor:
    """The k choices of each token, best first: top-k of the key (plus the selection bias),
    within each token's `topk_group` best groups when the experts are grouped."""
    if bias_E is not None:
        key_TE = key_TE + bias_E.to(key_TE.dtype)
    if config.n_group > 1:
        key_TE = limit_groups(key_TE, config)
    return torch.topk(key_TE, config.top_k, dim=-1).indices


def limit_groups(key_TE: torch.Tensor, config: RouterConfig) -> torch.Tensor:
    """`key_TE` with every expert outside the token's `topk_group` best groups at -inf; a group
    scores by its best key (softmax scores) or its best two summed (sigmoid), as DeepSeek-V2 and
    -V3 do.

    Example:
        >>> key = torch.tensor([[0.9, 0.0, 0.5, 0.45]])  # groups {0, 1} and {2, 3}
        >>> limit_groups(key, RouterConfig(score_function="sigmoid", n_group=2))  # best two
        tensor([[  -inf,   -inf, 0.5000, 0.4500]])
        >>> limit_groups(key, RouterConfig(n_group=2))  # softmax scores: the best one
        tensor([[0.9000, 0.0000,   -inf,   -inf]])
    """
    t, e = key_TE.shape
    grouped_TGe = key_TE.view(t, config.n_group, e // config.n_group)
    if config.score_function == "sigmoid":
        group_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_TG = grouped_TGe.amax(dim=-1)
    kept_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    kept_TG.scatter_(1, group_TG.topk(config.topk_group, dim=-1).indices, True)
    kept_TE = kept_TG.repeat_interleave(e // config.n_group, dim=1)
    return key_TE.masked_fill(~kept_TE, float("-inf"))


SOFTMAX_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def topk_routing(
    logits_TE: torch.Tensor, config: RouterConfig, bias_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure top-k routing on logits. Returns `(weights_TK, expert_ids_TK, scores_TE)`.

    Matches Megatron-Core's `topk_routing_with_score_function` (pre/post softmax, sigmoid with
    normalisation) and, with `pre_softmax=True, normalize_topk=True`, DeepSpeed's `topkgating`.
    `bias_E` (aux-loss-free balancing) is added to the selection key only (the logits for a
    post-softmax, the scores otherwise); the weights come from the unbiased values. Grouped
    experts (`n_group`) limit the choice to each token's best groups; `routed_scaling_factor`
    scales the weights last (DeepSeek-V2/V3).
    """
    if config.score_function == "softmax":
        dtype = SOFTMAX_DTYPES.get(config.softmax_dtype)  # None: the logits' own
        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=dtype)
        if config.pre_softmax:
            ids_TK = _select(scores_TE, config, bias_E)
            weights_TK = scores_TE.gather(1, ids_TK)
            if config.normalize_topk:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        else:
            # The softmax over the k selected logits is normalised by construction.
            ids_TK = _select(logits_TE, config, bias_E)
            weights_TK = torch.softmax(logits_TE.gather(1, ids_TK), dim=-1, dtype=dtype)
        weights_TK, scores_TE = weights_TK.to(logits_TE.dtype), scores_TE.to(logits_TE.dtype)
    else:
        sig_TE = torch.sigmoid(logits_TE)
        ids_TK = _select(sig_TE, config, bias_E)
        weights_TK = sig_TE.gather(1, ids_TK)
        if config.normalize_topk:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        scores_TE = sig_TE / (sig_TE.sum(dim=-1, keepdim=True) + 1e-20)
    if config.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * config.routed_scaling_factor
    return weights_TK, ids_TK, scores_TE


class TopKRouter(Router):
    """Linear gate `W_r: D -> E` (no bias) followed by `topk_routing`.

    The gate is initialised N(0, 0.02) like Megatron's router, so early routing is near uniform.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        std = 0.02
        nn.init.normal_(self.weight, mean=0.0, std=std, generator=generator)

    def forward(self, x_TD: torch.Tensor, context=None) -> RouterOutput:
        dtype = self.compute_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(self.prepare_input(x_TD), self.weight.to(dtype))
            weights_TK, ids_TK, scores_TE = topk_routing(
                logits_TE, self.config, self.selection_bias()
            )
        return RouterOutput(weights_TK, ids_TK, scores_TE, logits_TE)


register_router("topk", lambda config, shared: TopKRouter(config))
