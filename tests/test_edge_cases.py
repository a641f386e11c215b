"""Bad input, empty batches, degenerate routing, autocast, determinism."""

from __future__ import annotations

import pytest
import torch

from moeflow import MoEConfig, MoELayer, RouterConfig
from tests.reference import reference_moe


def cfg(**router_kw) -> MoEConfig:
    return MoEConfig(
        hidden_size=8, num_experts=4, ffn_hidden_size=16, router=RouterConfig(**router_kw)
    )


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: cfg(top_k=5), r"moe\.router\.top_k \(5\) must be <= moe\.num_experts \(4\)"),
        (lambda: cfg(top_k=0), r"router\.top_k \(0\)"),
        (
            lambda: MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=16, activation="tanh"),
            r"moe\.activation \('tanh'\) must be one of",
        ),
        (lambda: cfg(drop_policy="random"), r"router\.drop_policy \('random'\)"),
        (lambda: cfg(score_function="relu"), r"router\.score_function"),
        (lambda: cfg(aux_loss_type="global"), r"router\.aux_loss_type"),
        (lambda: cfg(capacity_factor=0.0), r"router\.capacity_factor \(0\.0\) must be > 0"),
        (lambda: cfg(capacity_factor=-1.0), r"router\.capacity_factor \(-1\.0\)"),
        (lambda: cfg(capacity_factor=float("nan")), r"router\.capacity_factor"),
        (lambda: cfg(pad_to_capacity=True), r"router\.pad_to_capacity"),
        (lambda: cfg(aux_loss_coeff=-1.0), r"router\.aux_loss_coeff"),
        (lambda: cfg(min_capacity=-2), r"router\.min_capacity"),
        (lambda: cfg(input_jitter_eps=1.5), r"router\.input_jitter_eps"),
        (lambda: cfg(router_dtype="bf16"), r"router\.router_dtype"),
        (lambda: MoEConfig(hidden_size=0, num_experts=4, ffn_hidden_size=16), r"moe\.hidden_size"),
        (
            lambda: MoEConfig.from_dict(
                {"hidden_size": 8, "num_experts": 4, "ffn_hidden_size": 8, "router": {"topk": 2}}
            ),
            r"moe\.router: unknown field",
        ),
    ],
)
def test_bad_config_names_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_config_round_trip_and_fingerprint():
    c = cfg(top_k=2, capacity_factor=1.25)
    assert MoEConfig.from_dict(c.to_dict()) == c
    assert c.fingerprint() == MoEConfig.from_dict(c.to_dict()).fingerprint()
    assert c.fingerprint() != cfg(top_k=2, capacity_factor=1.5).fingerprint()


def test_wrong_last_dim_names_hidden_size():
    layer = MoELayer(cfg())
    with pytest.raises(ValueError, match=r"last dim \(7\) must equal moe\.hidden_size \(8\)"):
        layer(torch.randn(3, 7))


