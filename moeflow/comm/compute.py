"""What the dispatcher runs on the rows it receives: the expert compute's contract, and the blocks
of rows it is given.

Legend: R received rows, D model dim, L local expert slots, T tokens, P parameters.

`ExpertCompute` is the interface `moeflow.comm.pipeline.exchange_compute` and
`moeflow.comm.dispatcher.TokenDispatcher` call, beside `moeflow.comm.all_to_all.Exchange` (how rows
travel): `moeflow.moe.expert_compute.GroupedExpertCompute` (moeflow's grouped experts) and
`moeflow.integrations.module_experts.ModuleExpertCompute` (any expert modules) implement it. A
compute whose `reads_tokens` can say yes also implements `TokenOrderCompute`, which
`moeflow.comm.local_compute` runs where no row travels.

`ReceivedBlocks` are the rows of one chunk as they arrive: `(local slot, first row, end row)`
blocks, source-rank major, and `ends`, each local slot's end row once the rows are grouped by slot,
on the device (the grouped GEMM kernels' offsets, with no host-to-device copy per call).

Example:
    >>> blocks = ReceivedBlocks.from_blocks([(0, 0, 2), (1, 2, 5), (0, 5, 6)], num_slots=2)
    >>> list(blocks), blocks.ends.tolist()
    ([(0, 0, 2), (1, 2, 5), (0, 5, 6)], [3, 6])
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

Block = tuple[int, int, int]  # (local slot, first row, end row)


class ReceivedBlocks(list):
    """A chunk's received blocks, with `ends`: `[L]` int32 on the device, the end row of each
    local slot once the rows are grouped by slot (see the module doc)."""

    def __init__(self, blocks: list[Block], ends: torch.Tensor) -> None:
        super().__init__(blocks)
        self.ends = ends

    @classmethod
    def from_blocks(
        cls, blocks: list[Block], num_slots: int, device: torch.device | str = "cpu"
    ) -> ReceivedBlocks:
        """Blocks whose end rows are computed here, on the host, and copied to `device` once
        (for callers off the dispatcher's path: one rank's experts, benches, tests)."""
        rows = [0] * num_slots
        for slot, first, end in blocks:
            rows[slot] += end - first
        ends = torch.tensor(rows, dtype=torch.int64).cumsum(0).to(torch.int32)
        return cls(blocks, ends.to(device))


class ExpertCompute(Protocol):
    """An expert computation on received rows (`moeflow.comm.pipeline` calls it chunk by chunk).

    `weighted`: rows arrive with their router weight as column D and come back weighted (the
    dispatcher's combine then only sums); `reads_tokens(x_TD, params)`: whether a call where no
    row travels runs in token order (`TokenOrderCompute`). `materialize` turns the given
    parameters into the ones the compute runs with (a gather of weight slices; in forward and
    again in backward); `forward` returns the output rows and what its backward needs;
    `new_grads` / `backward` / `finish` accumulate the parameters' gradients over the chunks and
    return them for the given (not the materialized) parameters."""

    weighted: bool

    def reads_tokens(self, x_TD: torch.Tensor, params: tuple[torch.Tensor, ...]) -> bool: ...

    def materialize(self, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]: ...

    def forward(
        self, params: tuple[torch.Tensor, ...], x_RD: torch.Tensor, blocks: ReceivedBlocks
    ) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def new_grads(self, params: tuple[torch.Tensor, ...]) -> Any: ...

    def backward(
        self,
        params: tuple[torch.Tensor, ...],
        saved: list[torch.Tensor],
        grad_y: torch.Tensor,
        blocks: ReceivedBlocks,
        acc: Any,
    ) -> torch.Tensor: ...

    def finish(self, acc: Any) -> tuple[torch.Tensor, ...]: ...


class TokenOrderCompute(ExpertCompute, Protocol):
    """A compute that reads its rows from token order (`moeflow.comm.local_compute`): buffer row
    r is token `src_R[r]` of `x_TD`, weighted by `row_w_R[r]`."""

    def forward_tokens(
        self,
        params: tuple[torch.Tensor, ...],
        x_TD: torch.Tensor,
        src_R: torch.Tensor,
        row_w_R: torch.Tensor,
        blocks: ReceivedBlocks,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def backward_tokens(
        self,
        params: tuple[torch.Tensor, ...],
        saved: list[torch.Tensor],
        grad_TD: torch.Tensor,
        blocks: ReceivedBlocks,
        acc: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
