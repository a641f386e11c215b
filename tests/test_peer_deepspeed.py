"""Cross-checks against DeepSpeed (pinned version) in the same test, on random inputs: its gating
functions (`top1gating`, `top2gating`, `topkgating`) against the DeepSpeed-style `MoE`'s gate,
its `MoE` layer against ours with the same weights, its parameter marking and optimizer groups.

Mirrors DeepSpeed's `tests/unit/moe/test_moe.py`: `TestTopkGate` and the
`test_*_capacity_exceeds_num_tokens` checks (which pairs each gating keeps, by k, capacity,
random token selection and sampled second experts), `TestTopk` (dropless top-1 with random
token selection), `TestMoESingleton` (a `Sequential(Linear, Linear)` expert trains), `TestMoE`'s
optimizer groups; its engine tests (`TestSimpleMoE`, `TestMoE`, `TestExpertWeightGradWithZero`:
ZeRO 0-2 at ep 1 and 2) are `tests/test_integration_deepspeed.py`'s.
"""

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
from deepspeed.moe.layer import MoE as DeepSpeedMoE  # noqa: E402
from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating  # noqa: E402

from moeflow.integrations.deepspeed import MoE  # noqa: E402
from moeflow.integrations.deepspeed_gating import DeepSpeedGate  # noqa: E402
from moeflow.moe.config import MoEConfig  # noqa: E402

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


# -- DeepSpeed's gating decisions --------------------------------------------------------------
def their_gating(logits, k, cf, drop, rts, sampling, min_cap):
    """DeepSpeed's combine weights `[T, E]`, l_aux and exp_counts for `logits`."""
    if k == 1:
        out = top1gating(logits.clone(), cf, min_cap, None, None, drop, rts)
    elif k == 2:
        out = top2gating(logits.clone(), cf, min_cap, drop, None, sampling)
    else:
        out = topkgating(logits.clone(), k, cf, min_cap, drop)
    return out[1].sum(-1), out[0], out[3]


def our_gate(k, **kwargs) -> DeepSpeedGate:
    """The DeepSpeed-style MoE's gate with an identity weight: its logits are its input."""
    gate = DeepSpeedGate(
        MoEConfig(hidden_size=E, num_experts=E, ffn_hidden_size=4, router=RouterConfig(top_k=k)),
        k=k, **kwargs,
    )  # fmt: skip
    with torch.no_grad():
        gate.weight.copy_(torch.eye(E))
    return gate


def our_gating(gate, logits):
    route = gate(logits)
    kept_w = route.weights_TK * route.keep_TK
    l_aux, counts = gate.take_outputs()
    return (
        torch.zeros(logits.shape[0], E).scatter_add_(1, route.expert_ids_TK, kept_w),
        l_aux,
        counts,
    )


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, None])  # None: drop_tokens=False
@pytest.mark.parametrize("random", [False, True])  # use_rts (k = 1), sampled 2nd expert (k = 2)
def test_gating_keeps_deepspeeds_pairs_weights_l_aux_and_counts(k, capacity_factor, random):
    """The pairs DeepSpeed keeps, its weights (renormalised after drops for k >= 2), its l_aux
    (first choices only at k = 2) and its exp_counts (before drops), over token counts that make
    the capacity bind, exceed the tokens (DeepSpeed's `*_capacity_exceeds_num_tokens`) or fall
    below min_capacity; random draws seeded alike (the same keys, the same Gumbel noise)."""
    drop = capacity_factor is not None
    cf = capacity_factor or 1.0
    for seed, (tokens, min_cap) in enumerate([(24, 4), (40, 4), (13, 0), (4, 4), (8, 0)]):
        logits = torch.randn(tokens, E, generator=torch.Generator().manual_seed(seed)) * 2
        gate = our_gate(k, capacity_factor=cf, min_capacity=min_cap, drop_tokens=drop,
                        use_rts=random, top2_2nd_expert_sampling=random)  # fmt: skip
        torch.manual_seed(seed)
        want_w, want_aux, want_counts = their_gating(logits, k, cf, drop, random, random, min_cap)
        torch.manual_seed(seed)
        got_w, got_aux, got_counts = our_gating(gate, logits)
        assert torch.equal(got_w > 0, want_w > 0), (seed, tokens)  # the same pairs kept
        torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)  # fp32, same ops
        torch.testing.assert_close(got_aux, want_aux, rtol=1e-6, atol=1e-7)
        assert torch.equal(got_counts, want_counts)


def test_random_token_selection_keeps_deepspeeds_counts_chosen_at_random():
    """use_rts=True: each expert keeps min(routed, C) tokens, as many as DeepSpeed keeps with any
    seed, chosen at random: the kept tokens change with the seed and differ from the earliest
    ones, which use_rts=False keeps."""
    logits = torch.randn(40, E, generator=torch.Generator().manual_seed(3)) * 2
    gate = our_gate(1, capacity_factor=0.5, min_capacity=0, use_rts=True)
    kept_sets = set()
    for seed in range(6):
        torch.manual_seed(seed)
        got_w, _, routed = our_gating(gate, logits)
        torch.manual_seed(seed + 100)
        want_w, _, _ = their_gating(logits, 1, 0.5, True, True, False, 0)
        kept_E = (got_w > 0).sum(0)
        assert torch.equal(kept_E, (want_w > 0).sum(0))
        assert torch.equal(kept_E, routed.clamp(max=3))  # C = ceil(40 / 8 * 0.5) = 3
        kept_sets.add(tuple((got_w > 0).flatten().tolist()))
    earliest, _, _ = our_gating(our_gate(1, capacity_factor=0.5, min_capacity=0, use_rts=False),
                                logits)  # fmt: skip
    assert len(kept_sets) > 1 and tuple((earliest > 0).flatten().tolist()) not in kept_sets


