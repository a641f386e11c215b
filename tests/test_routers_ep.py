"""Every router under expert parallelism (ep = 2, 4 on gloo) against the single process, and the
all-to-all byte counter: null and zero-computation pairs never leave their rank."""

from __future__ import annotations

import pytest
import torch

from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.comm.capacity import capacity_keep_mask, expert_capacity
from moeflow.moe.walk import finish_optimizer_step
from moeflow.parallel import ParallelDims, parallelize
from tests.covering import covering_cases
from tests.distributed import run_on_ranks
from tests.ep_reference import build_router_net as build
from tests.ep_reference import parallel_and_reference_step
from tests.router_kinds import router_kinds

D, E = 8, 8
ROUTERS = {
    "topk": RouterConfig(top_k=2),
    "null": RouterConfig(type="null", num_null_experts=8, top_k=3),
    "moepp": RouterConfig(
        type="moepp", zero_experts=2, copy_experts=1, constant_experts=1, zc_tau=0.75, top_k=2
    ),
    "rmoe": RouterConfig(type="rmoe", rnn_dim=6, top_k=2),
    "null-capacity": RouterConfig(type="null", num_null_experts=4, top_k=2, capacity_factor=1.0),
}


def remote_ffn_pairs(layer: MoELayer, x_TD: torch.Tensor, ep_index: int, ep: int) -> int:
    """(token, slot) pairs of kept FFN experts held by another rank, recomputed from the router."""
    with torch.no_grad():
        route = layer.router(x_TD)
    ids = route.expert_ids_TK
    n = layer.config.num_experts
    keep = ids < n
    rc = layer.config.router
    if rc.capacity_factor is not None:  # non-FFN pairs in a bucket of their own (id n)
        cap = expert_capacity(ids.shape[0], n, rc.top_k, rc.capacity_factor)
        keep = keep & capacity_keep_mask(
            torch.where(keep, ids, n), route.weights_TK, n + 1, cap, rc.drop_policy
        )
    owner = layer.expert_map[ids.clamp(max=n - 1)] // (n // ep)
    return int((keep & (owner != ep_index)).sum())


def _check(rank, world, cases, shards):
    """`cases`: `(name, MoEConfig, overlap degree)`; each model against the single process."""
    ctx = ParallelDims(ep=world).build()
    checked = {}
    for name, cfg, overlap in cases:
        ref, par = build(cfg), build(cfg)
        par.overlap = overlap
        parallelize(par, ctx)
        gen = torch.Generator().manual_seed(5)
        xs = [torch.randn(n, D, dtype=torch.float64, generator=gen) for n in shards]
        gs = [torch.randn(n, D, dtype=torch.float64, generator=gen) for n in shards]
        seen = {}

        def grab(module, args, seen=seen):
            seen["x"] = args[0].detach()  # returns None: the input is left as it is

        par.moe1.register_forward_pre_hook(grab)
        out, x, ref_out, ref_x = parallel_and_reference_step(par, ref, ctx, xs, gs)
        tol = {"rtol": 1e-9, "atol": 1e-11}
        torch.testing.assert_close(
            out, ref_out[rank], **tol, msg=lambda m, name=name: f"{name}: {m}"
        )
        torch.testing.assert_close(x.grad, world * ref_x[rank].grad, **tol)
        expert_names = {f"{layer}.experts.{w}" for layer in ("moe1", "moe2") for w in ("w1", "w2")}
        for pname, p in par.named_parameters():
            want = ref.get_parameter(pname).grad
            if want is None:  # unused (moe1's gating residual has no previous layer): GradSync
                want = torch.zeros_like(ref.get_parameter(pname))  # gives zeros
            if pname in expert_names:
                want = want[par.get_submodule(pname.split(".")[0]).local_experts]
            torch.testing.assert_close(
                p.grad, want, **tol, msg=lambda m, n=pname, name=name: f"{name} {n}"
            )
        # The byte counter: only kept FFN pairs bound for another rank cross the wire, each as
        # its expert-dim row (D, or a2a_dim) plus the router weight where the experts apply it.
        layer = par.moe1
        pairs = remote_ffn_pairs(layer, seen["x"], ctx.ep_index, world)
        width = cfg.expert_dim + (cfg.ffn_hidden_size <= cfg.expert_dim)
        sent = layer.last_stats.traffic.sent_bytes
        assert sent == pairs * width * 8, (name, sent, pairs, width)
        routed = layer.last_stats.routed_per_choice
        checked[name] = (pairs, int(routed[E:].sum()), int(routed.sum()))
        finish_optimizer_step(par)
    return checked


@pytest.mark.parametrize("ep", [2, 4])
def test_routers_match_single_process_under_ep(ep):
    shards = [10 + 3 * r for r in range(ep)]
    cases = [(name, MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=12, router=rc), 1)
             for name, rc in ROUTERS.items()]  # fmt: skip
    results = run_on_ranks(_check, ep, args=(cases, shards), timeout=300)
    for name in ("null", "moepp"):
        assert all(r[name][1] > 0 for r in results), "no pair went to a null/zc expert"


