"""The cost model of a layer call and `moeflow simulate`: hand-computed figures, the candidates it
offers, monotonicity (more bandwidth, more GEMM rate or less latency never makes a candidate
slower), and the simulator's table."""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys

import pytest

from moeflow.parallel.cost_model import (
    PRESETS,
    Candidate,
    Hardware,
    LayerShape,
    Link,
    all_to_all_seconds,
    candidates,
    predict,
    predict_all,
    ring_seconds,
    scaled,
)

TOY = Hardware(
    name="toy", gemm_flops=1e12, half_rows=0.0, bytes_per_element=2,
    intra=Link(bandwidth=1e9, alpha=1e-5, alpha_peer=1e-6),
    inter=Link(bandwidth=1e8, alpha=1e-4, alpha_peer=1e-5),
)  # fmt: skip


def test_hand_computed_ep_and_dp_on_one_node():
    shape = LayerShape(tokens=100, hidden=4, ffn=8, experts=4, top_k=2, group=4, gate_blocks=1)
    # ep: 200 rows x 6*4*8*2 FLOPs = 76,800 FLOPs at 1e12 FLOP/s.
    ep = predict(shape, Candidate("ep"), TOY, ranks_per_node=4)
    assert ep.compute_s == pytest.approx(76_800 / 1e12)
    # 4 all-to-alls of 200*4*2 = 1600 bytes per rank, 3/4 of it off-rank, inside one node.
    a2a = 1e-5 + 3 * 1e-6 + 1600 * 3 / 4 / 1e9
    assert ep.tokens_s == pytest.approx(4 * a2a)
    assert ep.seconds == pytest.approx(max(ep.compute_s, 4 * a2a) + min(ep.compute_s, 4 * a2a))
    assert ep.token_bytes == 4 * 1600 and ep.weights_s == 0.0
    # dp: each rank holds one expert: (1+1) * 8 * 4 * 2 = 128 bytes; 2 gathers + 1 reduce-scatter.
    dp = predict(shape, Candidate("dp"), TOY, ranks_per_node=4)
    assert dp.weights_s == pytest.approx(3 * 3 * (1e-5 + 128 / 1e9))
    assert dp.seconds == pytest.approx(dp.compute_s + dp.weights_s)
    assert dp.tokens_s == 0.0


def test_two_level_all_to_all_and_rings_across_nodes():
    # 16 ranks on 4 nodes of 4: flat sends 3/16 of m inside the node and 12/16 across.
    m = 1.6e6
    flat = all_to_all_seconds(m, 16, 4, TOY)
    assert flat == pytest.approx(1e-4 + 3e-6 + 12e-5 + max(m * 3 / 16 / 1e9, m * 12 / 16 / 1e8))
    two = all_to_all_seconds(m, 16, 4, TOY, two_level=True)
    stage1 = 1e-5 + 3e-6 + m * 3 / 4 / 1e9
    stage2 = 1e-4 + 3e-5 + m * 3 / 4 / 1e8
    assert two == pytest.approx(stage1 + stage2)
    assert ring_seconds(1000, 8, True, TOY) == pytest.approx(7 * (1e-4 + 1000 / 1e8))
    assert ring_seconds(1000, 1, True, TOY) == 0.0


