"""GradSync with buckets sent from backward hooks gives the post-backward sync's gradients, bit for
bit, on dp2 x ep2 and dp4 (4 gloo ranks), with gradient accumulation and several buckets."""

from __future__ import annotations

import pytest
import torch

from moeflow import MoEConfig, RouterConfig
from moeflow.parallel import GradSync, ParallelDims, parallelize
from tests.distributed import run_on_ranks
from tests.ep_reference import build_router_net

D = 8


def _grads(ctx, overlap: bool, micro_batches: int) -> dict[str, torch.Tensor]:
    cfg = MoEConfig(
        hidden_size=D, num_experts=4, ffn_hidden_size=12,
        router=RouterConfig(type="rmoe", rnn_dim=6, top_k=2),  # a GRU cell shared by both layers
    )  # fmt: skip
    model = parallelize(build_router_net(cfg), ctx)
    sync = GradSync(model, ctx, bucket_mb=0.0005, overlap=overlap)  # ~500 bytes: many buckets
    assert len(sync.buckets) > 5
    gen = torch.Generator().manual_seed(10 + ctx.rank)
    for micro in range(micro_batches):
        x = torch.randn(9 + micro, D, dtype=torch.float64, generator=gen)
        loss = model(x).square().mean() / micro_batches
        if micro < micro_batches - 1:
            with sync.no_sync():
                loss.backward()
        else:
            loss.backward()
            if overlap:  # the hooks sent (almost) everything during the backward
                assert sync._next > 0
    sync.sync()
    sync.close()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _compare(rank, world, dp, ep):
    ctx = ParallelDims(dp=dp, ep=ep).build()
    for micro_batches in (1, 3):
        plain = _grads(ctx, overlap=False, micro_batches=micro_batches)
        overlapped = _grads(ctx, overlap=True, micro_batches=micro_batches)
        assert plain.keys() == overlapped.keys()
        for name, grad in plain.items():
            assert torch.equal(overlapped[name], grad), (name, micro_batches)
    return True


@pytest.mark.parametrize(("dp", "ep"), [(2, 2), (4, 1)])
def test_overlapped_sync_equals_post_backward_sync(dp, ep):
    assert run_on_ranks(_compare, 4, args=(dp, ep)) == [True] * 4


def _second_backward(rank, world):
    ctx = ParallelDims(ep=world).build()
    cfg = MoEConfig(hidden_size=D, num_experts=2, ffn_hidden_size=12)
    model = parallelize(build_router_net(cfg), ctx)
    sync = GradSync(model, ctx, overlap=True)
    model(torch.randn(4, D, dtype=torch.float64)).sum().backward()
    try:
        model(torch.randn(4, D, dtype=torch.float64)).sum().backward()
    except RuntimeError as exc:
        sync.sync()  # the first backward's buckets are still waited for
        return str(exc)
    return "no error"


def test_a_second_backward_before_sync_is_refused_with_the_fix():
    for message in run_on_ranks(_second_backward, 2):
        assert "no_sync()" in message, message
