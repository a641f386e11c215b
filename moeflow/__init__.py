"""moeflow: Mixture-of-Experts training for PyTorch.

Example:
    >>> import torch
    >>> from moeflow import MoEConfig, MoELayer, RouterConfig
    >>> moe = MoELayer(MoEConfig(hidden_size=16, num_experts=4, ffn_hidden_size=32,
    ...                          router=RouterConfig(top_k=2)))
    >>> moe(torch.randn(3, 16)).shape
    torch.Size([3, 16])
"""

import importlib

# Loaded when first used (PEP 562): `import moeflow.data...` in a `data prepare` worker must not
# pay for torch.
_LAZY = {
    name: "moeflow.moe"
    for name in ("FeedForward", "GroupedExperts", "MoEConfig", "MoELayer", "MoEStats",
                 "RouterConfig", "set_aux_loss_scale")
}  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moeflow' has no attribute {name!r}")


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
