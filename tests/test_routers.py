"""The routers of docs/methods.md: hand-computed math, the layer against float64 per-token
references, AdaMoE conversion, MoE++'s expected FFN experts per token, and expert parallelism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.moe.losses import balance_loss
from moeflow.moe.routers import Router, RouterOutput, build_router, register_router
from moeflow.moe.routers.moepp import ZeroComputationExperts
from moeflow.moe.routers.null import convert_topk_to_null, null_routing
from moeflow.moe.routers.recurrent import STATE_KEY
from moeflow.moe.routers.topk import topk_routing
from moeflow.moe.routing_context import RoutingContext
from moeflow.moe.walk import finish_optimizer_step, moe_layers
from tests.reference_routers import (
    gru_step,
    moepp_logits,
    null_logits,
    reference_routed_layer,
    rmoe_logits,
)

D = 8


# -- hand-computed values -----------------------------------------------------------------------
@pytest.mark.parametrize("router", ["topk", "null", "moepp"])
@pytest.mark.parametrize("aux_loss_type", ["aux_loss", "global_aux_loss", "seq_aux_loss"])
def test_a_token_mask_leaves_padding_out_of_every_balancing_term(router, aux_loss_type):
    """Padding under a token mask (RoutingContext.token_mask) changes no balancing loss, z-loss
    or balancing count: a [B, S] batch with masked padding gives what its real tokens give."""
    extra = {"null": {"num_null_experts": 2}, "moepp": {"zero_experts": 1, "copy_experts": 1}}
    cfg = MoEConfig(hidden_size=D, num_experts=4, ffn_hidden_size=8, router=RouterConfig(
        type=router, top_k=2, aux_loss_type=aux_loss_type, z_loss_coeff=0.1,
        **extra.get(router, {})))  # fmt: skip
    layer = MoELayer(cfg).double().train()
    x = torch.randn(3, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    padded = x.masked_fill(mask[..., None] == 0, 3.0)  # padding routes somewhere
    layer(padded, routing_context=RoutingContext(token_mask=mask))
    masked = (layer.last_losses, layer.balance.step_counts.clone())
    layer.balance.reset(torch.device("cpu"))
    real = []
    for row, keep in zip(x, mask.bool(), strict=True):  # each sequence's real tokens alone
        real.append(row[keep])
    if aux_loss_type == "seq_aux_loss":  # per sequence: one layer call per sequence, averaged
        per_seq = []
        for r in real:
            layer(r[None])
            per_seq.append(layer.last_losses[0])
        want_aux = torch.stack(per_seq).mean()
        torch.testing.assert_close(masked[0][0], want_aux, rtol=1e-12, atol=1e-14)
    else:
        layer(torch.cat(real))
        torch.testing.assert_close(masked[0][0], layer.last_losses[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(masked[0][1], layer.last_losses[1], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(masked[1], layer.balance.step_counts, rtol=0, atol=0)
    assert masked[1].sum().item() == 2 * int(mask.sum())
    with pytest.raises(ValueError, match=r"token_mask has 14 entries .* 15 tokens"):
        layer(x, routing_context=RoutingContext(token_mask=mask.reshape(-1)[:14]))


def test_null_routing_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, 1.5]], dtype=torch.float64)  # n=2 true, m=2 null
    w, ids, p = null_routing(logits, n=2, k=3)
    assert ids.tolist() == [[0, 3, 1]]  # 2 > 1.5 (null 1) > 1
    e2, e1 = math.exp(2), math.exp(1)
    assert w[0].tolist() == pytest.approx([e2 / (e2 + e1), 0.0, e1 / (e2 + e1)])
    assert p.sum().item() == pytest.approx(1.0)
    # All picks null: the token gets no FFN expert and weight 0 (the residual carries it).
    w, ids, _ = null_routing(torch.tensor([[0.0, 0.0, 5.0, 4.0]]), n=2, k=2)
    assert sorted(ids[0].tolist()) == [2, 3] and w.abs().sum() == 0
    # Tie rule: a true expert ranks before its null copy, and both before the next true expert.
    _, ids, _ = null_routing(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), n=2, k=2)
    assert ids.tolist() == [[0, 2]]


def test_balancing_losses_by_hand():
    scores = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert balance_loss(scores, torch.tensor([2, 0])).item() == pytest.approx(1.5)
    weighted = balance_loss(scores, torch.tensor([1, 1]), torch.tensor([1.0, 0.5]))
    assert weighted.item() == pytest.approx(2 * (0.5 * 0.75 + 0.5 * 0.5 * 0.25))
    cfg = MoEConfig(hidden_size=4, num_experts=2, ffn_hidden_size=4,
                    router=RouterConfig(type="null", num_null_experts=2))  # fmt: skip
    router = build_router(cfg)
    assert router.balance_counts(torch.tensor([3, 1, 4, 0])).tolist() == [3, 1, 2, 2]


def test_zero_computation_experts_by_hand():
    zc = ZeroComputationExperts(("zero", "copy", "constant"), hidden_size=2).double()
    with torch.no_grad():
        zc.const_gate.zero_()  # a = [0.5, 0.5]
        zc.const_value.copy_(torch.tensor([[4.0, 0.0]]))
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    # Ids relative to these experts: 0 zero, 1 copy, 2 constant; an FFN expert's (< 0) adds 0.
    out = zc(x, torch.tensor([[0, 1, 2, -3]]), torch.tensor([[0.3, 0.2, 0.4, 0.1]]))
    assert out[0].tolist() == pytest.approx([0.2 * 1 + 0.4 * 2.5, 0.2 * 2 + 0.4 * 1.0])


def test_selection_bias_moves_choices_not_weights():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    cfg = RouterConfig(top_k=1, pre_softmax=True, normalize_topk=False)
    w, ids, _ = topk_routing(logits, cfg, bias_E=torch.tensor([0.0, 0.0, 2.0]))
    assert ids.tolist() == [[2]]
    assert w.item() == pytest.approx(torch.softmax(logits, -1)[0, 2].item())


def test_drops_by_the_renormalised_weight_and_by_deepspeeds_raw_gate_keep_different_pairs():
    """`drop_policy="probs"` under `pre_softmax=True`: ranking an expert's pairs by the weight
    (renormalised over the token's top-k) keeps other pairs than ranking by the raw softmax gate
    (DeepSpeed's `topkgating`), on every seed; without renormalisation the two are the same."""
    from moeflow.comm.capacity import capacity_keep_mask, expert_capacity

    capacity = expert_capacity(64, 8, 3, capacity_factor=0.5)
    assert capacity == 12  # of 24 pairs per expert on average: about half are dropped
    differ = {}
    for normalize in (True, False):
        cfg = RouterConfig(top_k=3, pre_softmax=True, normalize_topk=normalize)
        differ[normalize] = []
        for seed in range(5):
            logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(seed))
            weights, ids, gates = topk_routing(logits, cfg)
            by_weight = capacity_keep_mask(ids, weights, 8, capacity, "probs")
            by_gate = capacity_keep_mask(ids, gates.gather(1, ids), 8, capacity, "probs")
            assert by_weight.sum() == by_gate.sum()  # each expert keeps as many either way
            differ[normalize].append(int((by_weight != by_gate).sum()))
    assert min(differ[True]) >= 16, differ  # 16 to 24 of the 192 pairs, as RouterConfig says
    assert differ[False] == [0] * 5


def test_aux_free_bias_update_after_the_step():
    cfg = MoEConfig(hidden_size=D, num_experts=4, ffn_hidden_size=8,
                    router=RouterConfig(top_k=1, bias_update_rate=0.5))  # fmt: skip
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0  # every token with x[0] > 0 goes to expert 2
    x = torch.zeros(8, D)
    x[:, 0] = 1.0
    layer(x)
    layer(x)  # two micro-batches: 16 pairs to expert 2, mean load 4
    assert layer.balance.step_counts.tolist() == [0, 0, 16, 0]
    finish_optimizer_step(layer)
    assert layer.router.expert_bias.tolist() == [0.5, 0.5, -0.5, 0.5]
    assert layer.balance.step_counts.sum() == 0
    with torch.no_grad():
        layer(x)  # no grad: nothing counted
    assert layer.balance.step_counts.sum() == 0


def test_user_router_registers_and_bad_names_fail():
    class Fixed(Router):
        def __init__(self, config):
            super().__init__(config)
            self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)

        def forward(self, x_TD, context=None):
            logits = self.gate(x_TD)
            ids = torch.zeros(x_TD.shape[0], 1, dtype=torch.long)
            return RouterOutput(torch.ones(x_TD.shape[0], 1), ids, logits.softmax(-1), logits)

    register_router("fixed-test", lambda config, shared: Fixed(config))
    cfg = MoEConfig(hidden_size=D, num_experts=2, ffn_hidden_size=8,
                    router=RouterConfig(type="fixed-test", top_k=1))  # fmt: skip
    layer = MoELayer(cfg)
    layer(torch.randn(5, D))
    assert layer.last_stats.tokens_per_expert.tolist() == [5, 0]
    with pytest.raises(ValueError, match="already registered"):
        register_router("topk", lambda config, shared: Fixed(config))
    with pytest.raises(ValueError, match=r"moe.router.type \('nope'\) is not a registered router"):
        MoELayer(MoEConfig(hidden_size=D, num_experts=2, ffn_hidden_size=8,
                           router=RouterConfig(type="nope")))  # fmt: skip
    with pytest.raises(ValueError, match=r"only applies to router\.type = 'moepp'"):
        RouterConfig(zc_tau=0.5)


