"""Cross-checks against megatron-core's pure MoE functions (pinned version), on random inputs."""

from __future__ import annotations

import warnings

import pytest
import torch

from moeflow.comm.capacity import capacity_keep_mask, expert_capacity
from moeflow.moe.config import RouterConfig
from moeflow.moe.losses import load_balancing_loss, seq_load_balancing_loss, z_loss
from moeflow.moe.routers.topk import topk_routing

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import megatron.core
    from megatron.core.transformer.moe import moe_utils as mu

E = 8


def test_pinned_version():
    assert megatron.core.__version__ == "0.16.1"


def to_dense(weights_TK, ids_TK, num_experts=E):
    probs = torch.zeros(ids_TK.shape[0], num_experts, dtype=weights_TK.dtype)
    probs.scatter_(1, ids_TK, weights_TK)
    routing_map = torch.zeros(ids_TK.shape[0], num_experts, dtype=torch.bool)
    routing_map.scatter_(1, ids_TK, True)
    return probs, routing_map


MODES = [
    ({"score_function": "softmax", "pre_softmax": False}, {"use_pre_softmax": False}),
    (
        {"score_function": "softmax", "pre_softmax": True, "normalize_topk": False},
        {"use_pre_softmax": True},
    ),
    # Megatron normalises sigmoid scores only for k > 1; normalize_topk=True with k=1 gives weight
    # 1.
    ({"score_function": "sigmoid", "normalize_topk": "k>1"}, {"score_function": "sigmoid"}),
]


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize(("ours", "theirs"), MODES)
def test_topk_routing_matches(top_k, ours, theirs):
    torch.manual_seed(top_k)
    logits = torch.randn(64, E) * 2
    if ours.get("normalize_topk") == "k>1":
        ours = {**ours, "normalize_topk": top_k > 1}
    w, ids, _ = topk_routing(logits, RouterConfig(top_k=top_k, **ours))
    probs, rmap = to_dense(w, ids)
    ref_probs, ref_map = mu.topk_routing_with_score_function(logits, top_k, **theirs)
    assert torch.equal(rmap, ref_map)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("pad", [False, True])
def test_probs_drop_policy_matches(top_k, capacity_factor, pad):
    torch.manual_seed(10 * top_k)
    T = 96
    logits = torch.randn(T, E) * 2
    # k=1 after a post-softmax gives every token weight 1: all tied, so rank on pre-softmax weights.
    cfg = RouterConfig(top_k=top_k, pre_softmax=top_k == 1, normalize_topk=False)
    w, ids, _ = topk_routing(logits, cfg)
    probs, rmap = to_dense(w, ids)
    cap = expert_capacity(T, E, top_k, capacity_factor)
    assert cap == mu.get_capacity(T * top_k, E, capacity_factor)
    keep = capacity_keep_mask(ids, w, E, cap, "probs")
    ref_probs, ref_map = mu.apply_router_token_dropping(
        probs, rmap, top_k, capacity_factor, "probs", pad_to_capacity=pad
    )
    ours_probs = to_dense(w * keep, ids)[0]
    ours_map = to_dense(keep.to(w.dtype), ids)[0].bool()
    if not pad:
        assert torch.equal(ours_map, ref_map)
    # With padding Megatron marks extra (zero-weight) slots; the weights are the same either way.
    torch.testing.assert_close(ours_probs, ref_probs, rtol=0, atol=0)


def test_position_policy_agrees_for_k1_up_to_megatrons_tie_order():
    """Megatron's "position" takes `topk` over a 0/1 map: which of the tied tokens it keeps is
    torch's unspecified tie order (on CPU it is not the earliest). Ours keeps the earliest. Both
    keep
    exactly `min(count, C)` tokens per expert; ours is pinned here on a hand-made case."""
    torch.manual_seed(3)
    T, cf = 64, 0.75
    logits = torch.randn(T, E) * 2
    w, ids, _ = topk_routing(logits, RouterConfig(top_k=1))
    probs, rmap = to_dense(w, ids)
    cap = expert_capacity(T, E, 1, cf)
    keep = capacity_keep_mask(ids, w, E, cap, "position")
    _, ref_map = mu.apply_router_token_dropping(probs, rmap, 1, cf, "position")
    ours_map = to_dense(keep.to(w.dtype), ids)[0].bool()
    assert torch.equal(ours_map.sum(0), ref_map.sum(0))
    for e in range(E):
        tokens = (ids[:, 0] == e).nonzero().flatten()
        assert torch.equal(keep[tokens, 0], torch.arange(len(tokens)) < cap)


def test_probs_policy_breaks_ties_by_token_order():
    # k=1 with a post-softmax: every weight is 1, so "probs" keeps the earliest tokens (Megatron's
    # choice among the tied tokens is torch.topk's unspecified order).
    ids = torch.tensor([[0], [1], [0], [0], [1]])
    w = torch.ones(5, 1)
    keep = capacity_keep_mask(ids, w, 2, 2, "probs")
    assert keep.flatten().tolist() == [True, True, True, False, True]


def test_position_policy_first_choices_before_second_choices():
    # Expert 0 is token 0's second choice and tokens 1, 2's first choice; capacity 2.
    ids = torch.tensor([[1, 0], [0, 1], [0, 2]])
    w = torch.full((3, 2), 0.5)
    keep = capacity_keep_mask(ids, w, 3, 2, "position")
    assert keep.tolist() == [[True, False], [True, True], [True, True]]


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_aux_loss_matches(score_function, top_k):
    torch.manual_seed(7)
    T = 80
    logits = torch.randn(T, E)
    _, _, scores = topk_routing(logits, RouterConfig(top_k=top_k, score_function=score_function))
    ref_map, ref_scores = mu.compute_routing_scores_for_aux_loss(logits, top_k, score_function)
    torch.testing.assert_close(scores, ref_scores)
    counts = ref_map.sum(0)
    ours = load_balancing_loss(scores, counts, top_k)
    ref = mu.switch_load_balancing_loss_func(ref_scores, counts, T, top_k, E, 1.0)
    torch.testing.assert_close(ours, ref)


def test_seq_aux_loss_matches_megatron_reshape():
    torch.manual_seed(8)
    B, S, K = 3, 20, 2
    logits_BSE = torch.randn(B, S, E)
    ids = torch.topk(logits_BSE, K, dim=-1).indices
    scores_BSE = torch.softmax(logits_BSE, -1)
    counts_BE = torch.zeros(B, E).scatter_add_(1, ids.view(B, -1), torch.ones(B, S * K))
    ours = seq_load_balancing_loss(scores_BSE, counts_BE, K)
    # Megatron works on [S, B, E] and folds the batch into the expert dim.
    scores_SBE = scores_BSE.transpose(0, 1)
    rmap_SBE = torch.zeros(S, B, E).scatter_(2, ids.transpose(0, 1), 1.0).bool()
    ref = (
        mu.switch_load_balancing_loss_func(
            scores_SBE.reshape(S, -1), rmap_SBE.reshape(S, -1).sum(0), S, K, E, 1.0
        )
        / B
    )
    torch.testing.assert_close(ours, ref)


def test_z_loss_matches():
    torch.manual_seed(9)
    logits = torch.randn(50, E) * 3
    torch.testing.assert_close(z_loss(logits), mu.z_loss_func(logits, 1.0))