@pytest.mark.parametrize(
    "router_kw",
    [
        {},
        {"capacity_factor": 1.0, "pad_to_capacity": True},
        {"aux_loss_type": "seq_aux_loss", "z_loss_coeff": 1e-3},
    ],
)
def test_empty_batch_gives_empty_output(router_kw):
    layer = MoELayer(cfg(**router_kw))
    x = torch.randn(2, 0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert layer.experts.w1.grad is not None and layer.experts.w1.grad.abs().sum() == 0
    assert layer.last_stats.tokens_per_expert.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_all_tokens_to_one_expert(capacity_factor):
    c = cfg(
        top_k=1,
        capacity_factor=capacity_factor,
        drop_policy="position",
        pre_softmax=True,
        normalize_topk=False,
    )
    layer = MoELayer(c).double()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 5.0
    x = torch.rand(12, 8, dtype=torch.float64) + 0.1  # positive: expert 2 wins for every token
    y = layer(x)
    T = 12
    expected_kept = T if capacity_factor is None else 3  # C = ceil(12 * 1 / 4 * 1.0)
    assert layer.last_stats.tokens_per_expert.tolist() == [0, 0, expected_kept, 0]
    assert layer.last_stats.max_load_violation.item() == pytest.approx(3.0)  # (12 - 3) / 3
    ref, *_ = reference_moe(x, layer.router.weight, layer.experts.w1, layer.experts.w2, c)
    torch.testing.assert_close(y, ref)
    if capacity_factor is not None:
        assert layer.last_stats.dropped_fraction.item() == pytest.approx(9 / 12)
        assert torch.all(y[3:] == 0)  # dropped tokens: the residual carries them


@pytest.mark.parametrize("ffn", [16, 6], ids=["combine-weights", "experts-weight"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_a_chunk_whose_pairs_are_all_dropped(ffn, bias):
    # Every token picks expert 0; capacity keeps the first 2 (position policy), so the second
    # of two chunks keeps no pair at all: its expert buffer has no row.
    rc = RouterConfig(top_k=1, capacity_factor=0.5, drop_policy="position")
    c = MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=ffn, ffn_bias=bias, router=rc)
    layer = MoELayer(c).double()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 5.0
    x = torch.rand(16, 8, dtype=torch.float64) + 0.1
    g = torch.randn_like(x)
    grads = []
    for overlap in (1, 2):
        x1 = x.clone().requires_grad_(True)
        y = layer(x1, overlap_degree=overlap)
        (y * g).sum().backward()
        grads.append([y, x1.grad, *(p.grad.clone() for p in layer.parameters())])
        layer.zero_grad()
        assert layer.last_stats.tokens_per_expert.tolist() == [2, 0, 0, 0]
    w1 = layer.experts.w1
    ref = [layer.router.weight, w1[:, :8], layer.experts.w2]
    b = {"b1": w1[:, 8], "b2": layer.ffn_out_bias} if bias else {}
    ref_out, *_ = reference_moe(x, *ref, c, **b)
    torch.testing.assert_close(grads[1][0], ref_out)
    assert torch.all(grads[1][0][2:] == 0)
    for one_chunk, two_chunks in zip(*grads, strict=True):
        torch.testing.assert_close(two_chunks, one_chunk)


@pytest.mark.parametrize(
    "router_kw",
    [
        {"type": "null", "num_null_experts": 4},
        {"type": "moepp", "zero_experts": 2, "copy_experts": 1, "constant_experts": 1},
    ],
)
@pytest.mark.parametrize("ffn", [16, 6], ids=["combine-weights", "experts-weight"])
@pytest.mark.parametrize("overlap", [1, 2])
def test_a_batch_without_any_ffn_pair(router_kw, ffn, overlap):
    # AdaMoE's null experts or MoE++'s zero-computation experts take every pick: no FFN row.
    c = MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=ffn,
                  router=RouterConfig(top_k=2, **router_kw))  # fmt: skip
    layer = MoELayer(c).double()
    with torch.no_grad():
        layer.router.weight.fill_(-50.0)  # the FFN experts' logits: never picked
    x = (torch.rand(12, 8, dtype=torch.float64) + 0.1).requires_grad_(True)
    y = layer(x, overlap_degree=overlap)
    y.sum().backward()
    assert layer.last_stats.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert not layer.experts.w1.grad.any() and not layer.experts.w2.grad.any()
    if router_kw["type"] == "null":
        assert not y.any()  # a token whose picks are all null gets 0


def test_autocast_bf16_runs_and_keeps_router_in_fp32():
    torch.manual_seed(0)
    layer = MoELayer(cfg(top_k=2))
    x = torch.randn(4, 16, 8, requires_grad=True)
    ref = layer(x)
    seen = {}
    layer.router.register_forward_hook(lambda m, i, o: seen.update(logits=o.logits_TE.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert seen["logits"] == torch.float32
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y.float().sum().backward()
    assert layer.experts.w1.grad is not None and layer.router.weight.grad is not None
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.02)


def test_deterministic_given_seed():
    def run():
        torch.manual_seed(123)
        layer = MoELayer(cfg(top_k=2, capacity_factor=1.0, input_jitter_eps=0.01))
        x = torch.randn(64, 8, requires_grad=True)
        layer(x).square().sum().backward()
        return [x.grad] + [p.grad for p in layer.parameters()]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_input_jitter_only_in_training():
    torch.manual_seed(0)
    layer = MoELayer(cfg(top_k=2, input_jitter_eps=0.5))
    x = torch.randn(32, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_router_dtype_fp64_and_fp64_inputs_route_in_fp64():
    seen = []
    layer = MoELayer(cfg(router_dtype="fp64"))
    layer.router.register_forward_hook(lambda m, i, o: seen.append(o.logits_TE.dtype))
    layer(torch.randn(5, 8))
    layer32 = MoELayer(cfg()).double()
    layer32.router.register_forward_hook(lambda m, i, o: seen.append(o.logits_TE.dtype))
    layer32(torch.randn(5, 8, dtype=torch.float64))
    assert seen == [torch.float64, torch.float64]


@pytest.mark.parametrize("router_kw", [{}, {"type": "null", "num_null_experts": 2}])
def test_capacity_that_drops_nothing_is_dropless(router_kw, monkeypatch):
    # Where every expert's routed pairs fit, the capacity mask keeps them all: the layer skips it
    # (on the CPU, where the counts are free to read) and must equal the dropless layer bitwise.
    import moeflow.moe.layer as layer_module

    calls = []
    real_mask = layer_module.capacity_keep_mask
    monkeypatch.setattr(
        layer_module, "capacity_keep_mask", lambda *a: calls.append(1) or real_mask(*a)
    )
    torch.manual_seed(0)
    dropless = MoELayer(cfg(top_k=2, **router_kw)).double()
    results = []
    for factor in (None, 4.0, 0.5):
        layer = MoELayer(cfg(top_k=2, capacity_factor=factor, **router_kw)).double()
        layer.load_state_dict(dropless.state_dict())
        x = torch.randn(24, 8, dtype=torch.float64, requires_grad=True)
        with torch.no_grad():
            x.copy_(torch.linspace(-2, 2, 24 * 8, dtype=torch.float64).view(24, 8).sin())
        y = layer(x)
        y.square().sum().backward()
        results.append([y, x.grad, *(p.grad for p in layer.parameters())])
        ran = len(calls)
        if factor == 4.0:  # C = 4 * 24 * 2 / 4 = 48 >= every expert's load
            assert ran == 0 and layer.last_stats.dropped_fraction.item() == 0
            for a, b in zip(results[0], results[1], strict=True):
                assert torch.equal(a, b)
        if factor == 0.5:  # C = 6: some expert overflows, the mask runs and drops
            assert ran == 1 and layer.last_stats.dropped_fraction.item() > 0
            ref, *_ = reference_moe(
                x.detach(), layer.router.weight, layer.experts.w1, layer.experts.w2, layer.config
            )
            torch.testing.assert_close(y, ref)


def test_nothing_dropped_reads_only_cpu_counts():
    from moeflow.comm.capacity import nothing_dropped

    assert nothing_dropped(torch.tensor([2, 3]), 3) and not nothing_dropped(torch.tensor([4]), 3)
    assert nothing_dropped(torch.tensor([], dtype=torch.int64), 0)
    # Elsewhere reading them would be a host sync: the mask always runs there.
    assert not nothing_dropped(torch.tensor([0, 0], device="meta"), 3)
