"""Sparse upcycling's preconditions: a dense FFN can seed every expert of an MoE layer only where
the layer's experts compute exactly that FFN (`MoELayer.from_dense`).

Example:
    >>> from moeflow import MoEConfig
    >>> from moeflow.moe.ffn import FeedForward
    >>> ffn = FeedForward(8, 16)
    >>> check_upcycle(ffn, MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=16))  # fits
    >>> try:
    ...     check_upcycle(ffn, MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=32))
    ... except ValueError as e:
    ...     print(e)
    dense FFN is 8->16 but moe.hidden_size=8, moe.ffn_hidden_size=32
"""

from __future__ import annotations

from moeflow.moe.config import MoEConfig
from moeflow.moe.ffn import FeedForward


def check_upcycle(ffn: FeedForward, config: MoEConfig) -> None:
    """Raise a `ValueError` naming the field where `config`'s experts would not compute `ffn`."""
    if config.a2a_dim is not None:
        raise ValueError(
            "moe.a2a_dim projects tokens before the experts, so upcycled experts would not "
            "compute the dense FFN; upcycle with a2a_dim unset"
        )
    if ffn.w1.shape[0] != config.hidden_size or ffn.w2.shape[0] != config.ffn_hidden_size:
        raise ValueError(
            f"dense FFN is {ffn.w1.shape[0]}->{ffn.w2.shape[0]} but moe.hidden_size="
            f"{config.hidden_size}, moe.ffn_hidden_size={config.ffn_hidden_size}"
        )
    if ffn.activation != config.activation:
        raise ValueError(
            f"moe.activation ({config.activation!r}) differs from the dense FFN's "
            f"({ffn.activation!r})"
        )
    if (ffn.b1 is not None) != config.ffn_bias:
        raise ValueError(
            f"moe.ffn_bias ({config.ffn_bias}) must match the dense FFN, which has "
            f"{'biases' if ffn.b1 is not None else 'no biases'}"
        )
