"""All-to-all with uneven splits: the exchanges the dispatcher uses.

An *exchange* is the communication backend of one expert-parallel group, passed explicitly:

- `LocalExchange`: a group of one rank (no process group at all). Every call returns its input; this
  is what an un-parallelised `MoELayer` uses, so one process and N processes run the same code.
- `GroupExchange(group)`: `torch.distributed.all_to_all_single` over `group` (NCCL on GPUs, gloo on
  CPUs), issued asynchronously; the caller waits on the returned handle.

Counts are exchanged first (`exchange_counts`, one equal-split all-to-all of integers) so every rank
knows the sizes it receives before the data moves; turning them into Python split lists is the one
host sync per layer call.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from moeflow.comm.replay import replayed


class Handle(Protocol):
    def wait(self) -> object: ...


class Exchange(Protocol):
    """`needs_matrix`: the exchange routes through intermediate ranks and must be given the whole
    `W x W` split matrix of each transfer (rows from i to j), from `gather_counts`."""

    size: int
    rank: int
    needs_matrix: bool

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor: ...

    def all_to_all(
        self,
        x: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        matrix: list[list[int]] | None = None,
    ) -> tuple[torch.Tensor, Handle | None]: ...


class LocalExchange:
    """The exchange of a group of one rank: nothing moves."""

    size = 1
    rank = 0
    needs_matrix = False

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        return send

    def gather_counts(self, send: torch.Tensor) -> torch.Tensor:
        return send.unsqueeze(0)

    def all_to_all(self, x, output_splits, input_splits, matrix=None):
        if output_splits != input_splits:
            raise ValueError(f"a one-rank exchange got splits {input_splits} -> {output_splits}")
        return x, None


class GroupExchange:
    """All-to-all over a `torch.distributed` process group. Every exchange may be replayed in a
    recomputation (`moeflow.comm.replay`)."""

    needs_matrix = False

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    @replayed
    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        if send.numel() % self.size:
            raise ValueError(
                f"count tensor of {send.numel()} is not divisible by {self.size} ranks"
            )
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)
        return recv

    @replayed
    def gather_counts(self, send: torch.Tensor) -> torch.Tensor:
        return gather_counts(send, self.group)

    @replayed
    def all_to_all(self, x, output_splits, input_splits, matrix=None):
        if len(output_splits) != self.size or len(input_splits) != self.size:
            raise ValueError(f"splits must have {self.size} entries, got {input_splits}")
        if sum(input_splits) != x.shape[0]:
            raise ValueError(f"input splits {input_splits} do not sum to {x.shape[0]} rows")
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        handle = dist.all_to_all_single(
            out, x.contiguous(), output_splits, input_splits, group=self.group, async_op=True
        )
        return out, handle


def gather_counts(send: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's `send` vector: `[W, len(send)]` (one all-gather over `group`)."""
    size = dist.get_world_size(group)
    out = send.new_empty(size * send.numel())
    gather_single(out, send.contiguous(), group)
    return out.view(size, send.numel())


def gather_single(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup) -> None:
    """All-gather into one flat tensor (`all_gather_single` where this torch has it)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def wait(handle: Handle | None) -> None:
    if handle is not None:
        handle.wait()
