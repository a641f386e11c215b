"""Gradient synchronisation for expert-parallel models, as DDP does it: bucketed all-reduce,
optionally launched from backward hooks so that communication overlaps the rest of the backward.

Buckets: the parameters in reverse registration order (backward produces the last layers'
gradients first), cut into buckets of about `bucket_mb`; a bucket holds dense parameters (reduced
over the whole world) or expert parameters (reduced over the expert-data-parallel group, the `dp`
axis), never both. The layout is the same on every rank and in both modes below.

Schedule (`overlap=False`; call `sync()` after `loss.backward()`, before `optimizer.step()`):
1. Every bucket flattened and all-reduced (sum, async) over its group, in bucket order; all are
   issued before any is waited for.
2. Wait for all, divide by the world size, copy back into `.grad`.
3. Replicated experts: the copies' gradients summed over the `ep` group (`_sum_replicas`).

With `overlap=True` step 1 moves into the backward pass: a hook after each parameter's gradient is
accumulated marks it ready, and a bucket is issued as soon as it and every bucket before it are
ready (so every rank issues the same collectives in the same order, whatever order its hooks
fire in); `sync()` issues what is left (a parameter no gradient reached takes part as zeros), then
runs steps 2 and 3. The sums are the same as without overlap, bit for bit. With gradient
accumulation, run all but the last micro-batch's backward under `with grad_sync.no_sync():`.

Dividing expert gradients by the world size (not the group size) is what makes the result equal the
single-process gradient of the mean loss: each expert's gradient already sums the contributions of
all `ep` ranks whose tokens it computed.

A model sharded by `shard_model` (FSDP2) reduces its own gradients in backward (reduce-scatter,
averaged over each unit's mesh); `GradSync` then only divides the expert gradients by `ep` (they
are averaged over `dp`, the replicated run's are over the world) and sums the replicas, on the
local shards; `no_sync()` turns FSDP's reduction off.

DDP interplay: do not let DDP reduce expert parameters over the whole world (that averages
different experts together). Either use this helper alone, or wrap the model in DDP with the expert
parameters excluded (`DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model,
names)`, names from `expert_parameter_names`) and call `GradSync(..., dense=False)` for the experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moeflow.moe.walk import expert_parameters, moe_layers, split_parameters
from moeflow.parallel.dims import ParallelContext
from moeflow.parallel.fsdp import gradient_sync, is_sharded, local_tensor


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of every expert weight (the parameters laid out over `ep`), e.g. for
    DDP's ignore list."""
    return set(expert_parameters(model))


@dataclass(eq=False)
class _Bucket:
    params: list[nn.Parameter]
    group: dist.ProcessGroup
    ready: set[int] = field(default_factory=set)  # indices of params whose gradient is final
    sent: tuple | None = None  # (grads, flat, handle) once issued


