"""The grouped expert FFN (the MoE layer's expert path on one rank): gradcheck, agreement with a
per-expert dense FFN, idle experts, autocast."""

from __future__ import annotations

import pytest
import torch

from moeflow import FeedForward, GroupedExperts
from moeflow.moe.expert_compute import grouped_ffn


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_gradcheck_with_idle_expert(activation):
    torch.manual_seed(0)
    g = 2 if activation == "swiglu" else 1
    rows = [3, 0, 2, 4]
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 5, g * 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: grouped_ffn(a, b, c, rows, activation), (x, w1, w2)
    )


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_equals_dense_ffn_per_expert(activation):
    torch.manual_seed(1)
    experts = GroupedExperts(3, 8, 16, activation).double()
    rows = [5, 0, 7]
    x = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    y = experts(x, rows)
    gy = torch.randn_like(y)
    y.backward(gy)
    start = 0
    for e, n in enumerate(rows):
        dense = FeedForward(8, 16, activation).double()
        with torch.no_grad():
            dense.w1.copy_(experts.w1[e])
            dense.w2.copy_(experts.w2[e])
        xe = x[start : start + n].detach().requires_grad_(True)
        ye = dense(xe)
        ye.backward(gy[start : start + n])
        torch.testing.assert_close(y[start : start + n], ye)
        torch.testing.assert_close(x.grad[start : start + n], xe.grad)
        torch.testing.assert_close(experts.w1.grad[e], dense.w1.grad)
        torch.testing.assert_close(experts.w2.grad[e], dense.w2.grad)
        start += n
    assert torch.count_nonzero(experts.w1.grad[1]) == 0  # idle expert: zero, not garbage


def test_bad_group_sizes():
    experts = GroupedExperts(2, 4, 8)
    with pytest.raises(ValueError, match="groups, expected 2"):
        experts(torch.randn(3, 4), [3])
    with pytest.raises(ValueError, match="sums to 2"):
        experts(torch.randn(3, 4), [1, 1])


def test_autocast_matches_bf16_dense():
    torch.manual_seed(2)
    experts = GroupedExperts(2, 8, 16, "swiglu")
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, [4, 2])
        dense = FeedForward(8, 16)
        with torch.no_grad():
            dense.w1.copy_(experts.w1[0])
            dense.w2.copy_(experts.w2[0])
        ref = dense(x[:4])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y[:4].float(), ref.float(), rtol=2e-2, atol=2e-2)
