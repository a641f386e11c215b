"""The local experts as the dispatcher's `compute`: grouped FFN forward/backward on received blocks.

Legend: R received rows, L local experts. Blocks are `(local expert, first row, end row)`.
Implements the interface of `moeflow.comm.pipeline.exchange_compute`.
"""

from __future__ import annotations

import torch

from moeflow.moe.grouped_ffn import Block, FFNActivations, WeightGrads, ffn_backward, ffn_forward


class GroupedExpertCompute:
    """`params = (w1 [L, D, gF], w2 [L, F, D])`; rows arrive already in the compute dtype."""

    def __init__(self, activation: str) -> None:
        self.activation = activation

    def forward(self, params, x_RD: torch.Tensor, blocks: list[Block]):
        w1, w2 = (p.to(x_RD.dtype) for p in params)
        with torch.autocast(device_type=x_RD.device.type, enabled=False):
            y, saved = ffn_forward(x_RD.contiguous(), w1, w2, blocks, self.activation)
        # The weights are saved once by the pipeline; keep only the activations.
        return y, [t for t in saved.tensors() if t is not saved.w1 and t is not saved.w2]

    def new_grads(self, params) -> dict:
        return {"params": params, "grads": None}

    def backward(self, params, saved, grad_y, blocks: list[Block], acc: dict) -> torch.Tensor:
        x = saved[0]
        w1, w2 = (p.to(x.dtype) for p in params)
        if acc["grads"] is None:
            acc["grads"] = WeightGrads(w1, w2)
        activations = FFNActivations.from_tensors([x, w1, w2, *saved[1:]], blocks, self.activation)
        return ffn_backward(activations, grad_y, acc["grads"])

    def finish(self, acc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        w1, w2 = acc["params"]
        if acc["grads"] is None:  # no chunk at all reached backward
            return torch.zeros_like(w1), torch.zeros_like(w2)
        g1, g2 = acc["grads"].finish()
        return g1.to(w1.dtype), g2.to(w2.dtype)
