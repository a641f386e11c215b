"""`torch.compile` of an MoE layer: graph breaks counted by `torch._dynamo.explain`, and the
compiled layer's outputs and gradients (router, experts, input, shared expert, biases) against
the eager layer's, in float64 (the same math: 1e-10).

- dropless: 2 breaks, both around the dispatch region that holds the call's one host read (the
  count exchange's split sizes) and its collectives, run eagerly; router, capacity and losses are
  compiled;
- capacity padding (static shapes): no break, `fullgraph=True` compiles, on one rank through
  `moeflow.moe.padded_experts`.

Most cases run on `aot_eager` (Dynamo and AOTAutograd, the tracing that can lose a gradient:
a balancing loss's did, before `attach_loss` copied its output under compile); the padded layer
also runs through inductor, the default backend."""

from __future__ import annotations

import functools

import pytest
import torch

from moeflow import MoEConfig, MoELayer, RouterConfig
from tests.distributed import run_on_ranks

D = 16
PADDED = {"capacity_factor": 1.0, "pad_to_capacity": True}


def layer(router: dict, **moe) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=D, num_experts=4, ffn_hidden_size=24,
                    router=RouterConfig(**router), **moe)  # fmt: skip
    m = MoELayer(cfg).double()
    with torch.no_grad():
        m.router.weight.normal_()  # varied routing, so capacity drops tokens
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_()  # biases, gates: nonzero
    return m


def step(m, x, **call):
    x = x.clone().requires_grad_(True)
    m.zero_grad()
    y = m(x, **call)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in m.parameters()]


def explain(m, x):
    torch._dynamo.reset()
    return torch._dynamo.explain(m)(x)


def test_dropless_breaks_twice_around_the_dispatch_region():
    m = layer({"top_k": 2})
    e = explain(m, torch.randn(3, 8, D, dtype=torch.float64))
    assert (e.graph_count, e.graph_break_count) == (3, 2)
    for reason in e.break_reasons:
        assert "ExpertDispatch._dispatch" in reason.reason


@pytest.mark.parametrize(
    "router", [{"top_k": 2, **PADDED}, {"top_k": 1, **PADDED, "drop_policy": "position"}]
)
def test_padded_layer_compiles_in_one_graph(router):
    m = layer(router)
    e = explain(m, torch.randn(3, 8, D, dtype=torch.float64))
    assert (e.graph_count, e.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 8, D, dtype=torch.float64)
    for got, want in zip(step(compiled, x), step(m, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


CASES = [
    ({"top_k": 2}, {}, {}),
    ({"top_k": 2}, {}, {"overlap_degree": 2}),
    ({"top_k": 1, "z_loss_coeff": 1e-2}, {"activation": "gelu", "ffn_bias": True}, {}),
    ({"top_k": 2, "capacity_factor": 0.75}, {}, {}),  # dropping, unpadded
    ({"top_k": 2, **PADDED}, {}, {}),
    ({"top_k": 2, **PADDED}, {}, {"mode": "dp"}),
    ({"top_k": 2, **PADDED}, {}, {"mode": "sharded"}),
    ({"top_k": 1, **PADDED, "drop_policy": "position"}, {"activation": "gelu_tanh"}, {}),
    ({"top_k": 2, **PADDED}, {"ffn_bias": True, "activation": "relu"}, {}),
    ({"top_k": 2, **PADDED}, {"shared_expert_ffn_hidden_size": 8, "shared_expert_gate": True}, {}),
    ({"top_k": 2, **PADDED, "capacity_factor": 0.5}, {"a2a_dim": 8}, {}),
]


@pytest.mark.parametrize("router, moe, call", CASES)
def test_compiled_layer_equals_eager(router, moe, call):
    m = layer(router, **moe)
    x = torch.randn(3, 8, D, dtype=torch.float64)
    want = step(m, x, **call)
    want_stats = m.last_stats
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph="pad_to_capacity" in router)
    for _ in range(2):  # the second call runs the cached graphs
        got = step(compiled, x, **call)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        stats = m.last_stats  # recorded by the compiled call, as by the eager one
        assert stats is not want_stats
        assert torch.equal(stats.tokens_per_expert, want_stats.tokens_per_expert)
        assert stats.dropped_fraction.item() == want_stats.dropped_fraction.item()
        assert stats.traffic.mode == want_stats.traffic.mode


def test_inductor_compiled_padded_layer_equals_eager():
    """Inductor, the default backend, on the one-graph layer (the dropless layer under inductor:
    `tests/test_trainer.py::test_compiled_blocks_train_as_eager`)."""
    router = {"top_k": 2, **PADDED}
    m = layer(router)
    x = torch.randn(3, 8, D, dtype=torch.float64)
    want = step(m, x)
    torch._dynamo.reset()
    got = step(torch.compile(m, fullgraph=True), x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _two_ranks(rank, world):
    """At ep 2: break counts and compiled == eager, dropless and padded (fullgraph: the
    all-to-alls as functional collectives), and padding with different token counts raising."""
    from moeflow.parallel import ParallelDims, parallelize

    ctx = ParallelDims(ep=world).build()
    x = torch.randn(3, 8, D, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    found = {}
    for name, router, moe, call in [
        ("dropless", {"top_k": 2}, {}, {}),
        ("padded", {"top_k": 2, **PADDED}, {}, {}),
        ("padded, bias, shared", {"top_k": 1, **PADDED}, {"ffn_bias": True,
                                                          "shared_expert_ffn_hidden_size": 8}, {}),
        ("padded dp", {"top_k": 2, **PADDED}, {}, {"mode": "dp"}),
    ]:  # fmt: skip
        m = parallelize(layer(router, **moe), ctx)
        e = explain(functools.partial(m, **call), x)
        found[name] = e.graph_break_count
        want = step(m, x, **call)
        torch._dynamo.reset()
        compiled = torch.compile(m, backend="aot_eager", fullgraph=found[name] == 0)
        for _ in range(2):
            got = step(compiled, x, **call)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        if name == "padded":  # 4 more tokens on rank 1: another capacity
            uneven = torch.randn(3 * 8 + 4 * rank, D, dtype=torch.float64)
            with pytest.raises(RuntimeError, match="same number of tokens"):
                compiled(uneven)
    return found


def test_compiled_layer_at_ep_2_equals_eager_and_padding_compiles_whole():
    want = {"dropless": 2, "padded": 0, "padded, bias, shared": 0, "padded dp": 2}
    assert run_on_ranks(_two_ranks, 2, timeout=300) == [want, want]
