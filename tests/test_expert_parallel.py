"""Expert parallelism on gloo ranks against the single-process layer: outputs and every gradient."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.moe.dispatch_config import DispatchConfig
from moeflow.parallel import ParallelDims, parallelize
from tests.covering import covering_cases
from tests.distributed import run_on_ranks
from tests.ep_reference import parallel_and_reference_step

D, E = 8, 8


class Net(nn.Module):
    """A dense layer, two MoE layers and a dense head: dense and expert gradients both matter."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.pre = nn.Linear(D, D, bias=False)
        self.moe1 = MoELayer(cfg)
        self.moe2 = MoELayer(cfg)
        self.post = nn.Linear(D, D, bias=False)

    def forward(self, x):
        h = self.pre(x)
        h = h + self.moe1(h)
        h = h + self.moe2(h)
        return self.post(h)


def build(cfg: MoEConfig, model_cls=Net) -> nn.Module:
    torch.manual_seed(0)
    model = model_cls(cfg).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoELayer):
                m.router.weight.normal_(0.0, 1.0)  # varied routing
    return model


def replicated_slots(ep: int, replicas: int, seed: int) -> list[int]:
    """A random placement of the E experts on `ep` ranks, each rank holding `replicas` more
    copies of experts it does not hold yet."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(E, generator=gen).tolist()
    own = E // ep
    slots = []
    for g in range(ep):
        block = order[g * own : (g + 1) * own]
        others = [e for e in torch.randperm(E, generator=gen).tolist() if e not in block]
        slots += block + others[:replicas]
    return slots


def check_case(ctx, case: dict, shards: list[int]) -> None:
    """Run one configuration on this rank and compare with the single-process model."""
    world, rank = ctx.world_size, ctx.rank
    cfg = MoEConfig(
        hidden_size=D,
        num_experts=E,
        ffn_hidden_size=case.get("ffn", 12),
        shared_expert_ffn_hidden_size=case.get("shared", 0),
        shared_expert_gate=case.get("shared_gate", False),
        ffn_bias=case.get("bias", False),
        activation=case.get("act", "swiglu"),
        a2a_dim=case.get("a2a_dim"),
        router=RouterConfig(
            top_k=case["top_k"],
            capacity_factor=case.get("capacity_factor"),
            drop_policy=case.get("drop_policy", "probs"),
            pad_to_capacity=case.get("pad", False),
            z_loss_coeff=1e-3,
        ),
    )
    ref, par = build(cfg), build(cfg)
    slots = None
    if case.get("permuted_map"):
        gen = torch.Generator().manual_seed(7)
        slots = {name: torch.randperm(E, generator=gen).tolist() for name in ("moe1", "moe2")}
    dispatch = DispatchConfig(
        overlap_degree=case.get("overlap", 1),
        two_level=case.get("two_level", False),
        ranks_per_node=case.get("ranks_per_node"),
    )
    replicas = case.get("replicas", 0) if ctx.dims.ep > 1 else 0
    if replicas:
        slots = {name: replicated_slots(ctx.dims.ep, replicas, seed) for seed, name in
                 enumerate(("moe1", "moe2"))}  # fmt: skip
    if ctx.dims.ep in case.get("slots", {}):  # a placement given slot by slot, at this ep
        slots = dict.fromkeys(("moe1", "moe2"), case["slots"][ctx.dims.ep])
    parallelize(par, ctx, dispatch, expert_slots=slots)
    if replicas:
        assert len(par.moe1.local_expert_ids) == E // ctx.dims.ep + replicas

    if case.get("pad"):  # padded buffers have static sizes: the same tokens on every rank
        shards = [shards[0]] * world
    gen = torch.Generator().manual_seed(100)
    xs = [torch.randn(n, D, dtype=torch.float64, generator=gen) for n in shards]
    gs = [torch.randn(n, D, dtype=torch.float64, generator=gen) for n in shards]

    out, x, ref_out, ref_x = parallel_and_reference_step(par, ref, ctx, xs, gs)

    tol = {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(out, ref_out[rank], **tol, msg=lambda m: f"{case} output: {m}")
    torch.testing.assert_close(x.grad, world * ref_x[rank].grad, **tol)
    dense = ["pre.weight", "post.weight", "moe1.router.weight", "moe2.router.weight"]
    dense += [n for n, _ in par.named_parameters() if ".shared_expert." in n]
    for name in dense:
        torch.testing.assert_close(
            par.get_parameter(name).grad,
            ref.get_parameter(name).grad,
            **tol,
            msg=lambda m, name=name: f"{case} {name}: {m}",
        )
    for layer in ("moe1", "moe2"):
        mine = getattr(par, layer).local_experts
        for w in ("w1", "w2"):
            got = getattr(getattr(par, layer).experts, w).grad
            want = getattr(getattr(ref, layer).experts, w).grad[mine]
            label = f"{case} {layer}.{w}"
            torch.testing.assert_close(got, want, **tol, msg=lambda m, label=label: f"{label}: {m}")


CASES = [
    {"top_k": 1},
    {"top_k": 2},
    {"top_k": 2, "overlap": 2},
    {"top_k": 2, "overlap": 4},
    {"top_k": 1, "capacity_factor": 1.0},
    {"top_k": 2, "capacity_factor": 0.75, "drop_policy": "position", "overlap": 2},
    {"top_k": 2, "capacity_factor": 1.25, "permuted_map": True},
    {"top_k": 2, "two_level": True, "ranks_per_node": 2, "overlap": 2},
    {"top_k": 1, "two_level": True, "ranks_per_node": 1, "capacity_factor": 1.0},
    # Replicated experts: tokens go to the local copy or are spread over the copies; the copies'
    # gradients are summed by GradSync, so each equals the expert's single-process gradient.
    {"top_k": 2, "replicas": 1},
    {"top_k": 2, "replicas": 2, "overlap": 2, "capacity_factor": 1.25},
    # A rank holding no copy of a replicated expert (experts 1 and 2 have three copies, rank 0
    # none), as the least-loaded packer places them: it still joins the replicas' gradient sum.
    {"top_k": 2, "slots": {4: [4, 0, 3, 1, 2, 5, 1, 2, 6, 1, 2, 7]}},
    # Shared experts (dense, beside the routed ones), computed while the tokens travel.
    {"top_k": 2, "shared": 10, "overlap": 2},
    {"top_k": 1, "shared": 6, "shared_gate": True, "capacity_factor": 1.0},
    # F <= D: the router weights travel with the rows and the experts apply them (F > D above:
    # the combine applies them).
    {"top_k": 2, "ffn": 8, "overlap": 2},
    {"top_k": 2, "ffn": 6, "capacity_factor": 0.75, "drop_policy": "position", "replicas": 1},
    {"top_k": 1, "ffn": 4, "two_level": True, "ranks_per_node": 2, "capacity_factor": 1.0},
    # Buffers padded to capacity, with expert biases and GELU, in both weightings (the padded
    # layer against the reference itself: tests/test_layer_reference.py).
    {"top_k": 2, "capacity_factor": 1.0, "pad": True, "bias": True, "act": "gelu"},
    {"top_k": 2, "ffn": 6, "capacity_factor": 1.0, "pad": True, "bias": True, "act": "gelu"},
]


# Beyond the cases above, chosen one by one: every two option values together at 4 ranks, every
# three at 2 (a fixed-seed covering array, `tests/covering.py`), so a bug that needs a combination
# nobody thought of (padding with biases and F > D was one) meets the single-process model.
COMBINED_AXES = {
    "top_k": [1, 2, 3],
    "ffn": [12, 6],  # router weights applied in the combine / carried with the rows
    "capacity_factor": [None, 0.75, 1.25],
    "drop_policy": ["probs", "position"],
    "pad": [False, True],
    "overlap": [1, 2],
    "two_level": [False, True],
    "replicas": [0, 1],
    "shared": [0, 6],
    "bias": [False, True],
    "act": ["swiglu", "gelu"],
    "a2a_dim": [None, 4],
}


def _valid_combined(case: dict) -> bool:
    if case["capacity_factor"] is None:  # padding needs a capacity; the policy only ranks drops
        return not case["pad"] and case["drop_policy"] == "probs"
    return not (case["pad"] and case["overlap"] > 1)  # padding needs one chunk


@functools.cache
def combined_cases(world: int) -> list[dict]:
    """Computed in the test process only (the ranks get the cases as arguments)."""
    cases = covering_cases(COMBINED_AXES, _valid_combined, strength=2 if world >= 4 else 3)
    return [{**c, "ranks_per_node": 2 if c["two_level"] else None} for c in cases]


def _equivalence(rank, world, layouts, cases, shards):
    """Every case at every `(dp, ep)` of this world size, in one spawn of ranks."""
    done = {}
    for dp, ep in layouts:
        ctx = ParallelDims(dp=dp, ep=ep).build()
        for case in cases:
            check_case(ctx, case, shards)
        done[(dp, ep)] = len(cases)
    return done


# (dp, ep) layouts per world size.
LAYOUTS = {1: [(1, 1)], 2: [(1, 2), (2, 1)], 4: [(1, 4), (2, 2)]}


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_matches_single_process(world):
    shards = [12 + 3 * r for r in range(world)]  # uneven token counts per rank
    layouts = LAYOUTS[world]
    cases = CASES + combined_cases(world)
    results = run_on_ranks(_equivalence, world, args=(layouts, cases, shards))
    assert results == [dict.fromkeys(layouts, len(cases))] * world


def _flat_vs_two_level(rank, world):
    """The same step with the flat and the two-level all-to-all: bitwise identical."""
    ctx = ParallelDims(ep=world).build()
    cfg = MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=12, router=RouterConfig(top_k=2))
    results = []
    for dispatch in (
        DispatchConfig(),
        DispatchConfig(two_level=True, ranks_per_node=2),
        DispatchConfig(two_level=True, ranks_per_node=1),
        DispatchConfig(ranks_per_node=2),  # flat by default, two-level chosen per call below
    ):
        model = parallelize(build(cfg), ctx, dispatch)
        if not dispatch.two_level and dispatch.ranks_per_node:
            for m in model.modules():
                if isinstance(m, MoELayer):
                    m.expert_dispatch.config = DispatchConfig(mode="sharded")  # per call below
                    m.forward = functools.partial(m.forward, mode="ep", two_level=True)
        x = torch.randn(
            20 + rank, D, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)
        )
        x.requires_grad_(True)
        model(x).square().sum().backward()
        moe = [m.expert_dispatch for m in model.modules() if isinstance(m, MoELayer)]
        assert all(d.last_two_level == (dispatch.ranks_per_node is not None) for d in moe)
        results.append([model(x.detach()), x.grad] + [p.grad for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
    return True


def test_two_level_all_to_all_is_bitwise_identical_to_flat():
    """Also chosen per call on a layer built flat (the runtime tuner's switch)."""
    assert run_on_ranks(_flat_vs_two_level, 4) == [True] * 4


def _two_level_needs_nodes(rank, world):
    ctx = ParallelDims(ep=world).build()
    layer = parallelize(MoELayer(MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=12)), ctx)
    assert layer.expert_dispatch.two_level_exchange is None  # no node size known: flat only
    with pytest.raises(ValueError, match="two_level=True needs nodes that split the expert group"):
        layer(torch.randn(4, D), two_level=True)
    return True


def test_two_level_per_call_without_nodes_is_refused_on_every_rank():
    assert run_on_ranks(_two_level_needs_nodes, 2) == [True] * 2
