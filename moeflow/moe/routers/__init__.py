"""Routers: map tokens to (weights, expert ids) plus what the balancing losses need."""

from moeflow.moe.routers.topk import RouterOutput, TopKRouter, topk_routing

__all__ = ["RouterOutput", "TopKRouter", "topk_routing"]