def test_candidates_offer_what_differs():
    one_node = LayerShape(tokens=64, hidden=8, ffn=16, experts=8, top_k=2, group=4)
    labels = [c.label() for c in candidates(one_node, ranks_per_node=8)]
    assert labels == ["dp", "ep", "ep/n2", "ep/n4"]  # S = 1: sharded is ep; one node: no 2dh
    sliced = LayerShape(tokens=64, hidden=8, ffn=16, experts=2, top_k=2, group=16)
    labels = [c.label() for c in candidates(sliced, ranks_per_node=8)]
    assert "sharded/n2/2dh" in labels and "ep/2dh" in labels and labels[0] == "dp"
    alone = LayerShape(tokens=64, hidden=8, ffn=16, experts=2, top_k=2, group=1)
    assert [c.label() for c in candidates(alone, ranks_per_node=8)] == ["ep"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_more_bandwidth_or_flops_and_less_latency_never_make_a_candidate_slower(preset):
    hw = PRESETS[preset]
    shapes = [
        LayerShape(tokens=t, hidden=1024, ffn=2048, experts=e, top_k=k, group=g, imbalance=rho)
        for t, e, k, g, rho in itertools.product(
            (64, 4096), (8, 64), (1, 8), (8, 64, 512), (1.0, 2.0)
        )
    ]
    faster = [
        scaled(hw, gemm_flops=hw.gemm_flops * 2),
        scaled(hw, intra_bandwidth=hw.intra.bandwidth * 2),
        scaled(hw, inter_bandwidth=hw.inter.bandwidth * 2),
        scaled(hw, intra_alpha=hw.intra.alpha / 2),
        scaled(hw, inter_alpha=hw.inter.alpha / 2),
        scaled(hw, half_rows=hw.half_rows / 2),
    ]
    checked = 0
    for shape in shapes:
        base = {p.candidate: p.seconds for p in predict_all(shape, hw, 8)}
        for better in faster:
            for p in predict_all(shape, better, 8):
                assert p.seconds <= base[p.candidate] * (1 + 1e-12), (shape, p.candidate, better)
                checked += 1
    assert checked > 1000


def test_skew_and_sizes_move_the_choice():
    # Balanced and few tokens: ep. Heavily skewed with many tokens and few experts: dp.
    small = LayerShape(tokens=256, hidden=1024, ffn=1024, experts=8, top_k=2, group=8)
    assert (
        min(predict_all(small, PRESETS["h100"], 8), key=lambda p: p.seconds).candidate.mode == "ep"
    )
    skewed = dataclasses.replace(small, tokens=65536, imbalance=4.0)
    assert (
        min(predict_all(skewed, PRESETS["h100"], 8), key=lambda p: p.seconds).candidate.mode == "dp"
    )


def test_bad_figures_are_refused():
    with pytest.raises(ValueError, match="bandwidth > 0"):
        Link(bandwidth=0.0, alpha=1e-6)
    with pytest.raises(ValueError, match="imbalance"):
        LayerShape(tokens=1, hidden=8, ffn=8, experts=2, top_k=1, group=2, imbalance=0.5)
    with pytest.raises(ValueError, match="cannot be laid out"):
        LayerShape(tokens=1, hidden=8, ffn=8, experts=3, top_k=1, group=2)
    with pytest.raises(ValueError, match=r"--inter-bandwidth \(nan\)"):
        scaled(PRESETS["h100"], inter_bandwidth=math.nan)


def test_simulate_prints_the_choice_at_every_world_size():
    r = subprocess.run(
        [sys.executable, "-m", "moeflow", "simulate", "examples/configs/olmoe_1b7b_64gpu.toml",
         "--world-size", "8", "64", "512", "2048", "--inter-gbps", "25"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "8 GPUs" in lines[1] and "2048 GPUs" in lines[1]
    choice = next(line for line in lines if line.startswith("choice")).split()[1:]
    assert len(choice) == 4 and all(c.startswith(("ep", "dp", "sharded")) for c in choice)
    assert any("/2dh" in c for c in choice[1:])  # across nodes the two-level all-to-all pays
    bad = subprocess.run(
        [sys.executable, "-m", "moeflow", "simulate", "examples/configs/olmoe_1b7b_64gpu.toml",
         "--world-size", "96"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 0 and "96 GPUs: n/a: moe.num_experts (64)" in bad.stdout


def _calibrate(rank, world, out_dir):
    from moeflow.parallel import ParallelDims
    from moeflow.parallel.calibrate import load_or_calibrate

    ctx = ParallelDims(ep=world).build()
    first, measured = load_or_calibrate(ctx, out_dir, hidden=32, ffn=64)
    again, measured_again = load_or_calibrate(ctx, out_dir, hidden=32, ffn=64)
    assert measured and not measured_again and again == first  # the cache, on every rank
    return first


def test_calibration_is_shared_cached_and_reproduced_by_the_simulator(tmp_path):
    from moeflow.launch.simulate import _parser, simulate
    from moeflow.train.config import RunConfig
    from tests.distributed import run_on_ranks

    hws = run_on_ranks(_calibrate, 2, args=(str(tmp_path),))
    hw = hws[0]
    assert hws[1] == hw  # every rank fits the same maxed times
    for figure in (hw.gemm_flops, hw.intra.bandwidth, hw.inter.bandwidth):
        assert math.isfinite(figure) and figure > 0
    assert hw.half_rows >= 0 and hw.intra.alpha >= 0 and hw.bytes_per_element == 4
    # The simulator on the calibration file predicts what the cost model predicts with it.
    cfg = RunConfig.from_toml("examples/configs/tiny_cpu.toml")
    args = _parser().parse_args(
        ["examples/configs/tiny_cpu.toml", "--hardware-file", str(tmp_path / "calibration.json"),
         "--world-size", "2", "4", "--gpus-per-node", "4", "--tokens-per-rank", "512"]
    )  # fmt: skip
    moe = cfg.model.moe
    for world, preds in simulate(args, cfg):
        shape = LayerShape(
            tokens=512, hidden=moe.hidden_size, ffn=moe.ffn_hidden_size,
            experts=moe.num_experts, top_k=moe.router.top_k, group=world,
        )  # fmt: skip
        want = {p.candidate: p.seconds for p in predict_all(shape, hw, 4)}
        assert {p.candidate: p.seconds for p in preds} == want
    (tmp_path / "bad.json").write_text("{}")
    bad = _parser().parse_args(["x.toml", "--hardware-file", str(tmp_path / "bad.json")])
    with pytest.raises(ValueError, match=r"is not a calibration\.json"):
        simulate(bad, cfg)
