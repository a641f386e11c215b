"""Every parallel mode (ep, sharded, dp) from one expert layout, on 2 and 4 gloo ranks, against the
single process in float64: outputs, input gradients and every parameter gradient after GradSync.

Covers E >= G (whole experts per rank) and E < G (F-slices of one expert per rank), uneven token
counts, k 1 and 2, dropless and capacity, the topk, null, moepp and rmoe routers, a re-placed and a
replicated layout, overlap degree 1 and 2, the flat and the two-level all-to-all, shared experts,
expert biases and the low-dimension all-to-all (whose bytes fall by D/r); then a covering array in
which every two of those options' values (F <= D among them) meet. One spawn per world size serves
every case."""

from __future__ import annotations

import pytest
import torch

from moeflow import MoEConfig, MoELayer, RouterConfig, set_aux_loss_scale
from moeflow.moe.dispatch_config import DispatchConfig
from moeflow.moe.experts import slice_experts
from moeflow.parallel import GradSync, ParallelDims, parallelize
from tests.covering import covering_cases
from tests.distributed import DistributedTestError, run_on_ranks
from tests.ep_reference import RouterNet as Net
from tests.ep_reference import build_router_net as build

D, F = 8, 12
MODES = ("ep", "sharded", "dp")
TOL = {"rtol": 1e-9, "atol": 1e-11}


def router(kind: str, k: int, **extra) -> RouterConfig:
    if kind == "null":
        return RouterConfig(type="null", num_null_experts=4, top_k=k, **extra)
    if kind == "moepp":
        return RouterConfig(
            type="moepp", zero_experts=1, copy_experts=1, constant_experts=1, top_k=k, **extra
        )
    if kind == "rmoe":
        return RouterConfig(type="rmoe", rnn_dim=6, top_k=k, **extra)
    return RouterConfig(top_k=k, z_loss_coeff=1e-3, **extra)


def case_slots(case: dict, layout) -> dict[str, list[int]] | None:
    """A permuted and/or replicated placement over the layout's shard groups."""
    if not case.get("permuted") and not case.get("replicas"):
        return None
    out = {}
    for seed, name in enumerate(("moe1", "moe2")):
        gen = torch.Generator().manual_seed(7 + seed)
        e, groups = layout.num_experts, layout.num_groups
        order = (
            torch.randperm(e, generator=gen).tolist() if case.get("permuted") else list(range(e))
        )
        own, slots = e // groups, []
        for v in range(groups):
            block = order[v * own : (v + 1) * own]
            others = [x for x in torch.randperm(e, generator=gen).tolist() if x not in block]
            slots += block + others[: case.get("replicas", 0)]
        out[name] = slots
    return out


def reference(cfg: MoEConfig, xs, gs, world: int):
    ref = build(cfg)
    set_aux_loss_scale(ref, 1.0 / world)
    ref_xs = [t.clone().requires_grad_(True) for t in xs]
    ref_outs = [ref(t) for t in ref_xs]
    sum((o * g).sum() for o, g in zip(ref_outs, gs, strict=True)).div(world).backward()
    return ref, ref_outs, ref_xs


