"""Two-level (2DH) all-to-all: within each node first, then across nodes (after Tutel).

Legend: W ranks in the expert-parallel group = N nodes x G ranks per node; member `r = n*G + g`
(node n, local index g). `M[i][j]`: rows member i sends member j in this transfer.

A flat all-to-all sends W-1 small messages per rank, most of them across the slow inter-node link.
Here every rank sends G-1 intra-node messages and N-1 inter-node ones, each N (or G) times larger:

1. Reorder this rank's rows from destination order `(m, g')` to `(g', m)`, and all-to-all them
   within the node: local peer g' receives everything bound for the members with local index g'.
   (Issued asynchronously when the call is made.)
2. On `wait()`: reorder the received rows from `(source g, node m)` to `(m, g)`, then all-to-all
   across nodes among the ranks with the same local index. Member `(m, g)`'s rows arrive from node m
   ordered by g, i.e. in global source order: the result is identical to the flat all-to-all.

The second stage starts at `wait()`, so under the pipeline only the intra-node stage overlaps
compute. Needs the whole split matrix of each transfer (`needs_matrix`); the dispatcher gathers it
with the counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.comm.all_to_all import gather_counts
from moeflow.comm.replay import replayed


def _block_index(starts: list[int], sizes: list[int], order: list[int], device) -> torch.Tensor:
    """Row indices that take blocks `order[0], order[1], ...` (given their starts and sizes)."""
    parts = [
        torch.arange(starts[b], starts[b] + sizes[b], device=device) for b in order if sizes[b]
    ]
    if not parts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(parts)


def _starts(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


class _TwoStageHandle:
    def __init__(self, exchange, first, buf1, out, matrix) -> None:
        self.exchange, self.first, self.buf1, self.out, self.matrix = (
            exchange,
            first,
            buf1,
            out,
            matrix,
        )

    def wait(self) -> None:
        ex, M = self.exchange, self.matrix
        if self.first is not None:
            self.first.wait()
        G, N, n, g_me, me = ex.ranks_per_node, ex.nodes, ex.node, ex.local, ex.rank
        # Received from local source g: blocks for nodes m = 0..N-1 (order (g, m)).
        sizes = [M[n * G + g][m * G + g_me] for g in range(G) for m in range(N)]
        starts = _starts(sizes)
        order = [g * N + m for m in range(N) for g in range(G)]
        send2 = self.buf1.index_select(0, _block_index(starts, sizes, order, self.buf1.device))
        send_splits = [sum(M[n * G + g][m * G + g_me] for g in range(G)) for m in range(N)]
        recv_splits = [sum(M[m * G + g][me] for g in range(G)) for m in range(N)]
        if N == 1:
            self.out.copy_(send2)
        else:
            dist.all_to_all_single(self.out, send2, recv_splits, send_splits, group=ex.inter_group)


class HierarchicalExchange:
    """Two-level all-to-all over an expert-parallel group split into nodes."""

    needs_matrix = True

    def __init__(
        self,
        group: dist.ProcessGroup,
        intra_group: dist.ProcessGroup,
        inter_group: dist.ProcessGroup,
        ranks_per_node: int,
    ) -> None:
        self.group, self.intra_group, self.inter_group = group, intra_group, inter_group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks_per_node = ranks_per_node
        self.nodes = self.size // ranks_per_node
        self.node, self.local = divmod(self.rank, ranks_per_node)

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        span = send.numel() // self.size
        return self.gather_counts(send)[:, self.rank * span : (self.rank + 1) * span].reshape(-1)

    @replayed  # exchange_counts reads through it
    def gather_counts(self, send: torch.Tensor) -> torch.Tensor:
        return gather_counts(send, self.group)

    @replayed
    def all_to_all(self, x, output_splits, input_splits, matrix=None):
        if matrix is None:
            raise ValueError("a two-level all-to-all needs the split matrix of the transfer")
        M, G, N, me = matrix, self.ranks_per_node, self.nodes, self.rank
        if list(M[me]) != list(input_splits):
            raise ValueError(f"input splits {input_splits} disagree with the matrix row {M[me]}")
        # 1. destination order (m, g') -> (g', m), then the intra-node exchange
        order = [m * G + g for g in range(G) for m in range(N)]
        send1 = x.index_select(0, _block_index(_starts(M[me]), M[me], order, x.device))
        send_splits = [sum(M[me][m * G + g] for m in range(N)) for g in range(G)]
        recv_splits = [
            sum(M[self.node * G + g][m * G + self.local] for m in range(N)) for g in range(G)
        ]
        buf1 = x.new_empty((sum(recv_splits), *x.shape[1:]))
        first = None
        if G == 1:
            buf1.copy_(send1)
        else:
            first = dist.all_to_all_single(
                buf1, send1, recv_splits, send_splits, group=self.intra_group, async_op=True
            )
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        return out, _TwoStageHandle(self, first, buf1, out, M)