def _global_batch(rank, world, micro_batches):
    """2 ranks x 2 micro-batches with global-batch balancing: f from all ranks' counts so far."""
    ctx = ParallelDims(dp=world, ep=1).build()
    cfg = MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=12,
                    router=RouterConfig(top_k=2, aux_loss_type="global_aux_loss"))  # fmt: skip
    torch.manual_seed(0)
    layer = MoELayer(cfg).double()
    with torch.no_grad():
        layer.router.weight.normal_()
    parallelize(layer, ctx)
    losses = []
    for xs in micro_batches:
        out = layer(xs[rank])
        out.sum().backward()
        losses.append(layer.last_stats.aux_loss.item())
    finish_optimizer_step(layer)
    return losses, layer.balance.running_counts.sum().item()


def test_global_batch_balancing_matches_the_concatenated_batch():
    gen = torch.Generator().manual_seed(3)
    # micro[m][rank]: micro-batch m of each rank
    micro = [[torch.randn(16, D, dtype=torch.float64, generator=gen) for _ in range(2)]
             for _ in range(2)]  # fmt: skip
    results = run_on_ranks(_global_batch, 2, args=(micro,))
    # Reference: one process sees the global batch, micro-batch by micro-batch.
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=12, router=RouterConfig(top_k=2))
    ref = MoELayer(cfg).double()
    with torch.no_grad():
        ref.router.weight.normal_()
    counts = torch.zeros(E, dtype=torch.float64)
    for m in range(2):
        both = torch.cat(micro[m])  # every rank's micro-batch m, concatenated
        with torch.no_grad():
            route = ref.router(both)
        counts += torch.bincount(route.expert_ids_TK.reshape(-1), minlength=E)
        f = counts / counts.sum()
        for rank in range(2):
            with torch.no_grad():
                p_mine = ref.router(micro[m][rank]).scores_TE.mean(0)
            want = E * (f * p_mine).sum().item()
            assert results[rank][0][m] == pytest.approx(want, rel=1e-12)
    # The step's last micro-batch uses the counts of the whole global batch (4 micro-batches).
    everything = torch.cat([torch.cat(mb) for mb in micro])
    with torch.no_grad():
        route = ref.router(everything)
    global_f = torch.bincount(route.expert_ids_TK.reshape(-1), minlength=E) / (2 * len(everything))
    torch.testing.assert_close(f, global_f.double())
    mean_last = sum(results[r][0][1] for r in range(2)) / 2
    p_last = ref.router(torch.cat(micro[1])).scores_TE.mean(0).detach()
    assert mean_last == pytest.approx(E * (global_f.double() * p_last).sum().item(), rel=1e-12)
    assert [r[1] for r in results] == [0.0, 0.0]  # reset at the optimizer step


# Every router with the layer's other options against the single process, byte counter included:
# every three values together at ep = 2, every two at ep = 4 (fixed-seed covering arrays,
# `tests/covering.py`).
ROUTER_KINDS = router_kinds("topk", "null", "moepp", "rmoe", "seq-aux-z", "sigmoid")
OPTION_AXES = {
    "router": list(ROUTER_KINDS),
    "top_k": [1, 2, 3],
    "ffn": [12, 6],  # router weights applied in the combine / carried with the rows
    "capacity": [None, 1.0],
    "overlap": [1, 2],
    "shared": [0, 6],
    "a2a_dim": [None, 4],
    "act": ["swiglu", "gelu"],
    "bias": [False, True],
}


def option_cases(strength: int) -> list[tuple[str, MoEConfig, int]]:
    cases = []
    for c in covering_cases(OPTION_AXES, strength=strength):
        rc = RouterConfig(top_k=c["top_k"], capacity_factor=c["capacity"],
                          **ROUTER_KINDS[c["router"]])  # fmt: skip
        cfg = MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=c["ffn"],
                        shared_expert_ffn_hidden_size=c["shared"], a2a_dim=c["a2a_dim"],
                        activation=c["act"], ffn_bias=c["bias"], router=rc)  # fmt: skip
        cases.append(("-".join(f"{k}={v}" for k, v in c.items()), cfg, c["overlap"]))
    return cases


@pytest.mark.parametrize(("ep", "strength"), [(2, 3), (4, 2)])
def test_router_options_match_single_process_under_ep(ep, strength):
    cases = option_cases(strength)
    shards = [10 + 3 * r for r in range(ep)]
    results = run_on_ranks(_check, ep, args=(cases, shards), timeout=600)
    assert all(len(r) == len(cases) for r in results)
    # The array is not vacuous: pairs crossed ranks, and some went to null/zero-computation experts.
    assert sum(r[name][0] for r in results for name, _, _ in cases) > 0
    assert any(r[name][1] > 0 for r in results for name, _, _ in cases)
