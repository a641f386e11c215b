"""Cross-checks against DeepSpeed's `topkgating` (pinned version), on random inputs."""

from __future__ import annotations

import logging

import pytest
import torch

from moeflow.comm.capacity import capacity_keep_mask, expert_capacity
from moeflow.moe.config import RouterConfig
from moeflow.moe.losses import load_balancing_loss
from moeflow.moe.routers.topk import topk_routing

logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
import deepspeed  # noqa: E402
from deepspeed.moe.sharded_moe import topkgating  # noqa: E402

E = 8


def test_pinned_version():
    assert deepspeed.__version__ == "0.19.8"


def dense(weights_TK, ids_TK):
    return torch.zeros(ids_TK.shape[0], E).scatter_(1, ids_TK, weights_TK)


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize(
    "ours", [{"pre_softmax": True, "normalize_topk": True}, {"pre_softmax": False}]
)
def test_dropless_weights_match(top_k, ours):
    """DeepSpeed: softmax over all experts, top-k, renormalise = our pre-softmax + normalize_topk,
    and (the same numbers) our default post-softmax."""
    torch.manual_seed(top_k)
    logits = torch.randn(64, E) * 2
    w, ids, scores = topk_routing(logits, RouterConfig(top_k=top_k, **ours))
    l_aux, combine_sec, _, counts = topkgating(logits, top_k, 1.0, 0, drop_tokens=False)
    torch.testing.assert_close(dense(w, ids), combine_sec.sum(-1), rtol=1e-6, atol=1e-7)
    assert torch.equal(torch.bincount(ids.flatten(), minlength=E), counts)
    # DeepSpeed's l_aux is the same quantity as Megatron's normalisation.
    torch.testing.assert_close(load_balancing_loss(scores, counts, top_k), l_aux)


@pytest.mark.parametrize("top_k", [1, 2])
def test_drops_differ_only_by_renormalisation_and_min_capacity(top_k):
    """Pins the two documented differences: DeepSpeed applies min_capacity (default 4) and
    renormalises the surviving gates of a token after a drop; we keep the original weights."""
    torch.manual_seed(5 + top_k)
    T, cf, min_cap = 40, 0.25, 4
    logits = torch.randn(T, E) * 2
    # Raw softmax gates as weights: DeepSpeed's "probs" policy ranks by these.
    cfg = RouterConfig(top_k=top_k, pre_softmax=True, normalize_topk=False)
    w, ids, _ = topk_routing(logits, cfg)
    cap = expert_capacity(T, E, top_k, cf, min_capacity=min_cap)
    assert cap == min_cap > expert_capacity(T, E, top_k, cf)  # min_capacity is what binds here
    keep = capacity_keep_mask(ids, w, E, cap, "probs")
    _, combine_sec, _, _ = topkgating(logits, top_k, cf, min_cap, drop_tokens=True)
    ds_w = combine_sec.sum(-1)
    ours = dense(w * keep, ids)
    assert torch.equal(ds_w > 0, ours > 0)
    survivors = ours.sum(-1, keepdim=True)
    renormalised = torch.where(survivors > 0, ours / survivors.clamp(min=1e-30), ours)
    torch.testing.assert_close(ds_w, renormalised, rtol=1e-5, atol=1e-6)
    if top_k > 1:
        assert not torch.allclose(ds_w, ours)


def test_expert_parameters_are_deepspeeds_moe_params_at_ep_size_1():
    """Mirrors DeepSpeed's tests/unit/moe/test_moe.py (TestMoE builds its optimizer from
    `split_params_into_different_moe_groups_for_optimizer`): at `ep_size=1` too, `is_moe_param`
    holds for exactly the expert weights, and the split gives DeepSpeed's groups (the rest under
    the group's own name, the experts under "ep_size_1", flagged `moe`)."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from deepspeed.moe.utils import (
        is_moe_param,
        split_params_into_different_moe_groups_for_optimizer,
    )

    from moeflow.integrations.deepspeed import MoE

    def expert():
        return torch.nn.Sequential(
            torch.nn.Linear(8, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 8, bias=False)
        )

    groups = {}
    for name, layer in (
        ("deepspeed", DeepSpeedMoE(8, expert(), num_experts=4, ep_size=1, k=1)),
        ("moeflow", MoE(8, expert(), num_experts=4, ep_size=1, k=1, use_rts=False)),
    ):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), layer)
        experts = [p for n, p in model.named_parameters() if "expert" in n and "gate" not in n]
        assert {id(p) for p in model.parameters() if is_moe_param(p)} == {id(p) for p in experts}
        split = split_params_into_different_moe_groups_for_optimizer(
            {"params": list(model.parameters()), "name": "all", "lr": 1e-3}
        )
        assert {id(p) for p in split[1]["params"]} == {id(p) for p in experts}
        groups[name] = [(g["name"], g.get("moe", False), g["lr"]) for g in split]
    assert (
        groups["moeflow"]
        == groups["deepspeed"]
        == [("all", False, 1e-3), ("ep_size_1", True, 1e-3)]
    )
