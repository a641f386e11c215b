"""ExpertWeightGather: whole experts from the F-slices the ranks hold, and their gradients back.

Legend: L expert rows per rank, S shards per expert, f = F / S, c = 2 for SwiGLU (gate and up
column blocks of w1), else 1, M members of the gathering group, R whole experts produced.

A rank holds `w1 [L, D, c*f]` (its slice of the gate columns, then of the up columns) and `w2 [L, f,
D]` (see `moeflow.moe.layout`). Two modes gather:

- `ep` with S > 1: over the rank's shard group (M = S); the R = L experts of the group, whole.
- `dp`: over the whole expert group (M = G); all R = E logical experts, in logical order, each
  from its first copy (`ExpertLayout.first_slots`).

Schedule of `gather` (forward, and again in backward: the whole weights are *recomputed*, not kept
from forward to backward, so at most one layer's gathered experts exist at a time):
1. One all-gather of w1 and one of w2 over the group (blocking).
2. Reassemble: whole expert `r` takes slice s from row `src[r, s]` of the gathered rows.

`scatter` (the gradient): the reverse reassembly into per-member rows (zeros for copies that are
not the gathered one, so replicas sum to one gradient in `GradSync`), then one reduce-scatter (sum)
over the group per weight: every member gets the sum over the group of its own slices' gradient.

Example:
    >>> from moeflow.moe.layout import ExpertLayout
    >>> layout = ExpertLayout.canonical(num_experts=4, ffn_hidden_size=6, group_size=1)
    >>> gather = ExpertWeightGather(layout.with_slots([2, 0, 3, 1]), rank=0, mode="dp")
    >>> w1 = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 6)
    >>> gather.gather(w1, torch.zeros(4, 6, 2))[0][:, 0, 0].tolist()  # logical order
    [1.0, 3.0, 0.0, 2.0]
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.comm.gather import all_gather_rows, group_size, reduce_scatter_rows
from moeflow.moe.layout import ExpertLayout


class ExpertWeightGather:
    def __init__(
        self,
        layout: ExpertLayout,
        rank: int,
        mode: str,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        s, per = layout.shards, layout.slots_per_group
        if mode == "ep":
            members = s
            src = [[sh * per + row for sh in range(s)] for row in range(per)]
        elif mode == "dp":
            members = layout.group_size
            src = [[layout.physical_slot(q, sh) for sh in range(s)] for q in layout.first_slots()]
        else:
            raise ValueError(f"no weight gather in mode {mode!r} (only 'ep' and 'dp' gather)")
        if group_size(group) != members:
            raise ValueError(
                f"mode {mode!r} gathers over {members} ranks, the group given has "
                f"{group_size(group)}"
            )
        self.group, self.shards, self.rows = group, s, len(src)
        self.members, self.per_rank = members, per
        flat = [i for row in src for i in row]
        self.identity = members == 1 and flat == list(range(per))
        self._src = torch.tensor(flat, dtype=torch.int64)
        self.gathered_bytes = 0  # bytes the last gather received from other ranks
        self.peak_bytes = 0  # the most the last gather held at once (buffers and whole experts)

    def _index(self, device: torch.device) -> torch.Tensor:
        if self._src.device != device:
            self._src = self._src.to(device)
        return self._src

    def gather(self, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local slices `[L, D, c*f]`, `[L, f, D]` -> whole experts `[R, D, c*F]`, `[R, F, D]`.

        One weight at a time, each temporary dropped as soon as it is used: `peak_bytes` is the
        high-water mark of what this call held (see `ExpertLayout.gather_peak_elements`)."""
        if self.identity:
            self.gathered_bytes = self.peak_bytes = 0
            return w1, w2
        s, f = self.shards, w2.shape[1]
        d, c = w1.shape[1], w1.shape[2] // f
        index = self._index(w1.device)
        received = all_gather_rows(w1, self.group)
        held = received.nbytes if self.members > 1 else 0
        part = received.index_select(0, index)
        peak = held + part.nbytes
        del received
        full1 = part.view(self.rows, s, d, c, f).permute(0, 2, 3, 1, 4).reshape(self.rows, d, -1)
        peak = max(peak, part.nbytes + full1.nbytes)
        del part
        received = all_gather_rows(w2, self.group)
        held2 = received.nbytes if self.members > 1 else 0
        full2 = received.index_select(0, index).view(self.rows, s * f, w2.shape[2])
        self.peak_bytes = max(peak, full1.nbytes + held2 + full2.nbytes)
        self.gathered_bytes = int((held + held2) * (self.members - 1) / self.members)
        return full1, full2

    def scatter(self, g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the whole experts -> this rank's slices, summed over the group."""
        if self.identity:
            return g1, g2
        s, rows = self.shards, self.rows
        d, cf = g1.shape[1], g1.shape[2]
        f = g2.shape[1] // s
        c = cf // (s * f)
        index = self._index(g1.device)
        slices1 = g1.view(rows, d, c, s, f).permute(0, 3, 1, 2, 4).reshape(rows * s, d, c * f)
        slices2 = g2.reshape(rows * s, f, g2.shape[2])
        out = []
        for slices in (slices1, slices2):
            send = slices.new_zeros((self.members * self.per_rank, *slices.shape[1:]))
            send.index_copy_(0, index, slices)
            out.append(reduce_scatter_rows(send, self.group))
        return out[0], out[1]
