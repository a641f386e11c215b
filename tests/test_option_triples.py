"""Every three option values together: the layer against the float64 reference, and its paths
against each other.

The parallel tests compare the layer with itself (one process against many ranks), so a bug on
both sides passes them. The bugs that got through were combinations of three options: padding,
expert biases and F > D gave the padding rows token 0's gradient; SwiGLU, `grouped_mm` and an
unaligned F crashed. So here the cases form a covering array (`tests/covering.py`): every triple
of option values meets in at least one case, on a fixed seed (the same cases every run).

- `test_options_match_the_reference`: outputs, the input's and every parameter's gradient
  (router, expert weights, biases, low-dimension projections) against `tests/reference.py`.
- `test_paths_agree`: for the routers the reference does not model (AdaMoE, MoE++, RMoE, seq
  aux loss, aux-loss-free bias) and shared experts, each case runs its other paths (two chunks,
  the gathered mode, padding, both expert loops, the router weights carried with the rows or
  applied in the combine) and every result must equal the default path's; fp32 `grouped_mm`
  must match the fp32 loop.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from moeflow import MoEConfig, MoELayer, RouterConfig
from tests.covering import covering_cases
from tests.reference import reference_moe
from tests.router_kinds import router_kinds

D = 8
TOPK_ROUTERS = {
    "softmax": {},
    "pre-softmax": {"pre_softmax": True, "normalize_topk": False},
    "sigmoid": {"score_function": "sigmoid"},
}
REFERENCE_AXES = {
    "router": list(TOPK_ROUTERS),
    "ffn": [12, 6],  # F > D (router weights applied in the combine) and F <= D (carried)
    "capacity": [None, 0.5, 1.0],
    "pad": [False, True],
    "policy": ["probs", "position"],
    "top_k": [1, 2, 3],
    "activation": ["gelu", "swiglu", "relu"],
    "bias": [False, True],
    "overlap": [1, 2],
    "kernel": ["auto", "loop", "grouped_loop"],
    "a2a_dim": [None, 4],
}


def _valid_reference(case: dict) -> bool:
    if case["capacity"] is None:  # padding needs a capacity; the policy only ranks drops
        return not case["pad"] and case["policy"] == "probs"
    return not (case["pad"] and case["overlap"] > 1)  # padding needs one chunk


REFERENCE_CASES = covering_cases(REFERENCE_AXES, _valid_reference)


def _name(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=_name)
def test_options_match_the_reference(case):
    rc = RouterConfig(
        top_k=case["top_k"],
        capacity_factor=case["capacity"],
        pad_to_capacity=case["pad"],
        drop_policy=case["policy"],
        **TOPK_ROUTERS[case["router"]],
    )
    cfg = MoEConfig(hidden_size=D, num_experts=4, ffn_hidden_size=case["ffn"],
                    activation=case["activation"], ffn_bias=case["bias"],
                    expert_kernel=case["kernel"], a2a_dim=case["a2a_dim"], router=rc)  # fmt: skip
    torch.manual_seed(REFERENCE_CASES.index(case))
    layer = MoELayer(cfg).double()
    bias = case["bias"]
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)  # uneven routing, so capacity drops pairs
        if bias:  # nonzero biases: a padding row's output is then not zero
            layer.ffn_out_bias.normal_(0.0, 1.0)
            layer.experts.w1[:, -1].normal_(0.0, 1.0)
    x = torch.randn(13, D, dtype=torch.float64)
    g = torch.randn_like(x)
    x1 = x.clone().requires_grad_(True)
    out = layer(x1, overlap_degree=case["overlap"])
    (out * g).sum().backward()

    w1 = layer.experts.w1
    r = w1.shape[1] - bias  # the expert input width; with biases, the last row of w1 is b1
    ref = [layer.router.weight, w1[:, :r], layer.experts.w2]
    got = [layer.router.weight.grad, w1.grad[:, :r], layer.experts.w2.grad]
    if bias:
        ref += [w1[:, r], layer.ffn_out_bias]
        got += [w1.grad[:, r], layer.ffn_out_bias.grad]
    if case["a2a_dim"]:
        ref += [layer.a2a.down, layer.a2a.up]
        got += [layer.a2a.down.grad, layer.a2a.up.grad]
    ref = [p.detach().clone().requires_grad_(True) for p in ref]
    extra = {}
    if bias:
        extra.update(b1=ref[3], b2=ref[4])
    if case["a2a_dim"]:
        extra.update(a2a=(ref[-2], ref[-1]))
    x2 = x.clone().requires_grad_(True)
    ref_out, aux, _, counts = reference_moe(x2, *ref[:3], cfg, **extra)
    ((ref_out * g).sum() + cfg.router.aux_loss_coeff * aux).backward()

    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-11)
    assert layer.last_stats.tokens_per_expert.tolist() == list(counts)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-8, atol=1e-10)
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        torch.testing.assert_close(a, b.grad, rtol=1e-8, atol=1e-10, msg=lambda m, i=i: f"{i}: {m}")


def test_cases_cover_every_triple():
    """The covering array is what the reference test stands on: every three values that a valid
    configuration can hold together meet in some case, in fewer cases than the full product."""
    names = list(REFERENCE_AXES)
    valid = [
        case
        for case in itertools.product(*REFERENCE_AXES.values())
        if _valid_reference(dict(zip(names, case, strict=True)))
    ]
    for axes in itertools.combinations(range(len(names)), 3):
        wanted = {tuple(case[i] for i in axes) for case in valid}
        met = {tuple(c[names[i]] for i in axes) for c in REFERENCE_CASES}
        assert wanted <= met, [names[i] for i in axes]
    assert len(REFERENCE_CASES) < len(valid) / 100


ROUTERS = router_kinds("topk", "null", "moepp", "rmoe", "seq-aux-z", "bias-balance")
PATH_AXES = {
    "router": list(ROUTERS),
    "ffn": [12, 6],
    "capacity": [None, 0.75],
    "top_k": [1, 2, 3],
    "activation": ["gelu", "swiglu"],
    "bias": [False, True],
    "shared": [0, 8],
    "a2a_dim": [None, 4],
}
PATH_CASES = covering_cases(PATH_AXES)


def _run(cfg, x, g, seed, dtype=torch.float64, carry=None, **call) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    layer = MoELayer(cfg).to(dtype)
    if carry is not None:  # the other weighting: carried with the rows <-> in the combine
        layer.expert_dispatch.carry_weights = carry
    with torch.no_grad():
        for p in layer.router.parameters():
            p.normal_(0.0, 1.0)
        if cfg.ffn_bias:
            layer.ffn_out_bias.normal_(0.0, 1.0)
    x1 = x.to(dtype).clone().requires_grad_(True)
    y = layer(x1, **call)
    (y * g.to(dtype)).sum().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in layer.parameters()]
    return [t.double() for t in (y, x1.grad, *grads)]


@pytest.mark.parametrize("case", PATH_CASES, ids=_name)
def test_paths_agree(case):
    rc = RouterConfig(top_k=case["top_k"], capacity_factor=case["capacity"],
                      **ROUTERS[case["router"]])  # fmt: skip
    cfg = MoEConfig(hidden_size=D, num_experts=4, ffn_hidden_size=case["ffn"],
                    activation=case["activation"], ffn_bias=case["bias"],
                    shared_expert_ffn_hidden_size=case["shared"], a2a_dim=case["a2a_dim"],
                    router=rc)  # fmt: skip
    seed = PATH_CASES.index(case)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, D, dtype=torch.float64, generator=gen)
    g = torch.randn(2, 9, D, dtype=torch.float64, generator=gen)
    base = _run(cfg, x, g, seed)
    others = {
        "two chunks": _run(cfg, x, g, seed, overlap_degree=2),
        "gathered": _run(cfg, x, g, seed, mode="dp"),
        "other weighting": _run(cfg, x, g, seed, carry=case["ffn"] > D),
    }
    if case["capacity"] is not None:
        padded = dataclasses.replace(rc, pad_to_capacity=True)
        others["padded"] = _run(dataclasses.replace(cfg, router=padded), x, g, seed)
    for kernel in ("loop", "grouped_loop"):
        others[kernel] = _run(dataclasses.replace(cfg, expert_kernel=kernel), x, g, seed)
    for name, result in others.items():
        for i, (a, b) in enumerate(zip(base, result, strict=True)):
            torch.testing.assert_close(
                b, a, rtol=1e-9, atol=1e-10, msg=lambda m, n=name, i=i: f"{n}, tensor {i}: {m}"
            )
    loop = _run(dataclasses.replace(cfg, expert_kernel="loop"), x, g, seed, torch.float32)
    gmm = _run(dataclasses.replace(cfg, expert_kernel="grouped_mm"), x, g, seed, torch.float32)
    for i, (a, b) in enumerate(zip(loop, gmm, strict=True)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"{i}: {m}")