def check_case(ctx, case: dict, shards: list[int]) -> int:
    world, rank, ep = ctx.world_size, ctx.rank, ctx.dims.ep
    experts = case["experts"](ep)
    k = min(case["k"], experts) if case["router"] in ("topk", "rmoe") else case["k"]
    extra = {}
    if case.get("capacity") is not None:
        extra = {"capacity_factor": case["capacity"], "drop_policy": case.get("drop", "probs")}
    cfg = MoEConfig(
        hidden_size=D, num_experts=experts, ffn_hidden_size=case.get("ffn", F),
        activation=case.get("act", "swiglu"),
        router=router(case["router"], k, **extra),
        shared_expert_ffn_hidden_size=case.get("shared", 0),
        shared_expert_gate=case.get("shared_gate", False), ffn_bias=case.get("bias", False),
        a2a_dim=case.get("a2a"),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(100)
    xs = [torch.randn(n, D, dtype=torch.float64, generator=gen) for n in shards]
    gs = [torch.randn(n, D, dtype=torch.float64, generator=gen) for n in shards]
    ref, ref_outs, ref_xs = reference(cfg, xs, gs, world)
    par = build(cfg)
    from moeflow.moe.layout import ExpertLayout

    canonical = ExpertLayout.canonical(experts, F, ep)
    dispatch = DispatchConfig(two_level=case.get("two_level", False), ranks_per_node=2)
    parallelize(par, ctx, dispatch, expert_slots=case_slots(case, canonical))
    par.overlap = case.get("overlap", 1)
    grad_sync = GradSync(par, ctx)
    for mode in MODES:
        label = f"{case} mode={mode} E={experts} G={ep}"
        par.zero_grad(set_to_none=True)
        par.mode = mode
        x = xs[rank].clone().requires_grad_(True)
        out = par(x)
        (out * gs[rank]).sum().backward()
        grad_sync.sync()
        torch.testing.assert_close(out, ref_outs[rank], **TOL, msg=lambda m, s=label: f"{s}: {m}")
        check_memory(par, mode, label)
        torch.testing.assert_close(x.grad, world * ref_xs[rank].grad, **TOL)
        for name, p in par.named_parameters():
            if ".experts." not in name:
                want = ref.get_parameter(name).grad
                got = p.grad if p.grad is not None else torch.zeros_like(p)
                want = want if want is not None else torch.zeros_like(p)
                torch.testing.assert_close(
                    got, want, **TOL, msg=lambda m, s=f"{label} {name}": f"{s}: {m}"
                )
        for lname in ("moe1", "moe2"):
            layer, ref_layer = getattr(par, lname), getattr(ref, lname)
            lo, hi = layer.layout.ffn_range(layer.expert_dispatch.rank)
            w1, w2 = slice_experts(
                ref_layer.experts.w1.grad, ref_layer.experts.w2.grad, layer.local_expert_ids, lo, hi
            )
            v1, _ = slice_experts(
                ref_layer.experts.w1.detach(), ref_layer.experts.w2.detach(),
                layer.local_expert_ids, lo, hi,
            )  # fmt: skip
            assert torch.equal(layer.experts.w1.detach(), v1), f"{label} {lname} weights"
            for got, want, w in (
                (layer.experts.w1.grad, w1, "w1"),
                (layer.experts.w2.grad, w2, "w2"),
            ):
                torch.testing.assert_close(
                    got, want, **TOL, msg=lambda m, s=f"{label} {lname}.{w}": f"{s}: {m}"
                )
    return len(MODES)


def check_memory(par: Net, mode: str, label: str) -> None:
    """Expert-parameter bytes a rank holds, and the most the mode's weight gather held during the
    call, measured on the tensors, against the layout's arithmetic."""
    for layer in (par.moe1, par.moe2):
        lay, c = layer.layout, 2 if layer.config.activation == "swiglu" else 1
        lay, bias, d = layer.layout, layer.config.ffn_bias, layer.config.expert_dim
        held = sum(p.nbytes for p in layer.experts.parameters())
        assert held == 8 * lay.rank_elements(d, c, bias), label
        per_expert = layer.config.ffn_hidden_size * (c * (d + bias) + d)
        assert held * lay.group_size == 8 * per_expert * len(lay.slots), label  # 1/G each
        peak = layer.expert_dispatch.last_gather_peak_bytes
        assert peak == 8 * lay.gather_peak_elements(mode, d, c, bias), (label, peak)
        assert (peak > 0) == (mode == "dp" or (mode == "ep" and lay.shards > 1)), label


def whole(ep: int) -> int:  # E >= G: whole experts on every rank
    return max(8, ep)


def sliced(ep: int) -> int:  # E < G: an F-slice of one expert per rank
    return max(ep // 2, 1)


CASES = [
    {"experts": whole, "router": "topk", "k": 1},
    {"experts": whole, "router": "topk", "k": 2, "overlap": 2, "act": "gelu"},
    {"experts": whole, "router": "topk", "k": 2, "capacity": 1.0},
    {"experts": whole, "router": "topk", "k": 2, "capacity": 1.25, "permuted": True},
    {"experts": whole, "router": "topk", "k": 2, "replicas": 1, "overlap": 2},
    {"experts": whole, "router": "null", "k": 2},
    {"experts": whole, "router": "moepp", "k": 2, "capacity": 1.0, "drop": "position"},
    {"experts": whole, "router": "rmoe", "k": 2, "overlap": 2},
    {"experts": sliced, "router": "topk", "k": 1},
    {"experts": sliced, "router": "topk", "k": 2, "overlap": 2},
    {"experts": sliced, "router": "topk", "k": 2, "capacity": 1.0, "act": "gelu"},
    {"experts": sliced, "router": "null", "k": 2, "overlap": 2},
    {"experts": sliced, "router": "moepp", "k": 2},
    {"experts": sliced, "router": "rmoe", "k": 1, "capacity": 1.5},
    {"experts": sliced, "router": "topk", "k": 2, "permuted": True, "replicas": 1, "overlap": 2},
    # two-level all-to-all (nodes of 2 ranks) wherever tokens travel
    {"experts": whole, "router": "topk", "k": 2, "two_level": True, "overlap": 2},
    {"experts": sliced, "router": "moepp", "k": 2, "two_level": True, "capacity": 1.0},
    # shared experts beside the routed ones, in every mode
    {"experts": sliced, "router": "topk", "k": 2, "shared": 8, "shared_gate": True, "overlap": 2},
    # expert biases (b1 in w1's last row, b2 after the combine), whole experts and F-slices
    {"experts": whole, "router": "topk", "k": 2, "bias": True, "act": "gelu_tanh", "capacity": 1.0},
    {"experts": sliced, "router": "moepp", "k": 2, "bias": True, "act": "gelu_tanh", "overlap": 2},
    # the low-dimension all-to-all (a2a_dim = D/2), with a shared expert at full width
    {"experts": whole, "router": "topk", "k": 2, "a2a": 4, "overlap": 2, "shared": 8},
    {"experts": sliced, "router": "rmoe", "k": 2, "a2a": 4, "bias": True, "capacity": 1.0},
]


# Beyond the cases above: every two option values together in every mode (a fixed-seed covering
# array, `tests/covering.py`), F <= D (the router weights travel with the rows) among them.
COMBINED_AXES = {
    "experts": [whole, sliced],
    "router": ["topk", "null", "moepp", "rmoe"],
    "k": [1, 2],
    "ffn": [F, 6],
    "capacity": [None, 1.0],
    "drop": ["probs", "position"],
    "overlap": [1, 2],
    "two_level": [False, True],
    "shared": [0, 8],
    "bias": [False, True],
    "act": ["swiglu", "gelu"],
    "a2a": [None, 4],
    "permuted": [False, True],
}


def _valid_combined(case: dict) -> bool:
    return case["capacity"] is not None or case["drop"] == "probs"


def check_a2a_bytes(ctx) -> int:
    """The same routing with a2a_dim unset, D/2 and D/4: the bytes on the wire fall by D/r (F >
    D: the combine applies the router weights, so none travels)."""
    sent, first = {}, None
    for r in (None, D // 2, D // 4):
        cfg = MoEConfig(hidden_size=D, num_experts=8, ffn_hidden_size=F, a2a_dim=r,
                        router=RouterConfig(top_k=2))  # fmt: skip
        model = build(cfg)
        first = first or dict(model.named_parameters())
        with torch.no_grad():  # the first model's router (and whatever runs before moe1)
            for name, p in model.named_parameters():
                if name in first and first[name].shape == p.shape:
                    p.copy_(first[name])
        model = parallelize(model, ctx)
        x = torch.randn(16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        model(x)
        traffic = model.moe1.last_stats.traffic
        sent[r] = (traffic.sent_rows, traffic.sent_bytes)
    rows = sent[None][0]
    assert rows > 0 and all(v[0] == rows for v in sent.values()), sent  # same routing
    for r in (D, D // 2, D // 4):
        assert sent[r if r < D else None][1] == rows * r * 8, sent
    return 1


def _all_cases(rank, world, cases, shards):
    ctx = ParallelDims(ep=world).build()
    return sum(check_case(ctx, case, shards) for case in cases) + check_a2a_bytes(ctx)


@pytest.mark.parametrize("world", [2, 4])
def test_every_mode_matches_the_single_process(world):
    shards = [10 + 3 * r for r in range(world)]  # uneven token counts per rank
    combined = covering_cases(COMBINED_AXES, _valid_combined, strength=2)  # here, not in the ranks
    cases = [c for c in CASES + combined if not (c.get("replicas") and c["experts"](world) < 2)]
    want = len(cases) * len(MODES) + 1  # + the a2a byte count
    assert run_on_ranks(_all_cases, world, args=(cases, shards), timeout=400) == [want] * world


def _disagree(rank, world):
    ctx = ParallelDims(ep=world).build()
    model = parallelize(build(MoEConfig(hidden_size=D, num_experts=2, ffn_hidden_size=F)), ctx)
    model.mode = "dp" if rank == 1 else "ep"
    model(torch.randn(5, D, dtype=torch.float64))


def test_ranks_that_disagree_on_the_mode_all_raise():
    with pytest.raises(DistributedTestError) as info:
        run_on_ranks(_disagree, 2, timeout=60)
    text = str(info.value)
    for r in range(2):  # the first call of each rank is checked: each names every rank's call
        assert f"rank {r}: RuntimeError: MoE layer 'moe1': the ranks of the expert group" in text
    assert text.count("(rank 0: 'ep' x1, rank 1: 'dp' x1)") >= 2  # also in tracebacks


def test_bad_mode_and_sizes_name_the_valid_choices():
    layer = MoELayer(MoEConfig(hidden_size=D, num_experts=2, ffn_hidden_size=F))
    with pytest.raises(ValueError, match=r"parallel mode \('tp'\) must be one of"):
        layer(torch.randn(3, D), mode="tp")
    with pytest.raises(ValueError, match=r"dispatch.mode \('expert'\)"):
        DispatchConfig(mode="expert")
    from moeflow.moe.layout import ExpertLayout

    with pytest.raises(ValueError, match=r"Valid expert-group sizes for these sizes: \[1, 2, 4"):
        ExpertLayout.canonical(2, 12, 3)
    with pytest.raises(ValueError, match=r"quotient \(5\) divides F"):
        ExpertLayout.canonical(2, 12, 10)
    with pytest.raises(ValueError, match=r"E must be a multiple of ep"):
        ExpertLayout.canonical(6, 12, 4)
