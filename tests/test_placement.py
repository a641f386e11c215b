"""Placement: scoring, baselines, the ILP against brute force, statistics, and bad input."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest
import torch

from moeflow.parallel import RoutingStats
from moeflow.placement import (
    Placement,
    PlacementConfig,
    RoutingTrace,
    contiguous,
    evaluate,
    greedy,
    plan,
    round_robin,
    synthetic_trace,
)
from moeflow.placement import solver as solver_module
from moeflow.placement.baselines import replica_counts


def random_trace(experts: int, layers: int, seed: int) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    loads = rng.integers(1, 100, size=(layers, experts)).astype(float)
    co = rng.integers(0, 30, size=(layers - 1, experts, experts)).astype(float)
    return RoutingTrace(loads, co)


def all_partitions(experts: int, ranks: int, slots: int) -> np.ndarray:
    """Every assignment of `experts` to `ranks` with exactly `slots` each: `[P, experts]`."""
    out = []

    def fill(e: int, counts: list[int], current: list[int]) -> None:
        if e == experts:
            out.append(list(current))
            return
        for g in range(ranks):
            if counts[g] < slots:
                counts[g] += 1
                current.append(g)
                fill(e + 1, counts, current)
                current.pop()
                counts[g] -= 1

    fill(0, [0] * ranks, [])
    return np.array(out)


def brute_force(trace: RoutingTrace, cfg: PlacementConfig, bounds: list[float | None]) -> float:
    """The best objective over every placement of a 1- or 2-layer trace (no replicas)."""
    e, r = trace.num_experts, cfg.num_ranks
    rank_of = all_partitions(e, r, e // r)  # [P, E]
    onehot = np.eye(r)[rank_of]  # [P, E, R]
    max_load = np.einsum("e,per->pr", trace.loads[0], onehot).max(axis=1)
    best0 = np.where(max_load <= (bounds[0] or np.inf) + 1e-9, max_load, np.inf)
    if trace.num_layers == 1:
        return float(best0.min())
    max1 = np.einsum("e,per->pr", trace.loads[1], onehot).max(axis=1)
    max1 = np.where(max1 <= (bounds[1] or np.inf) + 1e-9, max1, np.inf)
    rpn = cfg.ranks_per_node or r
    node_hot = onehot.reshape(len(rank_of), e, r // rpn, rpn).sum(axis=3)  # [P, E, N]
    d = trace.co_routing[0]
    total = d.sum()
    best = np.inf
    for p in range(len(rank_of)):
        if not np.isfinite(best0[p]):
            continue
        same_rank = np.einsum("ij,ig,qjg->q", d, onehot[p], onehot)
        same_node = np.einsum("ij,in,qjn->q", d, node_hot[p], node_hot)
        cross_rank, cross_node = total - same_rank, total - same_node
        traffic = (cross_rank - cross_node) + cfg.node_weight * cross_node
        best = min(best, float((best0[p] + max1 + cfg.traffic_weight * traffic).min()))
    return best


def greedy_bounds(trace: RoutingTrace, cfg: PlacementConfig) -> list[float | None]:
    if cfg.balance_slack is None:
        return [None] * trace.num_layers
    g = evaluate(trace, greedy(trace, cfg), cfg)
    return [m * (1 + cfg.balance_slack) for m in g.max_load]


# -- scoring and baselines -------------------------------------------------------------------------
def test_evaluate_counts_loads_and_crossings_by_hand():
    loads = np.array([[4.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 7.0]])
    co = np.zeros((1, 4, 4))
    co[0, 0, 3] = 10.0  # expert 0 (rank 0) -> expert 3 (rank 1): crosses ranks and nodes
    co[0, 1, 0] = 5.0  # expert 1 (rank 0) -> expert 0 (rank 0): stays
    trace = RoutingTrace(loads, co)
    cfg = PlacementConfig(num_ranks=2, ranks_per_node=1, traffic_weight=0.5, node_weight=3.0)
    m = evaluate(trace, Placement([[[0, 1], [2, 3]], [[0, 1], [2, 3]]]), cfg)
    assert m.max_load == [5.0, 8.0]
    assert m.mean_load == [5.0, 5.0]
    assert (m.cross_rank, m.cross_node, m.co_tokens) == (10.0, 10.0, 15.0)
    assert m.objective == pytest.approx(13.0 + 0.5 * 3.0 * 10.0)
    # A replicated expert splits its load and its traffic evenly over its copies.
    cfg2 = PlacementConfig(num_ranks=2, slots_per_rank=3, num_slots=5, traffic_weight=0.5)
    m2 = evaluate(trace, Placement([[[0, 1, 3], [2, 3]], [[0, 1, 3], [2, 3]]]), cfg2)
    assert m2.max_load == [6.5, 5.5]
    assert m2.cross_rank == pytest.approx(5.0)  # half of expert 3's copies sit with expert 0


def test_replica_counts_follow_eplb_and_greedy_balances():
    assert replica_counts(np.array([9.0, 1.0, 4.0]), 5, 4).tolist() == [3, 1, 1]
    assert replica_counts(np.array([9.0, 1.0]), 4, 2).tolist() == [2, 2]  # one copy per rank
    trace = RoutingTrace(np.array([[12.0, 1.0, 1.0, 1.0, 1.0, 1.0]]), np.zeros((0, 6, 6)))
    three = PlacementConfig(num_ranks=3)
    plain = evaluate(trace, greedy(trace, three), three)
    cfg = PlacementConfig(num_ranks=3, slots_per_rank=3, num_slots=8)
    replicated = plan(trace, cfg, "greedy")
    assert plain.max_load == [13.0]
    assert replicated.metrics.max_load == [6.0]  # expert 0 on all 3 ranks: 4 + 2 each
    assert replicated.placement.replica_counts(0, 6).tolist() == [3, 1, 1, 1, 1, 1]


def test_baselines_are_valid_placements():
    trace = synthetic_trace(16, num_layers=3, tokens=4000, seed=3)
    cfg = PlacementConfig(num_ranks=4, ranks_per_node=2)
    for build in (contiguous, round_robin, greedy):
        placement = build(trace, cfg)
        placement.validate(trace, cfg)
        assert all(len(ids) == 4 for ids in placement.layers[0])
    assert contiguous(trace, cfg).expert_map(0) == list(range(16))
    assert round_robin(trace, cfg).layers[0][1] == [1, 5, 9, 13]
    # Greedy never packs worse than contiguous blocks on balance.
    for layer in range(3):
        g = evaluate(trace, greedy(trace, cfg), cfg).max_load[layer]
        assert g <= evaluate(trace, contiguous(trace, cfg), cfg).max_load[layer]


def test_expert_map_round_trip():
    p = Placement([[[3, 0], [1, 2]]])
    assert p.expert_map(0) == [1, 2, 3, 0]
    assert Placement.from_expert_maps([p.expert_map(0)], 2).layers == p.layers
    with pytest.raises(ValueError, match="replicas or unequal"):
        Placement([[[0, 1], [1, 2]]]).expert_map(0)


# -- the ILP ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_ilp_equals_brute_force_on_one_layer(solver):
    trace = random_trace(8, 1, seed=11)
    # It solves in well under a second; the default 5 s budget (a third of it for the per-layer
    # pass) once ran out on a loaded CI machine, so give it room: optimality is what is tested.
    cfg = PlacementConfig(num_ranks=4, solver=solver, balance_slack=None, time_limit_s=60)
    result = plan(trace, cfg, "ilp")
    assert result.status == "optimal"
    assert result.metrics.objective == pytest.approx(brute_force(trace, cfg, [None]))


@pytest.mark.parametrize(
    "seed, rpn, slack", [(0, None, None), (1, 2, 0.1), (2, 2, 0.05), (3, 1, 0.0)]
)
def test_joint_ilp_equals_brute_force_on_two_layers(seed, rpn, slack):
    # 8 experts x 4 ranks x 2 layers: 2,520^2 placements. Every co-routing pair is in the model
    # (max_pairs_per_expert = 8), so the ILP's optimum is the true one.
    trace = random_trace(8, 2, seed=seed)
    cfg = PlacementConfig(
        num_ranks=4, ranks_per_node=rpn, traffic_weight=0.3, node_weight=2.5,
        balance_slack=slack, max_pairs_per_expert=8, decompose="none", time_limit_s=60,
    )  # fmt: skip
    result = plan(trace, cfg, "ilp")
    assert result.status == "optimal" and result.decomposition == "joint"
    expected = brute_force(trace, cfg, greedy_bounds(trace, cfg))
    assert result.metrics.objective == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "experts, ranks, rpn, layers, num_slots, decompose",
    [(16, 4, 2, 3, None, "auto"), (32, 8, 4, 4, None, "layer"), (16, 4, None, 2, 20, "none"),
     (24, 6, 3, 3, 30, "layer")],
)  # fmt: skip
def test_ilp_is_never_worse_than_greedy(experts, ranks, rpn, layers, num_slots, decompose):
    for seed in range(2):
        trace = synthetic_trace(experts, num_layers=layers, tokens=20000, seed=seed)
        cfg = PlacementConfig(
            num_ranks=ranks, ranks_per_node=rpn, num_slots=num_slots,
            slots_per_rank=None if num_slots is None else -(-num_slots // ranks),
            decompose=decompose, time_limit_s=2.0,
        )  # fmt: skip
        g = plan(trace, cfg, "greedy")
        result = plan(trace, cfg, "ilp")
        result.placement.validate(trace, cfg)
        assert result.status in ("optimal", "time_limit")
        assert result.metrics.objective <= g.metrics.objective + 1e-6
        # With 80% cross-layer affinity the ILP co-locates: clearly better than greedy.
        assert result.metrics.objective < 0.99 * g.metrics.objective
        # The load bound holds: within balance_slack of greedy's packing, layer by layer.
        for mine, theirs in zip(result.metrics.max_load, g.metrics.max_load, strict=True):
            assert mine <= theirs * (1 + cfg.balance_slack) + 1e-6


def test_time_limited_ilp_reports_time_limit_not_optimal():
    # PuLP's LpStatus says "Optimal" when the time limit stops HiGHS; the status must not.
    trace = synthetic_trace(64, num_layers=2, tokens=50000, seed=5)
    cfg = PlacementConfig(num_ranks=8, decompose="none", time_limit_s=0.3, max_pairs_per_expert=8)
    result = plan(trace, cfg, "ilp")
    assert result.status == "time_limit"
    # The gap is positive, or unknown when the limit struck before the root LP gave a bound.
    assert result.gap is None or result.gap > 0
    assert result.metrics.objective <= plan(trace, cfg, "greedy").metrics.objective + 1e-6


def test_missing_solver_falls_back_to_greedy_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(solver_module, "available_solvers", lambda: [])
    trace = synthetic_trace(8, num_layers=2, tokens=2000)
    with caplog.at_level(logging.WARNING, logger="moeflow.placement"):
        result = plan(trace, PlacementConfig(num_ranks=4), "ilp")
    assert result.status == "greedy_fallback"
    assert result.placement.layers == greedy(trace, PlacementConfig(num_ranks=4)).layers
    assert "no ILP solver" in caplog.text and "greedy" in caplog.text
    with pytest.raises(solver_module.SolverUnavailableError, match="pip install highspy"):
        plan(trace, PlacementConfig(num_ranks=4, solver="highs"), "ilp")


# -- bad input -------------------------------------------------------------------------------------
def test_bad_problems_raise_clear_errors():
    trace = synthetic_trace(8, num_layers=2, tokens=1000)
    with pytest.raises(ValueError, match=r"more experts than slots: 8 experts .* 6 slots"):
        plan(trace, PlacementConfig(num_ranks=3, slots_per_rank=2), "greedy")
    with pytest.raises(ValueError, match=r"num_slots \(6\) is below the expert count \(8\)"):
        plan(trace, PlacementConfig(num_ranks=4, slots_per_rank=2, num_slots=6), "ilp")
    with pytest.raises(ValueError, match="do not split evenly over 3 ranks"):
        plan(trace, PlacementConfig(num_ranks=3), "greedy")
    with pytest.raises(ValueError, match=r"ranks_per_node \(3\) must divide num_ranks \(4\)"):
        PlacementConfig(num_ranks=4, ranks_per_node=3)
    with pytest.raises(ValueError, match=r"placement\.solver"):
        PlacementConfig(num_ranks=4, solver="gurobi")
    with pytest.raises(ValueError, match="method 'best' must be one of"):
        plan(trace, PlacementConfig(num_ranks=4), "best")


def test_bad_statistics_raise_clear_errors(tmp_path):
    good = synthetic_trace(4, num_layers=2, tokens=100).to_dict()
    nan = json.loads(json.dumps(good))
    nan["loads"][1][2] = float("nan")
    with pytest.raises(ValueError, match=r"'loads' has a non-finite value \(nan\) at \(1, 2\)"):
        RoutingTrace.from_dict(nan)
    neg = json.loads(json.dumps(good))
    neg["co_routing"][0][1][3] = -4.0
    with pytest.raises(ValueError, match=r"negative count \(-4.0\) at \(0, 1, 3\)"):
        RoutingTrace.from_dict(neg)
    shape = json.loads(json.dumps(good))
    shape["co_routing"] = [[[1.0]]]
    with pytest.raises(ValueError, match="must be \\[layers-1, experts, experts\\]"):
        RoutingTrace.from_dict(shape)
    with pytest.raises(ValueError, match="not a moeflow routing statistics file"):
        RoutingTrace.from_dict({"loads": [[1.0]]})
    bad = tmp_path / "stats.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        RoutingTrace.load(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RoutingTrace.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="all zero"):
        RoutingTrace(np.zeros((1, 4)), np.zeros((0, 4, 4)))


def test_trace_file_round_trip(tmp_path):
    trace = synthetic_trace(8, num_layers=3, tokens=500, seed=2)
    path = trace.save(tmp_path / "routing_stats.json")
    back = RoutingTrace.load(path)
    np.testing.assert_array_equal(back.loads, trace.loads)
    np.testing.assert_array_equal(back.co_routing, trace.co_routing)
    one = RoutingTrace(np.array([[1.0, 2.0]]), np.zeros((0, 2, 2))).save(tmp_path / "one.json")
    assert RoutingTrace.load(one).co_routing.shape == (0, 2, 2)


# -- statistics ------------------------------------------------------------------------------------
def test_routing_stats_count_pairs_and_decay():
    stats = RoutingStats(num_layers=3, num_experts=4, decay=0.5)
    a = torch.tensor([[0, 1], [2, 4]])  # id 4 is a null expert: not FFN work
    b = torch.tensor([[3, 3], [1, 0]])
    c = torch.tensor([[2, 1], [2, 1]])
    stats.observe([a, b, c])
    stats.end_step()
    stats.observe([a, b, c])
    stats.end_step()
    trace = stats.snapshot()
    # Two steps: 0.5 * first + second = 1.5 x one step's counts.
    assert trace.loads[0].tolist() == [1.5, 1.5, 1.5, 0.0]
    assert trace.loads[1].tolist() == [1.5, 1.5, 0.0, 3.0]
    expected = np.zeros((4, 4))
    for t in range(2):
        for i in a[t].tolist():
            for j in b[t].tolist():
                if i < 4:
                    expected[i, j] += 1.5 / 2
    np.testing.assert_allclose(trace.co_routing[0], expected)
    # Each FFN pair of layer l is split over the token's K experts in layer l+1.
    np.testing.assert_allclose(trace.co_routing[1].sum(axis=1), trace.loads[1])


def test_stats_match_a_per_token_reference():
    torch.manual_seed(0)
    ids = [torch.randint(0, 6, (50, 2)) for _ in range(3)]
    stats = RoutingStats(num_layers=3, num_experts=6, decay=1.0)
    stats.observe(ids)
    stats.end_step()
    trace = stats.snapshot()
    ref = np.zeros((2, 6, 6))
    for layer in range(2):
        for t in range(50):
            for i, j in itertools.product(ids[layer][t].tolist(), ids[layer + 1][t].tolist()):
                ref[layer, i, j] += 0.5
    np.testing.assert_allclose(trace.co_routing, ref)
