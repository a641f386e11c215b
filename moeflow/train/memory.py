"""What a rank really holds, measured rather than predicted: the bytes of its parameters,
gradients and optimizer state (summed over the local tensors: a shard counts as the shard, not
as the logical tensor it belongs to), and the activation bytes a step keeps for backward
(saved-tensor hooks, each storage counted once). The trainer writes both once, after the first
step, as the `{"kind": "start", ...}` record of `metrics.jsonl`, one value per rank, so a dry
run's prediction can be checked against them.

Example:
    >>> model = torch.nn.Linear(4, 3)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> with SavedBytes() as saved:
    ...     loss = model(torch.randn(5, 4)).square().sum()
    >>> loss.backward(); opt.step()
    >>> state_bytes(model, opt)  # 15 weights and biases in fp32; their grads; 2 moments + steps
    {'params': 60, 'grads': 60, 'optimizer': 128}
    >>> saved.bytes > 0
    True
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moeflow.comm.replay import observing_kept
from moeflow.parallel.fsdp import local_tensor


def _bytes(tensors) -> int:
    local = [local_tensor(t) for t in tensors if t is not None]  # a DTensor's shard on this rank
    return sum(t.numel() * t.element_size() for t in local)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds in parameters, their gradients (as they are now: read it before
    `zero_grad`) and the optimizer's state tensors."""
    params = list(model.parameters())
    optimizer_tensors = [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]
    return {
        "params": _bytes(params),
        "grads": _bytes(p.grad for p in params),
        "optimizer": _bytes(optimizer_tensors),
    }


def start_record(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    activation_bytes: int,
    step: int,
    group: dist.ProcessGroup | None,
) -> dict:
    """The `start` record of `metrics.jsonl`: every rank's state bytes (as held now: call it
    before `zero_grad`) and the activation bytes its largest micro-batch kept (one all-gather
    over `group`)."""
    mine = {**state_bytes(model, optimizer), "activations": activation_bytes}
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    return {
        "kind": "start",
        "step": step,
        "state_bytes": {k: [r[k] for r in every] for k in ("params", "grads", "optimizer")},
        "activation_bytes": [r["activations"] for r in every],
    }


class SavedBytes:
    """Counts the bytes kept for backward while the block runs (`bytes`): every tensor autograd
    saves and every exchange selective checkpointing keeps (`moeflow.comm.replay`), each storage
    once, parameters excluded (they are held anyway)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._kept = observing_kept(self._pack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        local = local_tensor(t)
        if not isinstance(t, nn.Parameter) and local.device.type != "meta":
            storage = local.untyped_storage()
            key = storage.data_ptr()
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        self._kept.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._kept.__exit__(*exc)
        self._hooks.__exit__(*exc)
