"""moeflow: Mixture-of-Experts training for PyTorch.

Example:
    >>> import torch
    >>> from moeflow import MoEConfig, MoELayer, RouterConfig
    >>> moe = MoELayer(MoEConfig(hidden_size=16, num_experts=4, ffn_hidden_size=32,
    ...                          router=RouterConfig(top_k=2)))
    >>> moe(torch.randn(3, 16)).shape
    torch.Size([3, 16])
"""

from moeflow.moe import (
    FeedForward,
    GroupedExperts,
    MoEConfig,
    MoELayer,
    MoEStats,
    RouterConfig,
    set_aux_loss_scale,
)

__version__ = "0.1.0"

__all__ = [
    "FeedForward",
    "GroupedExperts",
    "MoEConfig",
    "MoELayer",
    "MoEStats",
    "RouterConfig",
    "__version__",
    "set_aux_loss_scale",
]
