"""MoE++: zero-computation experts beside the FFN experts, and gating residuals (docs/methods.md,
"MoE++").

Legend: T tokens, D model dim, N FFN experts, Z zero-computation experts (zero, copy, constant),
E = N + Z, K top-k.

`logits_l = x W_l + G_l(logits_{l-1})`: `G_l` is a bias-free `E x E` map fed the previous MoE
layer's logits (after its own residual), read from the routing context; the first MoE layer has
none. `G_l` starts at zero, so a fresh model routes as plain top-k and learns the recurrence. The
weights come from `topk_routing` with the layer's router settings. Balancing loss: `E * sum_i eta_i
f_i P_i` with eta = 1 for FFN experts and `zc_tau` for zero-computation ones; after balancing an
FFN expert takes `K * tau*N / (tau*N + Z)` slots per token on average.

The experts themselves (`ZeroComputationExperts`) live in the layer and run on the token's rank.

Example:
    >>> from moeflow.moe.config import MoEConfig, RouterConfig
    >>> cfg = MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=8, router=RouterConfig(
    ...     type="moepp", zero_experts=1, copy_experts=1, constant_experts=2, zc_tau=0.5))
    >>> r = MoEPlusPlusRouter(cfg)
    >>> r.expert_kinds[4:], r.balance_weights().tolist()
    (('zero', 'copy', 'constant', 'constant'), [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.moe.config import MoEConfig
from moeflow.moe.routers.base import Router, RouterOutput
from moeflow.moe.routers.registry import register_router
from moeflow.moe.routers.topk import topk_routing


class MoEPlusPlusRouter(Router):
    """Gate `W: D -> E` (no bias, N(0, 0.02)) plus the gating residual `G: E -> E` (zeros)."""

    def __init__(self, config: MoEConfig) -> None:
        rc = config.router
        kinds = ("zero",) * rc.zero_experts + ("copy",) * rc.copy_experts
        super().__init__(config, kinds + ("constant",) * rc.constant_experts)
        self.weight = nn.Parameter(torch.empty(self.num_choices, config.hidden_size))
        self.residual = None
        if rc.gating_residual:
            self.residual = nn.Parameter(torch.empty(self.num_choices, self.num_choices))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.weight, std=0.02, generator=generator)
        if self.residual is not None:
            nn.init.zeros_(self.residual)

    def balance_weights(self) -> torch.Tensor:
        eta = torch.ones(self.num_choices, dtype=torch.float64, device=self.weight.device)
        eta[self.num_experts :] = self.config.zc_tau
        return eta

    def forward(self, x_TD: torch.Tensor, context=None) -> RouterOutput:
        dtype = self.compute_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(self.prepare_input(x_TD), self.weight.to(dtype))
            previous = None if context is None else context.previous_logits
            if self.residual is not None and previous is not None:
                if previous.shape != logits_TE.shape:
                    raise ValueError(
                        f"MoE++ gating residual: the previous MoE layer's logits have shape "
                        f"{tuple(previous.shape)}, this layer's {tuple(logits_TE.shape)}; every "
                        "MoE++ layer of a model needs the same number of experts"
                    )
                logits_TE = logits_TE + F.linear(previous.to(dtype), self.residual.to(dtype))
            weights_TK, ids_TK, scores_TE = topk_routing(
                logits_TE, self.config, self.selection_bias()
            )
        return RouterOutput(weights_TK, ids_TK, scores_TE, logits_TE)


class ZeroComputationExperts(nn.Module):
    """MoE++'s zero (`0`), copy (`x`) and constant (`a1*x + a2*v_j`, `[a1, a2] = softmax(W_j x)`)
    experts. `forward(x, ids, weights)` takes ids relative to these experts (0 = the first of
    `kinds`) and returns the weighted sum of their outputs for every token; other ids (negative
    for FFN experts) contribute nothing. `v_j ~ N(0, 1)`, `W_j` N(0, 0.02)."""

    def __init__(self, kinds: tuple[str, ...], hidden_size: int) -> None:
        super().__init__()
        self.kinds = kinds
        self.copy_ids = [i for i, k in enumerate(kinds) if k == "copy"]
        self.constant_ids = [i for i, k in enumerate(kinds) if k == "constant"]
        n_const = len(self.constant_ids)
        self.const_gate = nn.Parameter(torch.empty(n_const, 2, hidden_size))
        self.const_value = nn.Parameter(torch.empty(n_const, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.const_gate, std=0.02, generator=generator)
        nn.init.normal_(self.const_value, std=1.0, generator=generator)

    @property
    def active(self) -> bool:
        return bool(self.copy_ids or self.constant_ids)

    def forward(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> torch.Tensor:
        out_TD = torch.zeros_like(x_TD)
        w_TK = weights_TK.to(x_TD.dtype)
        if self.copy_ids:
            copy_TK = torch.isin(ids_TK, torch.tensor(self.copy_ids, device=ids_TK.device))
            out_TD = out_TD + (w_TK * copy_TK).sum(dim=1, keepdim=True) * x_TD
        for j, expert in enumerate(self.constant_ids):
            coeff_T1 = (w_TK * (ids_TK == expert)).sum(dim=1, keepdim=True)
            a_T2 = torch.softmax(F.linear(x_TD, self.const_gate[j].to(x_TD.dtype)), dim=-1)
            value = a_T2[:, :1] * x_TD + a_T2[:, 1:] * self.const_value[j].to(x_TD.dtype)
            out_TD = out_TD + coeff_T1 * value
        return out_TD


register_router("moepp", lambda config, shared: MoEPlusPlusRouter(config))
