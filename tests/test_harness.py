"""The multi-process harness itself: results in rank order, every rank's error reported, hangs
end."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import DistributedTestError, run_on_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return (rank, world_size, t.item())


def _fail_on_odd(rank, world_size):
    if rank % 2:
        raise ValueError(f"odd rank {rank}")
    return rank


def _hang_on_rank1(rank, world_size):
    if rank == 1:
        import time

        time.sleep(60)
    return rank


def test_results_in_rank_order():
    assert run_on_ranks(_sum_ranks, 4) == [(r, 4, 6.0) for r in range(4)]


def test_every_failing_rank_is_reported():
    with pytest.raises(DistributedTestError) as info:
        run_on_ranks(_fail_on_odd, 4)
    text = str(info.value)
    assert "2 of 4 ranks failed" in text
    assert "rank 1: ValueError: odd rank 1" in text and "rank 3: ValueError: odd rank 3" in text


def test_hang_ends_with_timeout():
    with pytest.raises(DistributedTestError, match=r"rank 1: no result \(hung past 3s"):
        run_on_ranks(_hang_on_rank1, 2, timeout=3)


def _pid_and_dtype(rank, world_size, set_dtype):
    import os

    seen = torch.get_default_dtype()
    if set_dtype:
        torch.set_default_dtype(torch.float64)  # left set: the next call must not see it
    return os.getpid(), seen


def test_one_spawn_serves_many_calls_and_a_failure_ends_it():
    first = run_on_ranks(_pid_and_dtype, 2, args=(True,))
    second = run_on_ranks(_pid_and_dtype, 2, args=(False,))
    assert [pid for pid, _ in first] == [pid for pid, _ in second]  # the same processes
    assert [dtype for _, dtype in second] == [torch.float32] * 2  # globals put back
    with pytest.raises(DistributedTestError):
        run_on_ranks(_fail_on_odd, 2)
    third = run_on_ranks(_pid_and_dtype, 2, args=(False,))
    assert not {pid for pid, _ in third} & {pid for pid, _ in first}  # fresh ranks after it
    assert run_on_ranks(_sum_ranks, 2) == [(r, 2, 1.0) for r in range(2)]
