"""`[train] compile`: each transformer block compiled in place with `torch.compile`.

`nn.Module.compile` compiles a block's call without wrapping it, so parameter names, state
dicts and checkpoints are the same as eager. The blocks are compiled before they are sharded
(`moeflow.parallel.fsdp`), as torchtitan orders them (`moeflow.parallel.prepare`); activation
checkpointing stays outside each compiled block. In an MoE layer the dispatch region (the count
exchange with the call's one host read, the all-to-alls and the expert GEMMs) runs eagerly
between two graphs; with capacity padding the whole layer is one graph
(`moeflow.moe.expert_dispatch`).

Example:
    >>> import torch
    >>> from moeflow.models.decoder import DecoderConfig, MoEDecoder
    >>> from moeflow.moe.config import MoEConfig
    >>> cfg = DecoderConfig(dim=32, n_layers=2, n_heads=4, max_seq_len=16,
    ...                     moe=MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=64))
    >>> model, ids = MoEDecoder(cfg), torch.zeros(2, 16, dtype=torch.long)
    >>> eager = model(ids)
    >>> compile_blocks(model, backend="eager")
    2
    >>> torch.equal(model(ids), eager), "blocks.0.ffn.experts.w1" in model.state_dict()
    (True, True)
"""

from __future__ import annotations

from torch import nn

from moeflow.parallel.fsdp import transformer_blocks


def compile_blocks(model: nn.Module, **options) -> int:
    """Compile every transformer block of `model` (`transformer_blocks`: moeflow's decoder
    blocks, a Hugging Face model's layers) in place with `torch.compile(**options)`; returns how
    many."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(**options)
    return len(blocks)
