"""The exchanges' all-to-all over uneven splits (counts exchanged first), flat and two-level,
on gloo ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.comm.all_to_all import GroupExchange, wait
from moeflow.comm.hierarchical import HierarchicalExchange
from tests.distributed import run_on_ranks


def splits(world: int) -> list[list[int]]:
    """M[i][j] rows from rank i to rank j: uneven, with zeros."""
    return [[(i * 3 + j * 5) % 4 for j in range(world)] for i in range(world)]


def rows(i: int, j: int, n: int) -> torch.Tensor:
    """The rows rank i sends rank j, recognisable: value 100*i + j, then a row counter."""
    counter = torch.arange(n, dtype=torch.float32)
    return torch.stack([torch.full((n,), 100.0 * i + j), counter], dim=1)


def _check(rank, world):
    M = splits(world)
    ex = GroupExchange(dist.group.WORLD)
    x = torch.cat([rows(rank, j, M[rank][j]) for j in range(world)])
    recv = ex.exchange_counts(torch.tensor(M[rank])).tolist()
    assert recv == [M[i][rank] for i in range(world)]
    assert ex.gather_counts(torch.tensor(M[rank])).tolist() == M
    out, handle = ex.all_to_all(x, recv, M[rank])
    wait(handle)
    want = torch.cat([rows(i, rank, M[i][rank]) for i in range(world)])
    assert torch.equal(out, want)
    # The two-level exchange, 2 ranks per node, gives the same rows in the same order.
    groups = {}
    for node in range(world // 2):
        g = dist.new_group([node * 2, node * 2 + 1])
        if rank // 2 == node:
            groups["intra"] = g
    for local in range(2):
        g = dist.new_group(list(range(local, world, 2)))
        if rank % 2 == local:
            groups["inter"] = g
    hier = HierarchicalExchange(dist.group.WORLD, groups["intra"], groups["inter"], 2)
    out2, handle = hier.all_to_all(x.detach(), [M[i][rank] for i in range(world)], M[rank], M)
    wait(handle)
    assert torch.equal(out2, want)
    return True


def test_uneven_all_to_all_and_two_level_on_4_ranks():
    assert run_on_ranks(_check, 4) == [True] * 4
