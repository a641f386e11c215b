"""Host reads of an MoE layer call, counted on CPU: every device-to-host read of the path goes
through `moeflow.comm.host_read.read_to_host` (counted by name), and no op whose output size
depends on the data (`bincount`, `nonzero`, `unique`, `masked_select`) or scalar read
(`_local_scalar_dense`, what `.item()` and an `if` on a tensor run) happens outside it, seen by a
`TorchDispatchMode`. Budget per forward execution of the layer (a checkpointing recomputation is
one more): dropless, one read (the count exchange's split sizes; with overlap degree 2 the two
chunks' counts are read together, still one); capacity padding, none in every mode (static
shapes: every rank sends every slot its capacity; the ranks' capacities are compared on the
device). Forward and backward, ep 1 and 2, modes `ep`, `sharded` (experts sliced over 2 ranks),
`dp`. At ep > 1 a call unlike this rank's previous one also reads the ranks' agreement on the call
("call agreement"); the next call of the same kind does not. Indexing with a boolean mask counts
as a syncing op (a hidden `nonzero` on an accelerator). Padding over ranks whose token counts
differ raises, naming every rank's call and the fix."""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.distributed import run_on_ranks

SYNCING = ("_local_scalar_dense", "nonzero", "bincount", "unique", "masked_select")
# Indexing with a boolean mask (`x[mask]`, `x[mask] = y`) sizes its output from the data: a
# hidden `nonzero` on an accelerator, which the CPU kernels do without dispatching one.
INDEXING = ("aten.index.Tensor", "aten.index_put", "aten._index_put_impl_")


def _boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncingOps(TorchDispatchMode):
    """Counts the ops that read device data on the host, outside `read_to_host`."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from moeflow.comm.host_read import inside_read

        name = str(func)
        syncing = any(op in name for op in SYNCING)
        syncing = syncing or (name.startswith(INDEXING) and _boolean_index(args))
        if not inside_read() and syncing:
            self.seen[name] += 1
        if name == "aten._assert_async.msg" and len(args[1]) >= 255:
            self.seen["device assertion message of 255 characters or more"] += 1  # CUDA refuses
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

                        calls = []  # the first call of a kind is checked, the second not
                        for _ in range(2):
                            with SyncingOps() as ops, count_reads() as reads:
                                if ckpt:
                                    y = torch.utils.checkpoint.checkpoint(
                                        call, x, use_reentrant=False
                                    )
                                else:
                                    y = call(x)
                                y.square().sum().backward()
                            calls.append((list(reads), dict(ops.seen)))
                        out[(experts, mode, padded, overlap, ckpt)] = calls
    return out


def _ranks(rank, world):
    return count_layer_reads(world)


def check(results: dict, world: int) -> None:
    assert len(results) == 2 * 3 * (2 * 2 + 2)
    previous = None  # the last call's (model, mode, chunks): cases run in the results' order
    for (experts, mode, padded, overlap, ckpt), calls in results.items():
        executions = 2 if ckpt else 1  # the recomputation runs the forward again
        want = [] if padded else ["dispatch counts"] * executions
        # A call unlike this rank's previous one reads the ranks' agreement once (before any
        # other read); the next call of the same kind reads nothing more. (`dp` runs one chunk
        # whatever the overlap degree asked.)
        kind = (experts, padded, mode, 1 if mode == "dp" else overlap)
        checked = ["call agreement"] if world > 1 and kind != previous else []
        previous = kind
        expectations = (checked + want, want)
        for i, ((reads, ops), expected) in enumerate(zip(calls, expectations, strict=True)):
            where = (experts, mode, padded, overlap, ckpt, f"call {i}")
            assert ops == {}, (where, ops)  # nothing reads the data outside the one function
            assert reads == expected, (where, reads)


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
    # capacity ceil(T * 2 / 4) with T = 8 + 4 * rank: 4 on rank 0, 6 on rank 1
    calls = r"rank 0: 'ep' x1 capacity 4, rank 1: 'ep' x1 capacity 6\).*same number of tokens"
    with pytest.raises(RuntimeError, match=calls):
        layer(torch.randn(8 + 4 * rank, 16))
    layer(torch.randn(8, 16))  # the same tokens per rank: fine
    # Both ranks change their call, differently: each reads the agreement and raises.
    calls = r"rank 0: 'dp' x1 capacity 4, rank 1: 'ep' x1 capacity 6\)"
    with pytest.raises(RuntimeError, match=calls):
        layer(torch.randn(8 + 4 * rank, 16), mode="dp" if rank == 0 else "ep")
    return True


def test_padding_over_ranks_with_different_token_counts_raises_on_every_rank():
    """The first call of every rank is checked, so it raises on every rank; later, a rank whose
    call changed raises naming every rank's call."""
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


def test_the_compiled_paths_device_assertion_fits_cuda():
    """The compiled padded path checks the ranks' agreement with a device assertion; CUDA
    refuses messages of 255 characters or more, whatever the layer's name."""
    from moeflow.moe.expert_dispatch import compiled_disagreement

    for name in ("moe", "model.layers.31.block_sparse_moe" * 10):
        message = compiled_disagreement(name)
        assert len(message) < 255 and "same mode=" in message
