"""Megatron-Core integration: `MoEConfig` <-> `TransformerConfig` round trips exactly on every
mapped field; every unsupported field or value raises naming it; the mapped router routes as
Megatron's own `topk_routing_with_score_function`; `MegatronMoE` has Megatron's MLP interface,
keeps the pairs Megatron keeps under a capacity (`apply_router_token_dropping`, both drop
policies, padded or not, every scoring) and leaves Megatron's padding out of its losses."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from moeflow.integrations.megatron import (
    MAPPED,
    MegatronMoE,
    moe_config,
    transformer_config_kwargs,
)
from moeflow.moe.config import MoEConfig, RouterConfig
from moeflow.moe.routers.topk import topk_routing

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.transformer.moe import moe_utils as mu
    from megatron.core.transformer.transformer_config import TransformerConfig

BASE = {"num_layers": 2, "num_attention_heads": 4, "hidden_size": 32, "add_bias_linear": False,
        "num_moe_experts": 8, "moe_ffn_hidden_size": 48}  # fmt: skip
SWIGLU = {"gated_linear_unit": True, "activation_func": F.silu}

CONFIGS = [
    {**SWIGLU, "moe_router_topk": 2, "moe_aux_loss_coeff": 1e-2, "moe_z_loss_coeff": 1e-3},
    {**SWIGLU, "moe_router_topk": 1, "moe_router_pre_softmax": True,
     "moe_expert_capacity_factor": 1.25, "moe_token_drop_policy": "position",
     "moe_pad_expert_input_to_capacity": True},
    {"activation_func": F.gelu, "moe_router_topk": 2, "moe_router_score_function": "sigmoid",
     "moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": 5e-3,
     "moe_router_load_balancing_type": "seq_aux_loss", "moe_router_dtype": "fp64"},
    {"activation_func": F.relu, "moe_router_topk": 1, "moe_router_score_function": "sigmoid",
     "moe_router_load_balancing_type": "global_aux_loss", "moe_input_jitter_eps": 0.01},
    {**SWIGLU, "moe_router_topk": 4, "moe_router_load_balancing_type": "none",
     "moe_shared_expert_intermediate_size": 64, "moe_shared_expert_gate": True},
]  # fmt: skip


def tc_of(**fields) -> TransformerConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerConfig(**{**BASE, **fields})


@pytest.mark.parametrize("fields", CONFIGS, ids=range(len(CONFIGS)))
def test_round_trips_are_exact(fields):
    tc = tc_of(**fields)
    cfg = moe_config(tc)
    kwargs = transformer_config_kwargs(cfg)
    assert set(MAPPED) - {"moe_router_bias_update_rate"} <= set(kwargs)
    for name, value in kwargs.items():  # MoEConfig -> Megatron: the field as it was given
        assert getattr(tc, name) == value or (name == "moe_router_dtype" and tc.moe_router_dtype
                                               is None), name  # fmt: skip
    again = tc_of(**{k: v for k, v in kwargs.items() if k != "hidden_size"})
    assert moe_config(again) == cfg  # ... and back to the same MoEConfig
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("fields", CONFIGS[:4], ids=range(4))
def test_mapped_router_routes_as_megatron(fields):
    tc = tc_of(**fields)
    cfg = moe_config(tc)
    torch.manual_seed(0)
    logits = torch.randn(64, tc.num_moe_experts) * 2
    w, ids, _ = topk_routing(logits, without_bias(cfg.router))
    probs = torch.zeros_like(logits).scatter_(1, ids, w)
    ref_probs, ref_map = mu.topk_routing_with_score_function(
        logits, tc.moe_router_topk, use_pre_softmax=tc.moe_router_pre_softmax,
        score_function=tc.moe_router_score_function,
    )  # fmt: skip
    assert torch.equal(probs > 0, ref_map)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)


def without_bias(router: RouterConfig) -> RouterConfig:
    """The routing weights only: no expert bias (Megatron's function is given none here)."""
    return dataclasses.replace(router, bias_update_rate=0.0)


UNSUPPORTED = [
    ({"moe_router_num_groups": 2, "moe_router_group_topk": 1}, r"moe_router_group_topk|num_groups"),
    ({"moe_router_topk_scaling_factor": 2.5}, r"moe_router_topk_scaling_factor = 2\.5"),
    ({"moe_router_load_balancing_type": "sinkhorn"}, r"load_balancing_type = 'sinkhorn'"),
    ({"moe_aux_loss_coeff": [0.01, 0.001],
      "moe_router_load_balancing_type": ["aux_loss", "seq_aux_loss"]},
     r"moe_router_load_balancing_type = \['aux_loss'"),
    ({"add_bias_linear": True}, r"add_bias_linear = True .* set add_bias_linear=False"),
    ({"gated_linear_unit": True, "activation_func": F.gelu}, r"activation_func = gelu"),
    ({"moe_apply_probs_on_input": True, "moe_router_topk": 1, "moe_router_pre_softmax": True},
     r"moe_apply_probs_on_input = True"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "match"), UNSUPPORTED, ids=range(len(UNSUPPORTED)))
def test_unsupported_megatron_settings_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        moe_config(tc_of(**{**SWIGLU, **fields}))


def test_unexpressible_moeflow_settings_name_the_field():
    cfg = MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=8)
    cases = [
        (RouterConfig(type="null", num_null_experts=2), r"router\.type = 'null'"),
        (RouterConfig(min_capacity=4, capacity_factor=1.0), r"router\.min_capacity = 4"),
        (RouterConfig(pre_softmax=True), r"normalize_topk = True with pre_softmax"),
        (RouterConfig(score_function="sigmoid", top_k=1), r"normalize_topk = True with sigmoid"),
        (RouterConfig(softmax_dtype="fp32"), r"router\.softmax_dtype = 'fp32'"),
    ]
    for router, match in cases:
        with pytest.raises(ValueError, match=match):
            transformer_config_kwargs(MoEConfig.from_dict({**cfg.to_dict(), "router": router}))
    for fields, match in (
        ({"activation": "gelu_tanh"}, r"moe\.activation \('gelu_tanh'\) has no Megatron"),
        ({"activation": "gelu", "ffn_bias": True}, r"moe\.ffn_bias = True has no Megatron"),
    ):
        with pytest.raises(ValueError, match=match):
            transformer_config_kwargs(MoEConfig.from_dict({**cfg.to_dict(), **fields}))