class GradSync:
    """Averages gradients: dense over the world, experts over the expert-data-parallel group
    (see the module doc for the schedule and `overlap`).

    Example (one process: the mean over one rank is its own gradient):
        >>> from moeflow.moe.config import MoEConfig
        >>> from moeflow.moe.layer import MoELayer
        >>> from moeflow.parallel import ParallelDims, parallelize
        >>> from moeflow.train.distributed import init_distributed, shutdown
        >>> runtime = init_distributed(60.0)
        >>> ctx = ParallelDims().build()
        >>> model = parallelize(nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2,
        ...                                                      ffn_hidden_size=8))), ctx)
        >>> sync = GradSync(model, ctx, overlap=True)
        >>> model(torch.randn(4, 8)).sum().backward()  # buckets are sent from backward hooks
        >>> before = model[0].experts.w1.grad.clone()
        >>> sync.sync()
        >>> torch.equal(model[0].experts.w1.grad, before)
        True
        >>> sync.close(); shutdown(runtime)
    """

    def __init__(
        self,
        model: nn.Module,
        ctx: ParallelContext,
        bucket_mb: float = 25.0,
        dense: bool = True,
        experts: bool = True,
        overlap: bool = False,
    ) -> None:
        self.sharded = is_sharded(model)
        self.model = model
        if self.sharded:  # FSDP reduces in backward: nothing here to bucket
            dense = experts_bucketed = False
        else:
            experts_bucketed = experts
        dense_named, expert_named = split_parameters(model)
        self.expert_params = [p for _, p in expert_named] if experts else []
        expert_set = {id(p) for _, p in expert_named} if experts_bucketed else set()
        dense_set = {id(p) for _, p in dense_named} if dense else set()
        self.ctx = ctx
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.layers = [m for _, m in moe_layers(model)] if experts else []
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = self._make_buckets(
            [p for p in reversed(params) if id(p) in dense_set or id(p) in expert_set],
            expert_set,
        )
        self.overlap = overlap
        self._enabled = True  # False inside `no_sync()`
        self._next = 0  # the first bucket not yet issued
        self._hooks = []
        if overlap:
            for b, bucket in enumerate(self.buckets):
                for i, p in enumerate(bucket.params):
                    self._hooks.append(
                        p.register_post_accumulate_grad_hook(
                            lambda _p, b=b, i=i: self._on_ready(b, i)
                        )
                    )

    def _make_buckets(self, params: list[nn.Parameter], expert_set: set[int]) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        current: list[nn.Parameter] = []
        size, kind = 0, None
        for p in params:
            is_expert = id(p) in expert_set
            if current and (is_expert != kind or size >= self.bucket_bytes):
                buckets.append(self._bucket(current, kind))
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
            kind = is_expert
        if current:
            buckets.append(self._bucket(current, kind))
        return buckets

    def _bucket(self, params: list[nn.Parameter], is_expert: bool) -> _Bucket:
        return _Bucket(params, self.ctx.edp_group if is_expert else self.ctx.world_group)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally and send nothing (all but the last
        micro-batch of an optimizer step)."""
        self._enabled = False
        try:
            with gradient_sync(self.model, enabled=False):
                yield
        finally:
            self._enabled = True

    def close(self) -> None:
        """Remove the backward hooks (`overlap=True`)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _on_ready(self, b: int, i: int) -> None:
        if not self._enabled:
            return
        bucket = self.buckets[b]
        if bucket.sent is not None:
            raise RuntimeError(
                "GradSync(overlap=True): a gradient changed after its bucket was sent (a second "
                "backward before sync()); run all but the last micro-batch's backward under "
                "`with grad_sync.no_sync():`"
            )
        bucket.ready.add(i)
        while self._next < len(self.buckets):
            nxt = self.buckets[self._next]
            if len(nxt.ready) < len(nxt.params):
                break
            self._send(nxt)
            self._next += 1

    @torch.no_grad()
    def _send(self, bucket: _Bucket) -> None:
        # A parameter no loss reached still takes part, as zeros, so every rank sends the same
        # bucket layout.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        flat = _flatten_dense_tensors(grads)
        bucket.sent = (grads, flat, dist.all_reduce(flat, group=bucket.group, async_op=True))

    @torch.no_grad()
    def sync(self) -> None:
        for bucket in self.buckets[self._next :]:
            self._send(bucket)
        for bucket in self.buckets:
            grads, flat, handle = bucket.sent
            handle.wait()
            flat.div_(self.ctx.world_size)
            for p, synced in zip(bucket.params, _unflatten_dense_tensors(flat, grads), strict=True):
                if p.grad is None:
                    p.grad = synced.clone()
                else:
                    p.grad.copy_(synced)
            bucket.sent = None
            bucket.ready.clear()
        self._next = 0
        if self.sharded and self.ctx.dims.ep > 1:
            for p in self.expert_params:
                if p.grad is not None:
                    local_tensor(p.grad).div_(self.ctx.dims.ep)
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
            grads = [
                local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p))
                for p in params
            ]
            device = grads[0].device
            # A rank may hold no copy of a replicated expert: it still joins the all-reduce,
            # with nothing added (empty index tensors, so every shape below holds at 0 slots).
            index = torch.tensor(
                [row[local_ids[s]] for s in slots], dtype=torch.long, device=device
            )
            local = torch.tensor(slots, dtype=torch.long, device=device)
            width = sum(g[0].numel() for g in grads)
            buf = torch.zeros(
                len(replicated) * layout.shards, width, dtype=grads[0].dtype, device=device
            )
            mine = torch.cat([g[local].flatten(1) for g in grads], dim=1)
            buf.index_add_(0, index, mine)
            dist.all_reduce(buf, group=self.ctx.ep_group)
            summed = buf[index]
            start = 0
            for p, g in zip(params, grads, strict=True):
                n = g[0].numel()
                g[local] = summed[:, start : start + n].reshape(len(slots), *g.shape[1:])
                start += n
                if p.grad is None:  # a replicated run's parameter (FSDP's always have one)
                    p.grad = g
