"""Attach a loss to a tensor so that the loss's gradient flows when the tensor's backward runs.

This is how an unchanged training loop (`loss = ce(model(x)); loss.backward()`) trains the router's
balancing losses: the MoE layer returns `attach_loss(output, aux_loss)`, whose forward is the
identity and whose backward also seeds `d aux_loss = scale`. Megatron's `MoEAuxLossAutoScaler` works
the same way, but keeps its scale in a class-level global; here the scale is an argument owned by
each layer.
"""

from __future__ import annotations

import torch


class _AttachLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(loss)
        ctx.scale = scale
        if torch.compiler.is_compiling():
            # A compiled graph replays an output that views one of its inputs outside the graph,
            # which would drop this backward (the layer's output comes in from the eager
            # dispatch region): compiled, the output is a copy.
            return output.clone()
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(loss, ctx.scale), None


def attach_loss(output: torch.Tensor, loss: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Return `output` unchanged; backward through it adds `scale * d loss` to the graph.

    Use `scale = 1 / grad_accum_steps` when the main loss is averaged over micro-batches, or the
    fp16 loss scale when gradients are scaled.
    """
    if not loss.requires_grad:
        return output
    return _AttachLoss.apply(output, loss, float(scale))
