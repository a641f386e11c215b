"""Host reads of an MoE layer call, counted on CPU: every device-to-host read of the path goes
through `moeflow.comm.host_read.read_to_host` (counted by name), and no op whose output size
depends on the data (`bincount`, `nonzero`, `unique`, `masked_select`) or scalar read
(`_local_scalar_dense`, what `.item()` and an `if` on a tensor run) happens outside it, seen by a
`TorchDispatchMode`. Budget per forward execution of the layer (a checkpointing recomputation is
one more): dropless, one read (the count exchange's split sizes; with overlap degree 2 the two
chunks' counts are read together, still one); capacity padding, none in every mode (static
shapes: every rank sends every slot its capacity; the ranks' capacities are compared on the
device). Forward and backward, ep 1 and 2, modes `ep`, `sharded` (experts sliced over 2 ranks),
`dp`. Padding over ranks whose token counts differ raises, on every rank, naming the fix."""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.distributed import run_on_ranks

SYNCING = ("_local_scalar_dense", "nonzero", "bincount", "unique", "masked_select")


class SyncingOps(TorchDispatchMode):
    """Counts the ops that read device data on the host, outside `read_to_host`."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from moeflow.comm.host_read import inside_read

        name = str(func)
        if not inside_read() and any(op in name for op in SYNCING):
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


def count_layer_reads(world: int) -> dict:
    """{(experts, mode, padded, overlap, checkpointed): (reads, syncing ops outside)}."""
    from moeflow import MoEConfig, MoELayer, RouterConfig
    from moeflow.comm.host_read import count_reads
    from moeflow.parallel import ParallelDims, parallelize

    ctx = ParallelDims(ep=world).build()
    out = {}
    for experts in (4, 1):  # 1 expert over 2 ranks: sliced, so "sharded" differs from "ep"
        for padded in (False, True):
            router = RouterConfig(top_k=min(2, experts), capacity_factor=1.0 if padded else None,
                                  pad_to_capacity=padded)  # fmt: skip
            cfg = MoEConfig(hidden_size=16, num_experts=experts, ffn_hidden_size=32, router=router)
            torch.manual_seed(0)
            model = parallelize(torch.nn.Sequential(MoELayer(cfg)), ctx)
            for mode in ("ep", "sharded", "dp"):
                for overlap in (1, 2):
                    if padded and overlap > 1:
                        continue  # padding is per rank: one chunk
                    for ckpt in (False, True):
                        x = torch.randn(3, 8, 16, requires_grad=True)

                        def call(x, layer=model[0], mode=mode, overlap=overlap):
                            return layer(x, mode=mode, overlap_degree=overlap)

                        with SyncingOps() as ops, count_reads() as reads:
                            if ckpt:
                                y = torch.utils.checkpoint.checkpoint(call, x, use_reentrant=False)
                            else:
                                y = call(x)
                            y.square().sum().backward()
                        out[(experts, mode, padded, overlap, ckpt)] = (list(reads), dict(ops.seen))
    return out


def _ranks(rank, world):
    return count_layer_reads(world)


def check(results: dict, world: int) -> None:
    assert len(results) == 2 * 3 * (2 * 2 + 2)
    for (experts, mode, padded, overlap, ckpt), (reads, ops) in results.items():
        where = (experts, mode, padded, overlap, ckpt)
        assert ops == {}, (where, ops)  # nothing reads the data outside the one function
        executions = 2 if ckpt else 1  # the recomputation runs the forward again
        want = [] if padded else ["dispatch counts"] * executions
        assert reads == want, (where, reads)


def test_one_host_read_per_call_and_none_with_padding():
    for world in (1, 2):
        for results in run_on_ranks(_ranks, world, timeout=300):
            check(results, world)


def _uneven_padding(rank, world):
    import pytest

    from moeflow import MoEConfig, MoELayer, RouterConfig
    from moeflow.parallel import ParallelDims, parallelize

    ctx = ParallelDims(ep=world).build()
    router = RouterConfig(top_k=2, capacity_factor=1.0, pad_to_capacity=True)
    layer = parallelize(MoELayer(MoEConfig(hidden_size=16, num_experts=4, ffn_hidden_size=32,
                                           router=router)), ctx)  # fmt: skip
    layer(torch.randn(8, 16))  # the same tokens per rank: fine
    capacity = 4 + 2 * rank  # ceil(T * 2 / 4) with T = 8 + 4 * rank
    with pytest.raises(RuntimeError, match=rf"capacity {capacity}\).*same number of tokens"):
        layer(torch.randn(8 + 4 * rank, 16))
    return True


def test_padding_over_ranks_with_different_token_counts_raises_on_every_rank():
    assert run_on_ranks(_uneven_padding, 2) == [True, True]


class OpLog(TorchDispatchMode):
    """The ops run, in order, with the one read's start and wait marked."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.log.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_the_sorts_are_queued_while_the_counts_travel(monkeypatch):
    """Dropless: the read of the counts is started, the device work that needs no count (each
    chunk's sort of its pairs by slot) is queued, and only then does the host wait; no sort is
    left for after the wait (on an accelerator the device sorts while the copy lands)."""
    from moeflow import MoEConfig, MoELayer, RouterConfig
    from moeflow.comm import dispatcher, host_read

    mode = OpLog()
    real_start = host_read.start_read

    def start(t, what):
        pending = real_start(t, what)
        mode.log.append("<start>")
        real_wait = pending.wait
        pending.wait = lambda: mode.log.append("<wait>") or real_wait()
        return pending

    monkeypatch.setattr(dispatcher, "start_read", start)
    cfg = MoEConfig(hidden_size=16, num_experts=4, ffn_hidden_size=32, router=RouterConfig(top_k=2))
    layer = MoELayer(cfg)
    for chunks in (1, 2):
        mode.log.clear()
        with mode:
            layer(torch.randn(12, 16), overlap_degree=chunks)
        log = mode.log
        start_at, wait_at = log.index("<start>"), log.index("<wait>")
        assert log[start_at:wait_at].count("sort") == chunks
        assert log[wait_at:].count("sort") == 0
