"""Selective activation checkpointing (`train.activation_checkpointing = "selective"`): the
recomputation in backward replays the MoE layers' exchanges instead of repeating them (no
all-to-all, no count exchange), and the gradients are those of no checkpointing and of full
checkpointing (float64, 1e-12), on 2 gloo ranks at ep 2, with two pipelined chunks; nothing kept
outlives the step."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed import run_on_ranks
from tests.test_fsdp import run_cfg


def _collectives(rank, world):
    from moeflow.comm.replay import CollectiveReplay
    from moeflow.models.decoder import MoEDecoder
    from moeflow.parallel import DispatchConfig, ParallelDims, parallelize
    from moeflow.parallel.grad_sync import GradSync

    ctx = ParallelDims(dp=1, ep=2).build()
    calls = {"a2a": 0}
    real = dist.all_to_all_single

    def counted(*args, **kwargs):
        calls["a2a"] += 1
        return real(*args, **kwargs)

    dist.all_to_all_single = counted
    out = {}
    try:
        for mode in (False, True, "selective"):
            with torch.device("meta"):
                model = MoEDecoder(run_cfg(Path("unused"), 2, 1).model)
            parallelize(model, ctx, DispatchConfig(overlap_degree=2))
            model.to_empty(device="cpu")
            model.init_weights(seed=5)
            model.double()
            model.activation_checkpointing = mode
            sync = GradSync(model, ctx)
            x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(rank))
            calls["a2a"] = 0
            loss = model(x, x)
            forward = calls["a2a"]
            loss.backward()
            backward = calls["a2a"] - forward
            del loss
            gc.collect()  # what selective checkpointing kept goes with the step
            kept = sum(isinstance(o, CollectiveReplay) for o in gc.get_objects())
            sync.sync()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            out[mode] = (forward, backward, grads, kept)
    finally:
        dist.all_to_all_single = real
    return out


def test_selective_recomputation_repeats_no_exchange_and_keeps_the_gradients():
    for ranks in run_on_ranks(_collectives, 2, timeout=240):
        (f0, b0, g0, _), (f1, b1, g1, _), (f2, b2, g2, k2) = (
            ranks[False],
            ranks[True],
            ranks["selective"],
        )
        assert k2 == 0
        assert f0 == f1 == f2 > 0  # the forward exchanges alike
        # 2 MoE layers x (1 count exchange + 2 chunks x (dispatch + combine)) repeated by full
        # checkpointing's recomputation; none by the selective one.
        assert b1 - b0 == 2 * (1 + 2 * 2) and b2 == b0
        for name, g in g0.items():
            assert torch.allclose(g1[name], g, rtol=1e-12, atol=1e-15), name
            assert torch.allclose(g2[name], g, rtol=1e-12, atol=1e-15), name
