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
    # 1 for a real token, 0 for padding, in the order of the layers' flattened input `[T]` (e.g.
    # an attention mask `[B, S]`): padding counts in no balancing loss or count. None: all count.
    token_mask: torch.Tensor | None = None

    def copy(self) -> RoutingContext:
        """A shallow copy (same tensors, own `state` dict): a snapshot that later layers' records
        do not change."""
        return RoutingContext(
            self.previous_logits, self.layers_seen, dict(self.state), self.recomputing,
            self.token_mask,
        )  # fmt: skip

    def record(self, logits_TE: torch.Tensor) -> None:
        self.previous_logits = logits_TE
        self.layers_seen += 1


def token_mask(context: RoutingContext | None, num_tokens: int) -> torch.Tensor | None:
    """`context.token_mask` flattened to `[num_tokens]` (None without one); a mask of another
    size is refused, naming both sizes."""
    mask = None if context is None else context.token_mask
    if mask is None:
        return None
    if mask.numel() != num_tokens:
        raise ValueError(
            f"RoutingContext.token_mask has {mask.numel()} entries (shape {tuple(mask.shape)}) "
            f"but the MoE layer's input has {num_tokens} tokens: give one entry per token, in "
            "the order of the input's leading dims"
        )
    return mask.reshape(-1)
