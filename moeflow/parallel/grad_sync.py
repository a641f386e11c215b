"""Gradient synchronisation for expert-parallel models, as DDP would do it (bucketed all-reduce).

Call `GradSync(model, ctx).sync()` after `loss.backward()` and before `optimizer.step()`:

1. Non-expert gradients: flattened into buckets of about `bucket_mb`, each bucket all-reduced (sum,
   async) over the whole world; all buckets are issued before any is waited for.
2. Expert gradients: the same over the expert-data-parallel group (the `dp` axis).
3. Wait for all, divide by the world size, copy back into `.grad`.
4. Replicated experts: the copies' gradients summed over the `ep` group (`_sum_replicas`).

Dividing expert gradients by the world size (not the group size) is what makes the result equal the
single-process gradient of the mean loss: each expert's gradient already sums the contributions of
all `ep` ranks whose tokens it computed.

DDP/FSDP interplay: do not let DDP reduce expert parameters over the whole world (that averages
different experts together). Either use this helper alone, or wrap the model in DDP with the expert
parameters excluded (`DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model,
names)`, names from `expert_parameter_names`) and call `GradSync(..., dense=False)` for the experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moeflow.moe.walk import expert_parameters, moe_layers, split_parameters
from moeflow.parallel.dims import ParallelContext


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of every expert weight (the parameters laid out over `ep`), e.g. for
    DDP's ignore list."""
    return set(expert_parameters(model))


class GradSync:
    """Averages gradients: dense over the world, experts over the expert-data-parallel group.

    Example (one process: the mean over one rank is its own gradient):
        >>> from moeflow.moe.config import MoEConfig
        >>> from moeflow.moe.layer import MoELayer
        >>> from moeflow.parallel import ParallelDims, parallelize
        >>> from moeflow.train.distributed import init_distributed, shutdown
        >>> runtime = init_distributed(60.0)
        >>> ctx = ParallelDims().build()
        >>> model = parallelize(nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
        ...                                                      ffn_hidden_size=8))), ctx)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> before = model[0].experts.w1.grad.clone()
        >>> GradSync(model, ctx).sync()
        >>> torch.equal(model[0].experts.w1.grad, before)
        True
        >>> shutdown(runtime)
    """

    def __init__(
        self,
        model: nn.Module,
        ctx: ParallelContext,
        bucket_mb: float = 25.0,
        dense: bool = True,
        experts: bool = True,
    ) -> None:
        dense_named, expert_named = split_parameters(model)
        self.dense = [p for _, p in dense_named if p.requires_grad] if dense else []
        self.expert = [p for _, p in expert_named if p.requires_grad] if experts else []
        self.ctx = ctx
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.layers = [m for _, m in moe_layers(model)] if experts else []

    def _buckets(self, params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
        buckets, current, size = [], [], 0
        for p in params:
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= self.bucket_bytes:
                buckets.append(current)
                current, size = [], 0
        if current:
            buckets.append(current)
        return buckets

    @torch.no_grad()
    def sync(self) -> None:
        pending = []
        for params, group in (
            (self.dense, self.ctx.world_group),
            (self.expert, self.ctx.edp_group),
        ):
            for bucket in self._buckets(params):
                # A parameter no loss reached still takes part, as zeros, so every rank sends the
                # same bucket layout.
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
                flat = _flatten_dense_tensors(grads)
                pending.append(
                    (bucket, grads, flat, dist.all_reduce(flat, group=group, async_op=True))
                )
        for bucket, grads, flat, handle in pending:
            handle.wait()
            flat.div_(self.ctx.world_size)
            for p, synced in zip(bucket, _unflatten_dense_tensors(flat, grads), strict=True):
                if p.grad is None:
                    p.grad = synced.clone()
                else:
                    p.grad.copy_(synced)
        self._sum_replicas()

    def _sum_replicas(self) -> None:
        """Step 4: replicated experts (several slots on distinct shard groups) sum their copies'
        gradients over the `ep` group, so every copy takes the same step. One all-reduce per layer
        of a buffer with one row per (replicated expert, F-shard): a rank adds its slices into
        their rows, so slices of one expert never mix. The layout is read each time (it may
        change)."""
        if self.ctx.dims.ep == 1:
            return
        for layer in self.layers:
            layout = layer.layout
            replicated = [e for e, c in enumerate(layout.copies()) if c > 1]
            if not replicated:
                continue
            local_ids = layer.local_expert_ids
            shard = layout.shard_of(self.ctx.ep_index)
            row = {e: i * layout.shards + shard for i, e in enumerate(replicated)}
            slots = [s for s, e in enumerate(local_ids) if e in row]
            params = [p for p in layer.experts.parameters() if p.requires_grad]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            device = grads[0].device
            index = torch.tensor([row[local_ids[s]] for s in slots], device=device)
            local = torch.tensor(slots, dtype=torch.long, device=device)
            width = sum(g[0].numel() for g in grads)
            buf = torch.zeros(
                len(replicated) * layout.shards, width, dtype=grads[0].dtype, device=device
            )
            mine = torch.cat([g[local].reshape(len(slots), -1) for g in grads], dim=1)
            buf.index_add_(0, index, mine)
            dist.all_reduce(buf, group=self.ctx.ep_group)
            summed = buf[index]
            start = 0
            for p, g in zip(params, grads, strict=True):
                n = g[0].numel()
                g[local] = summed[:, start : start + n].reshape(len(slots), *g.shape[1:])
                start += n
                if p.grad is None:
                    p.grad = g