# -- DeepSpeed's MoE layer ------------------------------------------------------------------------
class Custom(torch.nn.Module):
    """An expert DeepSpeed takes and moeflow cannot group: gated, returning a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up = torch.nn.Linear(8, 12), torch.nn.Linear(8, 12)
        self.down = torch.nn.Linear(12, 8)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x)), None


EXPERTS = {
    "ffn": lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                       torch.nn.Linear(16, 8)),
    "linear-linear": lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)),
    "silu": lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(),
                                        torch.nn.Linear(16, 8)),
    "custom": Custom,
}  # fmt: skip


def same_layers(expert: str, **kwargs):
    """DeepSpeed's MoE and ours with the same weights (experts that differ from each other)."""
    torch.manual_seed(0)
    theirs = DeepSpeedMoE(8, EXPERTS[expert](), num_experts=4, **kwargs)
    ours = MoE(8, EXPERTS[expert](), num_experts=4, **kwargs)
    ds = theirs.deepspeed_moe
    with torch.no_grad():
        ds.gate.wg.weight.normal_()
        ours.router.weight.copy_(ds.gate.wg.weight)
        for e, module in enumerate(ds.experts.deepspeed_experts):
            for p in module.parameters():
                p.normal_(0.0, 0.5)
            if ours.per_expert_modules:
                ours.experts.local[e].load_state_dict(module.state_dict())
            else:
                ours.experts.w1[e, :8].copy_(module[0].weight.t())
                ours.experts.w1[e, 8].copy_(module[0].bias)
                ours.experts.w2[e].copy_(module[2].weight.t())
                ours.ffn_out_bias[e].copy_(module[2].bias)
    return theirs, ours


def expert_grads(layer) -> list[torch.Tensor]:
    if not isinstance(layer, MoE):  # DeepSpeed's (ours is one too, for its engine)
        return [p.grad for p in layer.deepspeed_moe.experts.parameters()]
    if layer.per_expert_modules:
        return [p.grad for p in layer.experts.parameters()]
    return [layer.experts.w1.grad, layer.experts.w2.grad, layer.ffn_out_bias.grad]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"k": 2}, {"k": 3}, {"capacity_factor": 0.5}, {"noisy_gate_policy": "Jitter"},
     {"noisy_gate_policy": "RSample"}, {"eval_capacity_factor": 0.5, "eval": True},
     {"used_token": True}],
    ids=["defaults-k1", "defaults-k2", "k3", "cf0.5", "jitter", "rsample", "eval-cf", "used"],
)  # fmt: skip
def test_moe_with_deepspeeds_arguments_computes_deepspeeds_moe(kwargs):
    """`MoE(hidden, expert, num_experts, ...)` with DeepSpeed's defaults (random token selection,
    sampled second experts, min_capacity 4) and its other gating options gives DeepSpeed's
    output, l_aux, exp_counts and gradients, with the same seed."""
    kwargs = dict(kwargs)
    evaluate, used = kwargs.pop("eval", False), kwargs.pop("used_token", False)
    theirs, ours = same_layers("ffn", **kwargs)
    x = torch.randn(2, 11, 8, generator=torch.Generator().manual_seed(1))
    used_token = (torch.arange(22) % 3 != 0).float() if used else None
    results = []
    for layer in (theirs, ours):
        layer.train(not evaluate)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        out, l_aux, counts = layer(xi, used_token)
        (out.square().sum() + l_aux).backward()
        results.append((out, l_aux, counts, xi.grad, layer))
    (out_t, aux_t, counts_t, gx_t, _), (out_o, aux_o, counts_o, gx_o, _) = results
    # fp32: the same ops, the combine summed in another order; gradients of O(1) summed over up
    # to 3 routes and 22 tokens in another order too
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_o, aux_t, rtol=1e-6, atol=1e-7)
    assert torch.equal(counts_o, counts_t) and counts_o.device == x.device
    grad_tol = {"rtol": 1e-5, "atol": 2e-5}
    torch.testing.assert_close(gx_o, gx_t, **grad_tol)
    gate_t = theirs.deepspeed_moe.gate.wg.weight.grad
    torch.testing.assert_close(ours.router.weight.grad, gate_t, **grad_tol)
    w1 = torch.stack([m[0].weight.grad.t() for m in theirs.deepspeed_moe.experts.deepspeed_experts])
    torch.testing.assert_close(ours.experts.w1.grad[:, :8], w1, **grad_tol)


@pytest.mark.parametrize("expert", ["linear-linear", "silu", "custom"])
def test_any_expert_module_runs_per_expert_with_deepspeeds_results(expert):
    """DeepSpeed takes any module as the expert (its `TestMoESingleton` uses
    `Sequential(Linear, Linear)`): so does the DeepSpeed-style MoE, per expert, naming that slower
    path once per expert class, with DeepSpeed's outputs and gradients."""
    from moeflow.integrations import deepspeed_moe

    deepspeed_moe._NOTICED.discard(type(EXPERTS[expert]()).__name__)
    with pytest.warns(UserWarning, match="runs as its own module"):
        theirs, ours = same_layers(expert, k=2)
    assert ours.per_expert_modules
    x = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grads = []
    for layer in (theirs, ours):
        torch.manual_seed(3)
        out, l_aux, _ = layer(x)
        (out.square().sum() + l_aux).backward()
        grads.append((out, x.grad.clone(), expert_grads(layer)))
        x.grad = None
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)  # as above
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=2e-5)
    for got, want in zip(grads[1][2], grads[0][2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named once: a second layer says nothing
        MoE(8, EXPERTS[expert](), num_experts=4)