def test_megatron_mlp_interface():
    tc = tc_of(**CONFIGS[0])
    block = MegatronMoE(tc, submodules=None, layer_number=3)
    block.set_layer_number(4)
    x = torch.randn(5, 3, 32)  # [sequence, batch, hidden]
    out, bias = block(x, padding_mask=None)
    assert bias is None and out.shape == x.shape
    torch.testing.assert_close(out, block.moe(x))
    with pytest.raises(ValueError, match=r"padding_mask has shape \(5, 3\).*\[3, 5\]"):
        block(x, padding_mask=torch.zeros(5, 3, dtype=torch.bool))


def test_seq_aux_loss_groups_megatrons_sequences():
    """Mirrors Megatron's tests/unit_tests/transformer/moe/test_aux_loss.py (the sequence-level
    loss, `Router._apply_seq_aux_loss`): hidden states are `[s, b, h]`, and the loss is the
    per-sequence balancing loss of each of the b sequences, averaged: Megatron's own reshape
    (`[s, b * E]`, `topk * bsz`) on the same scores, in float64 (the same math)."""
    from megatron.core.transformer.moe import moe_utils as mu

    S, B, K = 6, 3, 2
    tc = tc_of(**SWIGLU, moe_router_topk=K, moe_router_load_balancing_type="seq_aux_loss",
               moe_aux_loss_coeff=1e-2)  # fmt: skip
    block = MegatronMoE(tc).double()
    x = torch.randn(S, B, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    block(x)
    ours = block.moe.last_losses[0]
    logits = block.moe.router(x.reshape(-1, 32), None).logits_TE  # tokens in [s, b] order
    # Megatron's scores for the loss (`compute_routing_scores_for_aux_loss`, whose softmax runs
    # in fp32 whatever the input): here in float64.
    scores = torch.softmax(logits, dim=-1)
    routing_map = torch.zeros_like(scores).scatter(1, scores.topk(K, dim=1).indices, 1.0).bool()
    E = tc.num_moe_experts
    ref = (
        mu.switch_load_balancing_loss_func(
            scores.reshape(S, -1), routing_map.reshape(S, -1).sum(0), S, K, E, 1.0
        )
        / B
    )
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-12, atol=1e-14)
    # Read batch first (what the layer assumes without `sequence_first`), it is another value.
    block.moe.sequence_first = False
    block(x)
    assert not torch.allclose(block.moe.last_losses[0], ref, rtol=1e-6)