# -- the layer against float64 per-token references ----------------------------------------------
def _layer(router: RouterConfig, n: int = 4) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=D, num_experts=n, ffn_hidden_size=6, router=router)
    layer = MoELayer(cfg).double()
    with torch.no_grad():
        for name, p in layer.router.named_parameters():
            if name in ("weight", "null_weight", "head", "residual"):
                p.normal_(0.0, 1.0)
        if layer.zc_experts is not None:
            layer.zc_experts.const_gate.normal_()
    return layer


def _compare(layer: MoELayer, x, logits_fn, context=None, counts_override=None):
    """Forward + backward of the layer against the reference; every parameter's gradient."""
    rc = layer.config.router
    params = dict(layer.named_parameters())
    x1 = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    out = layer(x1, routing_context=context)
    (out * g).sum().backward()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    x2 = x.clone().requires_grad_(True)
    logits = logits_fn(x2, leaves)
    p = {"w1": leaves["experts.w1"], "w2": leaves["experts.w2"]}
    if "zc_experts.const_gate" in leaves:
        p["const_gate"] = leaves["zc_experts.const_gate"]
        p["const_value"] = leaves["zc_experts.const_value"]
    ref_out, aux, z, ids = reference_routed_layer(
        x2, logits, layer.router.expert_kinds, p, layer.config, counts_override
    )
    ((ref_out * g).sum() + rc.aux_loss_coeff * aux + rc.z_loss_coeff * z).backward()
    tol = {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(layer.last_stats.aux_loss, aux.detach(), **tol)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    for name, param in params.items():
        torch.testing.assert_close(param.grad, leaves[name].grad, **tol, msg=name)
    return ids


def test_null_experts_layer_matches_reference():
    router = RouterConfig(type="null", num_null_experts=4, top_k=3, z_loss_coeff=1e-2)
    layer = _layer(router)
    x = torch.randn(20, D, dtype=torch.float64)
    ids = _compare(layer, x, lambda x2, q: null_logits(x2, q["router.weight"],
                                                       q["router.null_weight"]))  # fmt: skip
    ffn = [sum(1 for e in row if e < 4) for row in ids]
    assert layer.last_stats.ffn_experts_per_token.item() == pytest.approx(sum(ffn) / len(ffn))
    assert layer.last_stats.ffn_experts_histogram.tolist() == [ffn.count(j) for j in range(4)]
    assert 0 < sum(ffn) < 3 * len(ffn)  # some tokens did skip experts


@pytest.mark.parametrize("with_previous", [False, True])
def test_moepp_layer_matches_reference(with_previous):
    router = RouterConfig(type="moepp", zero_experts=1, copy_experts=1, constant_experts=2,
                          zc_tau=0.75, top_k=2, z_loss_coeff=1e-2)  # fmt: skip
    layer = _layer(router)
    x = torch.randn(20, D, dtype=torch.float64)
    context = RoutingContext()
    previous = None
    if with_previous:  # the previous MoE layer's logits, with their own graph
        previous = torch.randn(20, 8, dtype=torch.float64)
        context.record(previous)
    ids = _compare(
        layer, x,
        lambda x2, q: moepp_logits(x2, q["router.weight"], q["router.residual"], previous),
        context,
    )  # fmt: skip
    kinds = layer.router.expert_kinds
    assert {kinds[e] for row in ids for e in row} >= {"ffn", "copy", "constant"}


def test_rmoe_layer_matches_reference_and_updates_the_hidden_state():
    layer = _layer(RouterConfig(type="rmoe", rnn_dim=5, top_k=2, z_loss_coeff=1e-2))
    x = torch.randn(16, D, dtype=torch.float64)
    h_prev = torch.randn(16, 5, dtype=torch.float64)
    context = RoutingContext(state={STATE_KEY: h_prev})
    gru_names = ["router.gru.weight_ih", "router.gru.weight_hh", "router.gru.bias_ih",
                 "router.gru.bias_hh"]  # fmt: skip

    def logits(x2, q):
        lg, _ = rmoe_logits(x2, q["router.proj"], q["router.head"], [q[n] for n in gru_names],
                            h_prev)  # fmt: skip
        return lg

    _compare(layer, x, logits, context)
    cell = layer.router.gru
    want = gru_step(layer.router.proj @ x[3], h_prev[3], cell.weight_ih, cell.weight_hh,
                    cell.bias_ih, cell.bias_hh)  # fmt: skip
    torch.testing.assert_close(context.state[STATE_KEY][3], want)


def test_global_aux_loss_uses_the_step_counts():
    layer = _layer(RouterConfig(top_k=2, aux_loss_type="global_aux_loss", z_loss_coeff=1e-2))
    x1, x2 = torch.randn(12, D, dtype=torch.float64), torch.randn(12, D, dtype=torch.float64)
    layer(x1).sum().backward()  # the step's first micro-batch
    first = layer.last_stats.routed_per_choice.clone()
    with torch.no_grad():  # evaluation: local counts, nothing accumulated
        layer(x2)
    second = layer.last_stats.routed_per_choice.clone()
    assert layer.balance.running_counts.tolist() == first.double().tolist()
    layer.zero_grad()
    # The second micro-batch's f comes from both micro-batches' counts; P from its own tokens.
    _compare(
        layer, x2, lambda x_, q: [q["router.weight"] @ x_[t] for t in range(12)],
        counts_override=(first + second).tolist(),
    )  # fmt: skip
    finish_optimizer_step(layer)
    assert layer.balance.running_counts.sum() == 0


# -- AdaMoE conversion and MoE++ balancing -------------------------------------------------------
def test_adamoe_conversion_is_exact_at_step_zero():
    from moeflow.models.decoder import DecoderConfig, MoEDecoder

    cfg = DecoderConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16,
                        moe=MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=32,
                                      router=RouterConfig(top_k=2)))  # fmt: skip
    torch.manual_seed(0)
    model = MoEDecoder(cfg).double()
    tokens = torch.randint(0, 256, (3, 16))
    before = model(tokens)
    for layer in [m for _, m in moe_layers(model)]:
        convert_topk_to_null(layer, num_null_experts=4, top_k=4)
        assert layer.router.null_weight.shape == (4, 32)
    after = model(tokens)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    # Doubling the null experts (r = 2) with K' = 3K also reproduces the original.
    torch.manual_seed(0)
    model2 = MoEDecoder(cfg).double()
    for layer in [m for _, m in moe_layers(model2)]:
        convert_topk_to_null(layer, num_null_experts=8, top_k=6)
    torch.testing.assert_close(model2(tokens), before, rtol=1e-12, atol=1e-12)


