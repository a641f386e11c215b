"""EP edge cases: idle experts and ranks, remote-only tokens, a rank without any FFN pair, bad
input, dead peers."""

from __future__ import annotations

import os
import time

import pytest
import torch

from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.parallel import GradSync, ParallelDims, parallelize
from tests.distributed import run_on_ranks

D, E = 8, 8


def layer_cfg(**router) -> MoEConfig:
    return MoEConfig(
        hidden_size=D, num_experts=E, ffn_hidden_size=12, router=RouterConfig(**router)
    )


def steered_layer(cfg: MoEConfig) -> MoELayer:
    """Feature 0 is a constant 1 on every token: router row 3 gets -50 there (expert 3 is never
    chosen); feature 1 marks rank 0's tokens, and rows 4 and 5 (remote for rank 0 at ep=2) get +50 /
    +40 there, so rank 0 routes everything to rank 1."""
    torch.manual_seed(0)
    layer = MoELayer(cfg).double()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.5)
        layer.router.weight[:, :2] = 0.0
        layer.router.weight[3, 0] = -50.0
        layer.router.weight[4, 1] = 50.0
        layer.router.weight[5, 1] = 40.0
    return layer


def _edges(rank, world):
    ctx = ParallelDims(ep=world).build()
    cfg = layer_cfg(top_k=2)
    shards = [10, 0]  # rank 1 has no tokens at all
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, D, dtype=torch.float64, generator=gen) for n in shards]
    for r, x in enumerate(xs):
        x[:, 0] = 1.0
        x[:, 1] = 1.0 if r == 0 else 0.0
    ref, par = steered_layer(cfg), steered_layer(cfg)
    parallelize(par, ctx)
    x = xs[rank].clone().requires_grad_(True)
    out = par(x)
    out.square().sum().backward()
    GradSync(par, ctx).sync()
    sent = par.last_stats.traffic.sent_rows

    ref.aux_loss_scale = 1.0 / world
    ref_outs = [ref(t) for t in xs]
    sum(o.square().sum() for o in ref_outs).div(world).backward()
    torch.testing.assert_close(out, ref_outs[rank])
    for w in ("w1", "w2"):
        got = getattr(par.experts, w).grad
        want = getattr(ref.experts, w).grad[par.local_experts]
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(par.router.weight.grad, ref.router.weight.grad)
    expert3_grad = ref.experts.w1.grad[3].abs().sum().item()
    return sent, expert3_grad, out.shape[0], _no_ffn_pair_on_one_rank(rank, world, ctx)


def _no_ffn_pair_on_one_rank(rank, world, ctx) -> int:
    """AdaMoE: rank 1's tokens pick only null experts, so rank 1 permutes no row at all (it still
    receives rank 0's). Feature 0 is a constant 1, feature 1 marks rank 0's tokens: the FFN
    experts' logits are +50 on rank 0 and -50 on rank 1, the null experts' 0."""
    cfg = MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=12,
                    router=RouterConfig(type="null", num_null_experts=4, top_k=2))  # fmt: skip

    def build() -> MoELayer:
        torch.manual_seed(0)
        layer = MoELayer(cfg).double()
        with torch.no_grad():
            layer.router.weight.normal_(0.0, 0.5)
            layer.router.weight[:, 0] = -50.0
            layer.router.weight[:, 1] = 100.0
            layer.router.null_weight.zero_()
        return layer

    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(n, D, dtype=torch.float64, generator=gen) for n in (7, 5)]
    for r, x in enumerate(xs):
        x[:, 0], x[:, 1] = 1.0, 1.0 if r == 0 else 0.0
    ref, par = build(), build()
    parallelize(par, ctx)
    out = par(xs[rank])
    out.square().sum().backward()
    GradSync(par, ctx).sync()
    ref.aux_loss_scale = 1.0 / world
    ref_outs = [ref(t) for t in xs]
    sum(o.square().sum() for o in ref_outs).div(world).backward()
    torch.testing.assert_close(out, ref_outs[rank])
    for w in ("w1", "w2"):
        want = getattr(ref.experts, w).grad[par.local_experts]
        torch.testing.assert_close(getattr(par.experts, w).grad, want)
    return int(par.last_stats.tokens_per_expert.sum())  # this rank's FFN pairs


def test_idle_expert_idle_rank_and_all_remote_tokens():
    (sent0, idle_grad, n0, ffn0), (sent1, _, n1, ffn1) = run_on_ranks(_edges, 2)
    assert (n0, n1) == (10, 0)
    assert sent0 == 10 * 2  # every (token, slot) pair of rank 0 went to rank 1
    assert sent1 == 0
    assert idle_grad == 0.0  # expert 3: no token anywhere, zero gradient (not garbage)
    assert (ffn0, ffn1) == (7 * 2, 0)  # rank 1: tokens, but not one FFN pair


def _bad_inputs(rank, world):
    errors = []
    try:
        ParallelDims(dp=1, ep=4).build()
    except ValueError as exc:
        errors.append(str(exc))
    ctx = ParallelDims(ep=world).build()
    try:
        parallelize(MoELayer(MoEConfig(hidden_size=D, num_experts=3, ffn_hidden_size=4)), ctx)
    except ValueError as exc:
        errors.append(str(exc))
    try:  # rank 1 built a different config
        parallelize(MoELayer(layer_cfg(top_k=2 if rank == 0 else 1)), ctx)
    except ValueError as exc:
        errors.append(str(exc))
    return errors


def test_bad_input_is_a_clear_error_on_every_rank():
    for errors in run_on_ranks(_bad_inputs, 2):
        assert len(errors) == 3
        assert "parallel.dp (1) x parallel.ep (4) = 4 must equal the world size (2)" in errors[0]
        assert "moe.num_experts (3)" in errors[1] and "expert group of 2 ranks" in errors[1]
        assert "Valid expert-group sizes for these sizes: [1, 3, 6, 12]" in errors[1]
        assert "MoE layers differ between ranks 0 and 1" in errors[2]


def _dead_peer(rank, world, how, done):
    ctx = ParallelDims(ep=world, timeout_s=3).build()
    layer = parallelize(torch.nn.Sequential(MoELayer(layer_cfg(top_k=2))), ctx)
    if rank == 1:
        if how == "hangs":  # alive, but never joins the all-to-all: the timeout ends rank 0
            deadline = time.monotonic() + 60
            while not os.path.exists(done) and time.monotonic() < deadline:
                time.sleep(0.05)  # until rank 0 has its error, not a guessed time
        return "left"
    try:
        layer(torch.randn(6, D))
    except RuntimeError as exc:
        return str(exc)
    finally:
        open(done, "w").close()
    return "no error"


@pytest.mark.parametrize("how", ["exits", "hangs"])
def test_dead_peer_ends_with_an_error_naming_the_layer(how, tmp_path):
    done = str(tmp_path / "rank 0 is done")
    message, left = run_on_ranks(_dead_peer, 2, args=(how, done), timeout=60)
    assert left == "left"
    assert message.startswith("MoE layer '0':"), message
