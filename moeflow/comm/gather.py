"""All-gather and reduce-scatter of the rows of a tensor over a process group (or none).

`group=None` is a group of one rank: the gather returns its input and the reduce-scatter too, so
one process runs the same code as many. Both block until the data is there (they run where the
caller needs the result at once: weights before a layer computes, gradients after it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.comm.all_to_all import gather_single


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`[n, ...]` on every member -> `[size * n, ...]`, member after member.

    Example:
        >>> all_gather_rows(torch.ones(2, 3), None).shape
        torch.Size([2, 3])
    """
    size = group_size(group)
    if size == 1:
        return x
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    gather_single(out, x.contiguous(), group)
    return out


def reduce_scatter_rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`[size * n, ...]` on every member -> `[n, ...]`: member m gets the sum over members of
    their rows `[m*n, (m+1)*n)`.

    Example:
        >>> reduce_scatter_rows(torch.ones(2, 3), None).shape
        torch.Size([2, 3])
    """
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[0] % size:
        raise ValueError(f"{x.shape[0]} rows cannot be scattered over {size} ranks")
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x.contiguous(), group=group)
    return out
