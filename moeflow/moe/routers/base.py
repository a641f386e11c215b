"""The router interface: what every router gives the MoE layer.

Legend: T tokens, D model dim, E choices (FFN experts first, then any null or zero-computation
experts), K top-k.

A router is an `nn.Module` subclassing `Router`. `forward(x_TD, context)` returns a `RouterOutput`
with ids in `[0, E)`; ids `>= num_experts` name the router's non-FFN choices (`expert_kinds` says
which: "null", "zero", "copy", "constant"). The layer computes those on the token's own rank: they
never enter the all-to-all. A router that carries state from one MoE layer to the next reads and
writes it in the `RoutingContext` (never in itself or a global). The balancing loss is
`E * sum_i w_i f_i P_i`, with `f` from `balance_counts(counts)` and `w = balance_weights()`: a
router changes the loss by overriding those two.

Every router gets aux-loss-free balancing for free: `expert_bias` (a persistent buffer, so
checkpoints keep it) is added to the selection scores only, and `MoELayer.finish_optimizer_step`
updates it.

Example:
    >>> class FirstExpert(Router):   # a user router: every token to expert 0 and 1
    ...     def forward(self, x_TD, context=None):
    ...         logits_TE = self.gate(x_TD)
    ...         ids_TK = torch.tensor([[0, 1]]).expand(x_TD.shape[0], 2)
    ...         w_TK = torch.full(ids_TK.shape, 0.5)
    ...         return RouterOutput(w_TK, ids_TK, logits_TE.softmax(-1), logits_TE)
    ...     def __init__(self, config):
    ...         super().__init__(config)
    ...         self.gate = torch.nn.Linear(config.hidden_size, config.num_experts, bias=False)
    >>> from moeflow.moe.config import MoEConfig
    >>> r = FirstExpert(MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=8))
    >>> r(torch.randn(3, 8)).expert_ids_TK.tolist()
    [[0, 1], [0, 1], [0, 1]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeflow.moe.config import MoEConfig

EXPERT_KINDS = ("ffn", "null", "zero", "copy", "constant")


@dataclass(frozen=True)
class RouterOutput:
    """What a router hands to the layer.

    `weights_TK` / `expert_ids_TK`: the k choices per token, best first (ids over all E choices).
    `scores_TE`: the full-distribution probabilities the balancing loss uses. `logits_TE`: raw
    logits, for the z-loss and for the next layer's gating residual. `keep_TK`: for a router that
    drops pairs itself (DeepSpeed's gating), False where a pair is dropped; None keeps every pair
    (the layer's own capacity, if configured, still applies).
    """

    weights_TK: torch.Tensor
    expert_ids_TK: torch.Tensor
    scores_TE: torch.Tensor
    logits_TE: torch.Tensor
    keep_TK: torch.Tensor | None = None


class Router(nn.Module):
    """Base class of routers: the config, the kinds of the E choices, the selection bias."""

    def __init__(self, config: MoEConfig, extra_kinds: tuple[str, ...] = ()) -> None:
        super().__init__()
        for kind in extra_kinds:
            if kind not in EXPERT_KINDS[1:]:
                raise ValueError(f"router expert kind {kind!r} must be one of {EXPERT_KINDS[1:]}")
        self.moe_config = config
        self.config = config.router
        self.num_experts = config.num_experts
        self.expert_kinds = ("ffn",) * config.num_experts + tuple(extra_kinds)
        # Aux-loss-free balancing: added to the selection scores only (zeros when unused).
        self.register_buffer("expert_bias", torch.zeros(self.num_choices))

    @property
    def num_choices(self) -> int:
        return len(self.expert_kinds)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise the router's own parameters (the decoder calls it with its generator)."""

    def selection_bias(self) -> torch.Tensor | None:
        return self.expert_bias if self.config.bias_update_rate > 0 else None

    def balance_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Counts that define f in the balancing loss (AdaMoE averages its null experts')."""
        return counts_E

    def balance_weights(self) -> torch.Tensor | None:
        """Per-choice weights w of the balancing loss (MoE++'s tau); None means all 1."""
        return None

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.config.router_dtype == "fp64" or x.dtype == torch.float64:
            return torch.float64
        return torch.float32

    def prepare_input(self, x_TD: torch.Tensor) -> torch.Tensor:
        """`x` in the router's dtype, with multiplicative jitter in training if configured."""
        x = x_TD.to(self.compute_dtype(x_TD))
        eps = self.config.input_jitter_eps
        if eps is not None and self.training:
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        return x
