"""The model side of moeflow: configs, the MoE layer, experts, routers, losses."""

from moeflow.moe.config import MoEConfig, RouterConfig
from moeflow.moe.experts import GroupedExperts
from moeflow.moe.ffn import FeedForward
from moeflow.moe.layer import MoELayer, MoEStats
from moeflow.moe.walk import set_aux_loss_scale

__all__ = [
    "FeedForward",
    "GroupedExperts",
    "MoEConfig",
    "MoELayer",
    "MoEStats",
    "RouterConfig",
    "set_aux_loss_scale",
]
