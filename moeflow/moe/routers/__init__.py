"""Routers: map tokens to (weights, expert ids) plus what the balancing losses need.

Built in: `topk`, `null` (AdaMoE), `moepp` (MoE++), `rmoe` (recurrent router). Pick one with
`RouterConfig.type`; add your own with `register_router`.
"""

from moeflow.moe.routers.base import Router, RouterOutput
from moeflow.moe.routers.registry import build_router, register_router, router_names
from moeflow.moe.routers.topk import TopKRouter, topk_routing

__all__ = [
    "Router",
    "RouterOutput",
    "TopKRouter",
    "build_router",
    "register_router",
    "router_names",
    "topk_routing",
]