def test_moepp_tau_sets_the_expected_ffn_experts_per_token():
    n_ffn, n_zc, k, tau = 16, 4, 2, 0.75
    expected = k * tau * n_ffn / (tau * n_ffn + n_zc)  # 1.5
    router = RouterConfig(type="moepp", zero_experts=n_zc, zc_tau=tau, top_k=k,
                          aux_loss_coeff=1.0, gating_residual=False)  # fmt: skip
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=32, num_experts=n_ffn, ffn_hidden_size=4,
                               router=router))  # fmt: skip
    opt = torch.optim.Adam(layer.router.parameters(), lr=1e-2)
    seen = []
    for step in range(400):
        x = torch.randn(512, 32)
        out = layer(x)
        (out.sum() * 0).backward()  # only the balancing loss trains the router
        opt.step()
        opt.zero_grad()
        if step >= 300:
            seen.append(layer.last_stats.ffn_experts_per_token.item())
    measured = sum(seen) / len(seen)
    assert measured == pytest.approx(expected, rel=0.05), (measured, expected)


# -- in the decoder: shared GRU, context through checkpointed blocks ------------------------------
@pytest.mark.parametrize(
    "router",
    [
        RouterConfig(type="rmoe", rnn_dim=8, top_k=2),
        RouterConfig(type="moepp", zero_experts=1, copy_experts=1, constant_experts=1, top_k=2),
        RouterConfig(type="null", num_null_experts=2, top_k=2, aux_loss_type="global_aux_loss"),
    ],
    ids=["rmoe", "moepp", "null-global"],
)
def test_decoder_routers_survive_activation_checkpointing(router):
    from moeflow.models.decoder import DecoderConfig, MoEDecoder

    cfg = DecoderConfig(dim=16, n_layers=3, n_heads=2, max_seq_len=8,
                        moe=MoEConfig(hidden_size=16, num_experts=4, ffn_hidden_size=16,
                                      router=router))  # fmt: skip
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = MoEDecoder(cfg).double()
        model.activation_checkpointing = checkpointing
        model(tokens).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        counts = [m.balance.running_counts.sum().item() for m in [m for _, m in moe_layers(model)]]
        assert counts == [0.0] * 3 if router.aux_loss_type != "global_aux_loss" else [32.0] * 3
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12)
    if router.type == "rmoe":
        shared = [n for n in grads[0] if "gru" in n]
        assert shared == [f"router_shared.rmoe_gru.{w}" for w in
                          ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]  # fmt: skip
        # One cell for every layer, trained by all of them.
        assert grads[0]["blocks.0.ffn.router.proj"].abs().sum() > 0
