"""An MoE whose experts are all the same FFN is that FFN; one expert with k=1 is the dense FFN."""

from __future__ import annotations

import pytest
import torch

from moeflow import FeedForward, GroupedExperts, MoEConfig, MoELayer, RouterConfig


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_identical_experts_equal_dense(activation, top_k):
    torch.manual_seed(0)
    ffn = FeedForward(16, 24, activation).double()
    cfg = MoEConfig(
        hidden_size=16,
        num_experts=8,
        ffn_hidden_size=24,
        activation=activation,
        router=RouterConfig(top_k=top_k),
    )
    moe = MoELayer.from_dense(ffn, cfg)
    with torch.no_grad():
        moe.router.weight.normal_()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), ffn(x), rtol=1e-12, atol=1e-12)


def test_single_expert_top1_equals_dense_with_gradients():
    torch.manual_seed(1)
    cfg = MoEConfig(hidden_size=16, num_experts=1, ffn_hidden_size=24, router=RouterConfig(top_k=1))
    ffn = FeedForward(16, 24).double()
    moe = MoELayer.from_dense(ffn, cfg)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    moe(x).square().sum().backward()
    ffn(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(moe.experts.w1.grad[0], ffn.w1.grad)
    torch.testing.assert_close(moe.experts.w2.grad[0], ffn.w2.grad)


def test_expert_initialisation_matches_dense_distribution():
    torch.manual_seed(2)
    experts = GroupedExperts(64, 128, 256, "gelu")
    dense = FeedForward(128, 256, "gelu")
    for ours, theirs in ((experts.w1, dense.w1), (experts.w2, dense.w2)):
        bound = 1 / ours.shape[-2] ** 0.5
        assert ours.abs().max() <= bound and theirs.abs().max() <= bound
        torch.testing.assert_close(ours.std(), theirs.std(), rtol=0.05, atol=0)
        assert ours.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)  # U(-b, b)


def test_from_dense_rejects_mismatched_shape():
    ffn = FeedForward(16, 24)
    with pytest.raises(ValueError, match=r"moe\.hidden_size"):
        MoELayer.from_dense(ffn, MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=24))
    with pytest.raises(ValueError, match=r"moe\.activation"):
        MoELayer.from_dense(
            ffn, MoEConfig(hidden_size=16, num_experts=2, ffn_hidden_size=24, activation="gelu")
        )
