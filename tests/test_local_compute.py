"""Where no row travels (one rank, one chunk, no capacity padding) and the experts weight their
rows (F <= D), they read their rows from token order and add their outputs back into it
(`moeflow.comm.local_compute`): bitwise the same outputs and gradients as the buffered path
(permute, compute, combine: the same GEMMs on the same rows, the same sums in the same order) on
both CPU kernels, with drops, null experts, biases, SwiGLU and experts that get no row; and the
path runs exactly where it should."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moeflow.comm.dispatcher as dispatcher
from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.moe.expert_compute import GroupedExpertCompute

D = 16
REAL = dispatcher._stays_local


def layer_of(seed: int = 0, **cfg) -> MoELayer:
    sizes = {"hidden_size": D, "num_experts": 6, "ffn_hidden_size": 8}
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(**{**sizes, **cfg}))
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)
    return layer.double()


def spy(monkeypatch) -> dict:
    """Counts of the local path's and the buffered path's calls."""
    seen = {"local": 0, "permute": 0}
    local, permute = dispatcher.local_compute, dispatcher.permute

    def count(name, fn):
        def inner(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)

        return inner

    monkeypatch.setattr(dispatcher, "local_compute", count("local", local))
    monkeypatch.setattr(dispatcher, "permute", count("permute", permute))
    return seen


def step(layer: MoELayer, x, g, local: bool, monkeypatch, **call):
    monkeypatch.setattr(dispatcher, "_stays_local", REAL if local else lambda *a: False)
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x, **call)
    (y * g).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


CASES = {
    "gelu-loop": {"activation": "gelu", "expert_kernel": "loop",
                  "router": RouterConfig(top_k=2)},
    "swiglu-grouped_loop-drops": {"activation": "swiglu", "expert_kernel": "grouped_loop",
                                  "router": RouterConfig(top_k=3, capacity_factor=0.75)},
    "relu-bias-F=D": {"activation": "relu", "ffn_hidden_size": D, "ffn_bias": True,
                      "router": RouterConfig(top_k=2)},
    "gelu-null-experts": {"activation": "gelu", "expert_kernel": "grouped_loop",
                          "router": RouterConfig(top_k=2, type="null", num_null_experts=2)},
    "gelu_tanh-a2a_dim": {"activation": "gelu_tanh", "a2a_dim": 8,
                          "router": RouterConfig(top_k=4)},
}  # fmt: skip


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_token_order_equals_the_buffered_path(case, monkeypatch):
    seen = spy(monkeypatch)
    layer = layer_of(**case)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(41, D, generator=gen, dtype=torch.float64)
    g = torch.randn(41, D, generator=gen, dtype=torch.float64)
    want = step(layer, x, g, False, monkeypatch)
    assert seen == {"local": 0, "permute": 1}
    got = step(layer, x, g, True, monkeypatch)
    assert seen == {"local": 1, "permute": 1}, "the token-order path did not run"
    if case["router"].capacity_factor is not None:
        assert layer.last_stats.dropped_fraction > 0, "the case should drop pairs"
    tol = {"rtol": 0, "atol": 0}  # the same sums in the same order: bitwise
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **tol, msg=name)


def test_experts_without_rows_get_zero_gradients(monkeypatch):
    layer = layer_of(expert_kernel="grouped_loop", router=RouterConfig(top_k=1))
    with torch.no_grad():  # every token to expert 2: the other experts get no row
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
    x = torch.rand(9, D, dtype=torch.float64) + 0.1
    _, _, grads = step(layer, x, torch.randn(9, D, dtype=torch.float64), True, monkeypatch)
    idle = [e for e in range(6) if e != 2]
    assert grads["experts.w1"][idle].abs().sum() == 0
    assert grads["experts.w2"][idle].abs().sum() == 0
    assert grads["experts.w1"][2].abs().sum() > 0


@pytest.mark.parametrize(
    ("cfg", "call", "local"),
    [
        ({}, {}, True),
        ({"expert_kernel": "grouped_loop"}, {}, True),
        ({"ffn_hidden_size": 24}, {}, False),  # F > D: the combine weights the D-wide rows
        ({"expert_kernel": "grouped_mm"}, {}, False),  # wants one row buffer
        ({}, {"overlap_degree": 2}, False),
        ({"router": RouterConfig(top_k=2, capacity_factor=1.0, pad_to_capacity=True)}, {}, False),
    ],
    ids=["auto", "grouped_loop", "F>D", "grouped_mm", "two-chunks", "padded"],
)
def test_where_the_token_order_runs(cfg, call, local, monkeypatch):
    seen = spy(monkeypatch)
    layer = layer_of(**cfg).float()
    x = torch.randn(12, D)
    y = layer(x, **call)
    chunks = call.get("overlap_degree", 1)
    assert seen == ({"local": 1, "permute": 0} if local else {"local": 0, "permute": chunks})
    assert y.shape == (12, D)
    assert layer.last_stats.traffic.sent_bytes == 0


def test_token_order_runs_grouped_mm_as_grouped_loop():
    """A compute asked for `grouped_mm` (one row buffer) that is handed token order anyway (its
    gathered weights may choose differently from its slices) runs one mm per expert instead;
    the outputs are the weighted rows."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, D, generator=gen)
    w1, w2 = torch.randn(3, D, 16, generator=gen), torch.randn(3, 8, D, generator=gen)
    src = torch.tensor([0, 3, 4, 9, 1, 3, 5, 2, 7, 8])
    row_w = torch.rand(10, generator=gen)
    blocks = [(0, 0, 4), (1, 4, 7), (2, 7, 10)]
    outs = {}
    for kernel in ("loop", "grouped_mm"):
        compute = GroupedExpertCompute("swiglu", weighted=True, kernel=kernel)
        outs[kernel] = compute.forward_tokens((w1, w2), x, src, row_w, blocks)[0]
    torch.testing.assert_close(outs["grouped_mm"], outs["loop"], rtol=1e-5, atol=1e-5)
    want = torch.empty(10, D)  # row r: expert e's output on token src[r], weighted
    for e, lo, hi in blocks:
        gate, up = (x[src[lo:hi]] @ w1[e]).chunk(2, dim=-1)
        want[lo:hi] = row_w[lo:hi, None] * ((F.silu(gate) * up) @ w2[e])
    torch.testing.assert_close(outs["loop"], want, rtol=1e-5, atol=1e-5)
