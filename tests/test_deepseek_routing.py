"""DeepSeek's routing: group-limited (node-limited) top-k, sigmoid scores with a selection-only
bias (`e_score_correction_bias`), and `routed_scaling_factor`, against transformers' own
`DeepseekV3TopkRouter` / `DeepseekV2TopkRouter` and against a per-token reference in float64."""

from __future__ import annotations

import pytest
import torch

from moeflow.moe.config import MoEConfig, RouterConfig
from moeflow.moe.layer import MoELayer
from moeflow.moe.routers.topk import topk_routing

E, K, GROUPS, KEPT, T = 16, 4, 4, 2, 1000


def by_id(weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Choices sorted by expert id (transformers' top-k is unsorted)."""
    order = ids_TK.argsort(dim=-1)
    return weights_TK.gather(1, order), ids_TK.gather(1, order)


def reference(scores_TE, bias_E, n_group, topk_group, k, group_by_two: bool):
    """The algorithm token by token: group scores on the biased key, the best groups kept, the k
    best experts among theirs; ids only (the weights are the unbiased scores)."""
    per = scores_TE.shape[1] // n_group
    out = []
    for key in (scores_TE + bias_E).tolist():
        groups = [sorted(key[g * per : (g + 1) * per], reverse=True) for g in range(n_group)]
        group_score = [sum(g[:2]) if group_by_two else g[0] for g in groups]
        kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for g in kept for e in range(g * per, (g + 1) * per)]
        out.append(sorted(sorted(allowed, key=lambda e: -key[e])[:k]))
    return torch.tensor(out)


def test_group_limited_sigmoid_routing_is_deepseek_v3s():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(hidden_size=E, num_attention_heads=4, n_routed_experts=E,
                              num_experts_per_tok=K, n_group=GROUPS, topk_group=KEPT,
                              routed_scaling_factor=2.5, norm_topk_prob=True)  # fmt: skip
    theirs = DeepseekV3TopkRouter(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theirs.weight.copy_(torch.eye(E))  # their fp32 logits are our inputs, exactly
        theirs.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
    logits = torch.randn(T, E, generator=g)
    _, their_w, their_ids = theirs(logits)
    ours = RouterConfig(score_function="sigmoid", top_k=K, n_group=GROUPS, topk_group=KEPT,
                        routed_scaling_factor=2.5, normalize_topk=True)  # fmt: skip
    w, ids, _ = topk_routing(logits, ours, theirs.e_score_correction_bias)
    (w, ids), (their_w, their_ids) = by_id(w, ids), by_id(their_w, their_ids)
    assert torch.equal(ids, their_ids)
    # fp32, their k weights summed in their (unsorted) order and ours best first: 1 ulp apart.
    torch.testing.assert_close(w, their_w, rtol=3e-7, atol=0)
    assert (ids // (E // GROUPS)).unique(dim=1).shape[1] <= KEPT + 2  # sanity: groups are kept

    # Float64: the same choices as the per-token algorithm on 1,000 random score sets.
    logits64, bias64 = (
        torch.randn(T, E, generator=g, dtype=torch.float64),
        theirs.e_score_correction_bias.double(),
    )
    w64, ids64, _ = topk_routing(logits64, ours, bias64)
    want = reference(torch.sigmoid(logits64), bias64, GROUPS, KEPT, K, group_by_two=True)
    assert torch.equal(ids64.sort(dim=-1).values, want)
    # The bias chooses, it does not weigh: the weights are the unbiased scores, normalised, scaled.
    picked = torch.sigmoid(logits64).gather(1, ids64)
    torch.testing.assert_close(w64, 2.5 * picked / picked.sum(-1, keepdim=True), rtol=1e-15, atol=0)
    _, unbiased, _ = topk_routing(logits64, ours)
    assert (unbiased.sort(-1).values != ids64.sort(-1).values).any(dim=1).sum() > 50


def test_group_limited_softmax_routing_is_deepseek_v2s():
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    config = DeepseekV2Config(hidden_size=E, num_attention_heads=4, n_routed_experts=E,
                              num_experts_per_tok=K, n_group=GROUPS, topk_group=KEPT,
                              topk_method="group_limited_greedy",
                              routed_scaling_factor=16.0)  # fmt: skip
    theirs = DeepseekV2TopkRouter(config)
    with torch.no_grad():
        theirs.weight.copy_(torch.eye(E))
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(T, E, generator=g)
    _, their_w, their_ids = theirs(logits)
    ours = RouterConfig(top_k=K, pre_softmax=True, normalize_topk=False, n_group=GROUPS,
                        topk_group=KEPT, routed_scaling_factor=16.0,
                        softmax_dtype="fp32")  # fmt: skip
    w, ids, _ = topk_routing(logits, ours)
    (w, ids), (their_w, their_ids) = by_id(w, ids), by_id(their_w, their_ids)
    assert torch.equal(ids, their_ids)
    torch.testing.assert_close(w, their_w, rtol=0, atol=0)
    logits64 = torch.randn(T, E, generator=g, dtype=torch.float64)
    grouped = RouterConfig(top_k=K, pre_softmax=True, normalize_topk=False, n_group=GROUPS,
                           topk_group=KEPT)  # fmt: skip
    _, ids64, _ = topk_routing(logits64, grouped)
    want = reference(torch.softmax(logits64, -1), torch.zeros(E, dtype=torch.float64), GROUPS,
                     KEPT, K, group_by_two=False)  # fmt: skip
    assert torch.equal(ids64.sort(dim=-1).values, want)


def test_routed_scaling_factor_scales_the_layer_and_the_bias_still_moves():
    torch.manual_seed(0)
    router = dict(score_function="sigmoid", top_k=2, n_group=2, topk_group=1,
                  bias_update_rate=0.01)  # fmt: skip
    layers = [MoELayer(MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=8,
                                 router=RouterConfig(**router, routed_scaling_factor=s)))
              for s in (1.0, 2.5)]  # fmt: skip
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(32, 8, dtype=torch.float64)
    layers = [layer.double() for layer in layers]
    torch.testing.assert_close(layers[1](x), 2.5 * layers[0](x), rtol=1e-13, atol=1e-15)
    from moeflow.moe.walk import finish_optimizer_step

    before = layers[1].router.expert_bias.clone()
    finish_optimizer_step(layers[1])  # aux-loss-free balancing, as for ungrouped routing
    assert not torch.equal(before, layers[1].router.expert_bias)


@pytest.mark.parametrize(
    ("router", "experts", "message"),
    [
        ({"n_group": 3}, 16, r"n_group \(3\) must divide moe.num_experts \(16\)"),
        ({"n_group": 4, "topk_group": 5}, 16, r"topk_group \(5\) must be <= router.n_group \(4\)"),
        ({"n_group": 4, "topk_group": 1, "top_k": 6}, 16, r"top_k \(6\) must be <= topk_group"),
        ({"n_group": 8, "score_function": "sigmoid"}, 8, r"equal groups of at least 2"),
        ({"n_group": 2, "type": "null", "num_null_experts": 1}, 8, r"groups the FFN experts"),
        ({"routed_scaling_factor": 0.0}, 8, r"routed_scaling_factor \(0.0\) must be > 0"),
    ],
)
def test_bad_groups_are_refused_naming_the_field(router, experts, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(hidden_size=8, num_experts=experts, ffn_hidden_size=8,
                  router=RouterConfig(**router))  # fmt: skip