SCORING = {
    "softmax": {},
    "pre_softmax": {"moe_router_pre_softmax": True},
    "sigmoid": {"moe_router_score_function": "sigmoid"},
}


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("scoring", list(SCORING))
def test_megatron_moe_keeps_the_pairs_megatron_keeps(policy, top_k, capacity_factor, scoring):
    """Megatron's `apply_router_token_dropping` on Megatron's own routing of the same logits:
    the kept pairs are the same (its `torch.topk` over the routing map or the probabilities
    picks among tied tokens in that op's order, which the layer follows), padded to capacity or
    not, and the layer's output is the experts' outputs weighted by Megatron's final probs
    (float64: the same math, computed from the kept pairs' weights)."""
    if top_k == 1 and scoring == "softmax":
        scoring = "pre_softmax"  # Megatron refuses a post-softmax top-1 (a zero gradient)
    for pad in (False, True):
        tc = tc_of(**SWIGLU, **SCORING[scoring], moe_router_topk=top_k,
                   moe_expert_capacity_factor=capacity_factor, moe_token_drop_policy=policy,
                   moe_pad_expert_input_to_capacity=pad)  # fmt: skip
        torch.manual_seed(top_k)
        block = MegatronMoE(tc).double()
        with torch.no_grad():
            block.moe.router.weight.normal_(0.0, 1.0)
        x = torch.randn(12, 4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        x_TD = x.reshape(-1, 32)
        route = block.moe.router(x_TD)
        ours = torch.zeros(48, 8, dtype=torch.float64).scatter_(
            1, route.expert_ids_TK, route.weights_TK * route.keep_TK
        )
        probs, routing_map = mu.topk_routing_with_score_function(
            route.logits_TE, top_k, use_pre_softmax=tc.moe_router_pre_softmax,
            score_function=tc.moe_router_score_function,
        )  # fmt: skip
        final_probs, final_map = mu.apply_router_token_dropping(
            probs, routing_map, top_k, capacity_factor, policy, pad_to_capacity=pad
        )
        assert torch.equal(ours > 0, (final_map & routing_map) & (final_probs > 0)), pad
        # Megatron's softmax runs in float32 whatever the logits' dtype: its weights are fp32's
        torch.testing.assert_close(ours, final_probs, rtol=1e-6, atol=1e-7)
        if capacity_factor < 1.5:
            assert (final_map & routing_map).sum() < routing_map.sum()  # something dropped
        w1, w2 = block.moe.experts.w1, block.moe.experts.w2
        f = w2.shape[1]
        want = torch.zeros_like(x_TD)
        for e in range(8):
            h = x_TD @ w1[e]
            want += ours[:, e : e + 1] * ((F.silu(h[:, :f]) * h[:, f:]) @ w2[e])
        with torch.no_grad():
            got, _ = block(x)
        torch.testing.assert_close(got.reshape(-1, 32), want, rtol=1e-10, atol=1e-12)


def test_padding_mask_leaves_megatrons_padding_out_of_the_losses():
    """`padding_mask` [b, s], True at padding, as Megatron's router reads it: the balancing loss
    and z-loss equal Megatron's `switch_load_balancing_loss_func` (over the valid tokens, their
    count as the token count) and `z_loss_func` with that mask, and the aux-loss-free counts
    leave padding out (float64)."""
    S, B, K = 7, 3, 2
    tc = tc_of(**SWIGLU, moe_router_topk=K, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3,
               moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")  # fmt: skip
    block = MegatronMoE(tc).double().train()
    x = torch.randn(S, B, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, :3] = padding[2, :1] = True
    block(x, padding_mask=padding)
    aux, z = block.moe.last_losses
    logits = block.moe.router(x.reshape(-1, 32)).logits_TE  # tokens in [s, b] order
    pad_T = padding.transpose(0, 1).reshape(-1)
    rmap, scores = mu.compute_routing_scores_for_aux_loss(logits, K, "sigmoid", padding_mask=pad_T)
    valid = int((~pad_T).sum())
    want_aux = mu.switch_load_balancing_loss_func(scores, rmap.sum(0), valid, K, 8, 1.0)
    torch.testing.assert_close(aux, want_aux.to(aux.dtype), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z, mu.z_loss_func(logits, 1.0, padding_mask=pad_T), rtol=1e-12,
                               atol=1e-14)  # fmt: skip
    assert block.moe.balance.step_counts.sum().item() == valid * K


def test_expert_bias_update_is_megatrons(monkeypatch):
    """The aux-loss-free bias after a step: Megatron's `get_updated_expert_bias` on the step's
    counts (its all-reduce over data-parallel ranks is one process here)."""
    tc = tc_of(**SWIGLU, moe_router_topk=2, moe_router_enable_expert_bias=True,
               moe_router_bias_update_rate=1e-2, moe_router_score_function="sigmoid")  # fmt: skip
    block = MegatronMoE(tc).train()
    with torch.no_grad():
        block.moe.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, 8))
    before = block.moe.router.expert_bias.clone()
    block(torch.randn(9, 2, 32, generator=torch.Generator().manual_seed(7)))
    counts = block.moe.balance.step_counts.clone()
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: None)
    monkeypatch.setattr(mu.parallel_state, "get_tensor_and_data_parallel_group", lambda **k: None)
    want = mu.get_updated_expert_bias(counts.float(), before.float(), 1e-2)
    block.moe.finish_optimizer_step()
    torch.testing.assert_close(block.moe.router.expert_bias, want, rtol=0, atol=1e-9)
    assert not torch.equal(block.moe.router.expert_bias, before)


@pytest.mark.parametrize("router_dtype", ["fp32", "fp64"])
def test_router_forward_dtype_and_aux_loss_gradient(router_dtype):
    """Mirrors Megatron's tests/unit_tests/transformer/moe/test_routers.py (`test_router_forward`,
    `test_router_dtype`, `test_aux_loss`): on bf16 hidden states the router's logits are in
    `moe_router_dtype`, every token gets k experts, and the aux loss alone (a loss that ignores
    the output's values) gives the router a gradient."""
    tc = tc_of(**SWIGLU, moe_router_topk=2, moe_aux_loss_coeff=1e-2, moe_router_dtype=router_dtype)
    block = MegatronMoE(tc).train()
    x = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(8))
    route = block.moe.router(x.to(torch.bfloat16).reshape(-1, 32))
    assert route.logits_TE.dtype == {"fp32": torch.float32, "fp64": torch.float64}[router_dtype]
    assert route.expert_ids_TK.shape == (12, 2)
    out, _ = block(x)
    (out * 0).sum().backward()
    assert block.moe.router.weight.grad.abs().sum() > 0
    assert block.moe.experts.w1.grad is None or block.moe.experts.w1.grad.abs().sum() == 0
