"""Peer layers built to do the same work as a moeflow layer, for the benchmarks."""

from __future__ import annotations

import logging

import torch

from moeflow import FeedForward, MoELayer


def deepspeed_moe_like(layer: MoELayer, ep_size: int, capacity_factor: float | None):
    """`deepspeed.moe.layer.MoE` with `layer`'s router and (local) expert weights, so both route the
    same tokens to the same experts: deterministic top-k (no Gumbel sampling of the second
    expert), dropless when `capacity_factor` is None (DeepSpeed then pads every expert to the
    largest load), else its capacity with `min_capacity=0`."""
    from deepspeed.moe.layer import MoE

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    cfg = layer.config
    ds = MoE(
        hidden_size=cfg.hidden_size,
        expert=FeedForward(cfg.hidden_size, cfg.ffn_hidden_size, cfg.activation),
        num_experts=cfg.num_experts,
        ep_size=ep_size,
        k=cfg.router.top_k,
        capacity_factor=capacity_factor or 1.0,
        eval_capacity_factor=capacity_factor or 1.0,
        min_capacity=0,
        drop_tokens=capacity_factor is not None,
        top2_2nd_expert_sampling=False,
    )
    if ep_size > 1:
        # What DeepSpeed's engine does at start-up: without it the gate has no expert-parallel
        # group, skips the capacity all-reduce, and gloo aborts on mismatched all-to-all sizes.
        ds.set_deepspeed_parallelism()
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(layer.router.weight)
        for i, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            expert.w1.copy_(layer.experts.w1[i])
            expert.w2.copy_(layer.experts.w2[i])
    return ds
