"""The layer against the slow per-token float64 reference: forward, losses and every gradient."""

from __future__ import annotations

import pytest
import torch

from moeflow import MoEConfig, MoELayer, RouterConfig
from tests.reference import reference_moe

CAPACITY_CASES = [(None, "probs")] + [
    (cf, policy) for cf in (0.5, 1.0, 1.25) for policy in ("probs", "position")
]


def make_layer(seed: int = 0, ffn: int = 12, **router_kw) -> tuple[MoELayer, MoEConfig]:
    activation = router_kw.pop("activation", "swiglu")
    cfg = MoEConfig(
        hidden_size=8,
        num_experts=8,
        ffn_hidden_size=ffn,
        activation=activation,
        router=RouterConfig(**router_kw),
    )
    torch.manual_seed(seed)
    layer = MoELayer(cfg).double()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)  # spread-out logits: varied routing, no near-ties
    return layer, cfg


def check_against_reference(layer: MoELayer, cfg: MoEConfig, x: torch.Tensor, seq_len=None):
    layer.train()
    rc = cfg.router
    x1 = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    out = layer(x1)
    (out * g).sum().backward()

    params = [layer.router.weight, layer.experts.w1, layer.experts.w2]
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    x2 = x.clone().requires_grad_(True)
    ref_out, aux, z, counts = reference_moe(
        x2.reshape(-1, cfg.hidden_size), *ref_params, cfg, seq_len=seq_len
    )
    loss = (ref_out.view_as(x) * g).sum() + rc.aux_loss_coeff * aux + rc.z_loss_coeff * z
    loss.backward()

    torch.testing.assert_close(out, ref_out.view_as(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)
    for p, rp in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.grad, rp.grad, rtol=1e-9, atol=1e-12)
    stats = layer.last_stats
    assert stats.tokens_per_expert.tolist() == counts
    if rc.aux_loss_type != "none":
        torch.testing.assert_close(stats.aux_loss, aux.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize(("capacity_factor", "drop_policy"), CAPACITY_CASES)
@pytest.mark.parametrize("ffn", [12, 6], ids=["combine-weights", "experts-weight"])
def test_topk_capacity_matrix(top_k, capacity_factor, drop_policy, ffn):
    # F > D: the combine applies the router weights; F <= D: the experts do (MoEConfig).
    layer, cfg = make_layer(
        ffn=ffn,
        top_k=top_k,
        capacity_factor=capacity_factor,
        drop_policy=drop_policy,
        z_loss_coeff=1e-3,
    )
    assert layer.expert_dispatch.carry_weights == (ffn <= 8)
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    check_against_reference(layer, cfg, x)
    if capacity_factor is not None and capacity_factor < 1:
        assert layer.last_stats.dropped_fraction.item() > 0


@pytest.mark.parametrize(
    "router_kw",
    [
        {"score_function": "softmax", "pre_softmax": True, "normalize_topk": True},
        {"score_function": "softmax", "pre_softmax": True, "normalize_topk": False},
        {"score_function": "sigmoid", "normalize_topk": True},
        {"score_function": "sigmoid", "normalize_topk": False, "capacity_factor": 1.0},
        {"activation": "gelu", "aux_loss_type": "seq_aux_loss"},
        {"activation": "relu", "capacity_factor": 1.0, "pad_to_capacity": True},
        {"capacity_factor": 0.5, "min_capacity": 9, "drop_policy": "position"},
        {"aux_loss_type": "none", "z_loss_coeff": 1e-2},
    ],
)
def test_router_modes(router_kw):
    layer, cfg = make_layer(top_k=2, **router_kw)
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    check_against_reference(layer, cfg, x, seq_len=6)


@pytest.mark.parametrize("ffn", [12, 6], ids=["combine-weights", "experts-weight"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_pad_to_capacity_changes_nothing_but_shape(ffn, bias):
    # Padding rows are zero inputs; with biases their outputs are not zero, so a gradient reaching
    # them (the combine once handed them another row's) would change the expert weights' gradient.
    x = torch.randn(40, 8, dtype=torch.float64)
    g = torch.randn_like(x)
    results = []
    for pad in (False, True):
        cfg = MoEConfig(hidden_size=8, num_experts=8, ffn_hidden_size=ffn, activation="gelu",
                        ffn_bias=bias, router=RouterConfig(top_k=2, capacity_factor=1.0,
                                                           pad_to_capacity=pad))  # fmt: skip
        torch.manual_seed(0)
        layer = MoELayer(cfg).double()
        with torch.no_grad():
            layer.router.weight.normal_(0.0, 1.0)
        out = layer(x)
        (out * g).sum().backward()
        results.append([out, *(p.grad for p in layer.parameters())])
    assert results[1][0].shape == x.shape
    for plain, padded in zip(*results, strict=True):
        torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-13)


def test_eval_mode_attaches_no_loss_gradient():
    layer, _ = make_layer(top_k=2, aux_loss_coeff=1.0)
    x = torch.randn(16, 8, dtype=torch.float64)
    layer.eval()
    layer(x).sum().backward()
    grad_eval = layer.router.weight.grad.clone()
    layer.zero_grad()
    layer.train()
    layer(x).sum().backward()
    assert not torch.allclose(grad_eval, layer.router.weight.grad)


def test_aux_loss_scale_scales_only_the_balancing_gradient():
    x = torch.randn(16, 8, dtype=torch.float64)
    grads = {}
    for scale in (0.0, 1.0, 3.0):
        layer, _ = make_layer(top_k=2, aux_loss_coeff=0.5)
        layer.aux_loss_scale = scale
        layer(x).sum().backward()
        grads[scale] = layer.router.weight.grad.clone()
    torch.testing.assert_close(grads[3.0] - grads[0.0], 3 * (grads[1.0] - grads[0.0]))


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_expert_biases_match_the_reference(activation, capacity_factor):
    # b1 is w1's last row, b2 the layer's ffn_out_bias; a dropped pair gets neither.
    cfg = MoEConfig(
        hidden_size=8, num_experts=4, ffn_hidden_size=12, activation=activation, ffn_bias=True,
        router=RouterConfig(top_k=2, capacity_factor=capacity_factor),
    )  # fmt: skip
    torch.manual_seed(0)
    layer = MoELayer(cfg).double()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)
        layer.ffn_out_bias.normal_(0.0, 1.0)
    x = torch.randn(13, 8, dtype=torch.float64)
    g = torch.randn_like(x)
    x1 = x.clone().requires_grad_(True)
    (layer(x1) * g).sum().backward()
    out = layer(x)
    w1 = layer.experts.w1.detach()
    ref = [layer.router.weight, w1[:, :8], layer.experts.w2, w1[:, 8], layer.ffn_out_bias]
    ref = [p.detach().clone().requires_grad_(True) for p in ref]
    x2 = x.clone().requires_grad_(True)
    ref_out, aux, _, counts = reference_moe(x2, *ref[:3], cfg, b1=ref[3], b2=ref[4])
    ((ref_out * g).sum() + cfg.router.aux_loss_coeff * aux).backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)
    got = [layer.router.weight.grad, layer.experts.w1.grad[:, :8], layer.experts.w2.grad,
           layer.experts.w1.grad[:, 8], layer.ffn_out_bias.grad]  # fmt: skip
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b.grad, rtol=1e-9, atol=1e-12)
    assert layer.last_stats.tokens_per_expert.tolist() == counts


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("bias", [False, True])
def test_low_dim_all_to_all_matches_the_reference(capacity_factor, bias):
    # a2a_dim r = D/2: experts on x A_down, the combined output times A_up; router on x.
    cfg = MoEConfig(
        hidden_size=8, num_experts=4, ffn_hidden_size=12, activation="gelu", a2a_dim=4,
        ffn_bias=bias, router=RouterConfig(top_k=2, capacity_factor=capacity_factor),
    )  # fmt: skip
    torch.manual_seed(1)
    layer = MoELayer(cfg).double()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)
        if bias:
            layer.ffn_out_bias.normal_(0.0, 1.0)
    assert layer.experts.w1.shape == (4, 4 + bias, 12) and layer.experts.w2.shape == (4, 12, 4)
    x = torch.randn(11, 8, dtype=torch.float64)
    g = torch.randn_like(x)
    x1 = x.clone().requires_grad_(True)
    out = layer(x1)
    (out * g).sum().backward()
    w1 = layer.experts.w1.detach()
    mine = [layer.router.weight, layer.experts.w2, layer.a2a.down, layer.a2a.up]
    ref = [p.detach().clone().requires_grad_(True) for p in [*mine, w1[:, :4]]]
    b = (
        [p.detach().clone().requires_grad_(True) for p in (w1[:, 4], layer.ffn_out_bias)]
        if bias
        else [None, None]
    )
    x2 = x.clone().requires_grad_(True)
    ref_out, aux, _, _ = reference_moe(
        x2, ref[0], ref[4], ref[1], cfg, b1=b[0], b2=b[1], a2a=(ref[2], ref[3])
    )
    ((ref_out * g).sum() + cfg.router.aux_loss_coeff * aux).backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)
    for p, r in zip(mine, ref[:4], strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.experts.w1.grad[:, :4], ref[4].grad, rtol=1e-9, atol=1e-12)
    if bias:
        torch.testing.assert_close(layer.experts.w1.grad[:, 4], b[0].grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.ffn_out_bias.grad, b[1].grad, rtol=1e-9, atol=1e-12)
