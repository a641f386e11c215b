"""RoutingContext: state that flows from one MoE layer to the next within a forward pass.

Some routers read the previous MoE layer's routing (MoE++'s gating residual reads its logits, RMoE's
recurrent router its hidden state). The model creates one context per forward and passes it to every
MoE layer in order; nothing is kept in a global, so two models, or two micro-batches, never share
it.

Example:
    >>> ctx = RoutingContext()
    >>> ctx.layers_seen, ctx.previous_logits is None
    (0, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoutingContext:
    """`previous_logits`: the last MoE layer's router logits `[T, E]` (with their graph);
    `state`: named router state (e.g. a recurrent hidden state), for routers that need it."""

    previous_logits: torch.Tensor | None = None
    layers_seen: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    # True while activation checkpointing recomputes a block: layers skip side effects.
    recomputing: bool = False

    def copy(self) -> RoutingContext:
        """A shallow copy (same tensors, own `state` dict): a snapshot that later layers' records
        do not change."""
        return RoutingContext(
            self.previous_logits, self.layers_seen, dict(self.state), self.recomputing
        )

    def record(self, logits_TE: torch.Tensor) -> None:
        self.previous_logits = logits_TE
        self.layers_seen += 1
