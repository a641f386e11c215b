"""The runtime tuner in the trainer on 4 gloo ranks (2 experts, ep = 4: every mode differs): a run
with `mode = "auto"` and `overlap_degree = "auto"` whose decisions change mid-run gives the losses
of a fixed-mode run; every rank holds the same decisions; a candidate one rank cannot run is
dropped on every rank with the reason logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeflow.parallel import tuner as tuner_module
from moeflow.train import checkpoint as ckpt
from moeflow.train.config import RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.trainer import Trainer
from tests.distributed import run_on_ranks


def cfg(out_dir: Path, mode: str, overlap, tuner: dict | None = None, two_level=False) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16,
                      "moe": {"num_experts": 2, "ffn_hidden_size": 32,
                              "router": {"top_k": 1, "aux_loss_type": "aux_loss"}}},
            "data": {"max_bytes": 100_000},
            "train": {"steps": 30, "seq_len": 16, "micro_batch_size": 2, "out_dir": str(out_dir),
                      "eval_windows": 8, "eval_every": 0},
            "optim": {"warmup_steps": 2, "lr": 3e-3},
            # Nodes of 2 ranks: the tuner may also choose the two-level all-to-all.
            "parallel": {"ep": 4, "mode": mode, "overlap_degree": overlap,
                         "two_level": two_level, "ranks_per_node": 2},
            "tuner": {"samples": 1, "warmup": 0, "prune": 100.0, "first_check": 1,
                      **(tuner or {})},
            "metrics": {"progress": False, "plot": False, "log_every": 1},
        }
    )  # fmt: skip


def _train(rank, world, root, mode, overlap, tuner_cfg, scripted, starved_rank, two_level=False):
    runtime = init_distributed(60)
    try:
        run_cfg = cfg(Path(root), mode, overlap, tuner_cfg, two_level)
        # Float64: a decision changes the summation order, and fp32's last bits would grow
        # under AdamW; the claim is that every candidate computes the same math.
        trainer = Trainer(run_cfg, runtime, None, True, torch.float64)
        tuner = trainer.tuner
        if scripted:
            order = scripted
            calls = {"n": 0}

            # A stand-in for the timed replays: the n-th tuning finds order[n] fastest, so the
            # decisions change mid-run, the same on every rank.
            def fake_time(layer, cand):
                return 0.001 if cand.label() == order[calls["n"] % len(order)] else 0.002

            original = tuner._tune

            def counting_tune(*args, **kwargs):
                record = original(*args, **kwargs)
                calls["n"] += 1
                return record

            tuner._time = fake_time
            tuner._tune = counting_tune
        if rank == starved_rank:
            tuner.free_bytes = lambda device: 1.0  # this rank cannot gather any weights
        result = trainer.run(quiet=True)
        records = [r for r in tuner.cache.values()] if tuner else []
        return result.losses, records
    finally:
        shutdown(runtime)


def test_auto_gives_the_fixed_mode_losses_with_decisions_changing_mid_run(tmp_path):
    fixed = run_on_ranks(
        _train, 4, args=(str(tmp_path / "fixed"), "ep", 1, None, None, -1), timeout=300
    )
    order = ["dp", "sharded/n2", "ep/n2/2dh", "sharded/2dh", "ep/n2", "ep"]
    # check_every 5 with 0.01-wide load buckets: the load moves, so layers are re-tuned mid-run.
    auto = run_on_ranks(
        _train, 4,
        args=(str(tmp_path / "auto"), "auto", "auto", {"check_every": 5, "imbalance_step": 0.01},
              order, -1, "auto"),
        timeout=300,
    )  # fmt: skip
    losses, records = auto[0]
    assert losses == pytest.approx(fixed[0][0], rel=1e-12)
    assert all(r[1] == records for r in auto)  # every rank: the same decisions
    choices = {r["choice"] for r in records}
    assert len(records) >= 4 and len(choices) >= 3, records  # re-tuned, decisions changed
    assert any(r["two_level"] for r in records) and not all(r["two_level"] for r in records)
    steps = sorted({r["step"] for r in records})
    assert steps[0] == 1 and steps[-1] > 5
    logged = [
        json.loads(line)
        for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()
        if '"runtime"' in line
    ]
    assert len(logged) == len(records)
    for record in logged:
        assert set(record["measured_ms"]) <= set(record["predicted_ms"])
        assert record["choice"] in record["measured_ms"] and record["reason"]
    assert (tmp_path / "auto" / "calibration.json").is_file()


def test_a_candidate_one_rank_cannot_run_is_dropped_on_every_rank(tmp_path):
    results = run_on_ranks(
        _train, 4,
        args=(str(tmp_path), "auto", 1, {"check_every": 100}, ["dp"], 2),
        timeout=300,
    )  # fmt: skip
    for _, records in results:
        assert records == results[0][1]
        for record in records:
            assert "dp" in record["skipped"] and "ep/n2" not in record["measured_ms"]
            assert "gathered weights" in record["skipped"]["dp"]
            assert record["choice"] != "dp" and "dp" not in record["measured_ms"]


def test_bad_tuner_settings_name_the_field():
    with pytest.raises(ValueError, match=r"tuner\.prune \(0\.5\) must be >= 1"):
        tuner_module.TunerConfig(prune=0.5)
    with pytest.raises(ValueError, match=r"parallel\.overlap_degree \('many'\)"):
        RunConfig.from_dict({"parallel": {"overlap_degree": "many"}})
    with pytest.raises(ValueError, match=r"parallel\.mode \('fast'\) must be one of"):
        RunConfig.from_dict({"parallel": {"mode": "fast"}})


def _replacement(rank, world):
    import torch

    from moeflow import MoEConfig, MoELayer, RouterConfig
    from moeflow.parallel import ParallelDims, parallelize
    from moeflow.parallel.cost_model import PRESETS

    runtime = init_distributed(60)
    try:
        ctx = ParallelDims(ep=world).build()
        cfg = MoEConfig(
            hidden_size=8, num_experts=4, ffn_hidden_size=8, router=RouterConfig(top_k=1)
        )
        torch.manual_seed(0)
        layer = parallelize(MoELayer(cfg), ctx)
        settings = tuner_module.TunerConfig(samples=1, warmup=0, first_check=1, check_every=1)
        tuner = tuner_module.RuntimeTuner(layer, ctx, PRESETS["h100"], settings)
        # Rank 0's tokens choose expert 0, rank 1's expert 3.
        row = layer.router.weight.detach()[3 * rank]
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(rank)) * 0.01 + row * 10
        decided, keys = [], []
        for step, slots in enumerate([(0, 1, 2, 3), (0, 1, 2, 3), (3, 2, 1, 0), (0, 1, 2, 3)], 1):
            if layer.layout.slots != slots:  # a re-placement (the weights stay: not compared)
                layer.set_layout(layer.layout.with_slots(list(slots)))
            layer(x).sum().backward()
            decided.append(len(tuner.after_step(step)))
            keys.append(next(iter(tuner.keys.values())))
        tuner.close()
        return decided, keys
    finally:
        shutdown(runtime)


def test_a_replacement_re_tunes_the_layer():
    """A re-placement that moves the traffic off the ranks' shard groups re-tunes the layer; back
    on the first layout, its decision is reused."""
    results = run_on_ranks(_replacement, 2)
    decided, keys = results[0]
    assert results[1] == results[0]
    assert decided == [1, 0, 1, 0], keys
    assert keys[0][2] == 0.0 and keys[2][2] == 1.0  # off-group share: none, then all


def _reproduce(rank, world, root):
    """Three runs of the same auto config in one process group: A with noisy stand-in timings
    and a checkpoint every 10 steps; B with other noise, replaying A's decisions; C resuming A's
    step-10 checkpoint (decisions restored) and replaying A; D with other noise and no replay; E
    replaying A with another train.seed (refused before any work)."""
    import random

    root = Path(root)
    runtime = init_distributed(60)

    def run(name, seed, replay=None, resume=None, every=10, train_seed=0):
        tuner = {"check_every": 5, "imbalance_step": 0.01, "replay": replay}
        config = cfg(root / name, "auto", "auto", tuner, "auto").to_dict()
        config["train"]["seed"] = train_seed
        config = RunConfig.from_dict({**config, "checkpoint": {"every": every, "keep": 5}})
        noise = random.Random(seed)  # the same on every rank: one stream of "timings" per run
        with Trainer(config, runtime, resume, resume is None) as trainer:
            trainer.tuner._time = lambda layer, cand: noise.uniform(1e-3, 2e-3)
            restored = None
            if resume is not None:
                trainer._load()
                restored = trainer.tuner.state_dict()
                trainer.resume_path = None  # loaded already
            result = trainer.run(quiet=True)
            decisions = [(r["layer"], r["step"], r["choice"]) for r in trainer.tuner.cache.values()]
        return result, decisions, restored

    try:
        a, a_decisions, _ = run("a", seed=1)
        b, b_decisions, _ = run("b", seed=2, replay=str(root / "a"))
        middle = root / "a" / "checkpoints" / "step_00000010"
        saved = ckpt.read_meta(middle)["tuner"]
        c, c_decisions, restored = run("c", seed=3, replay=str(root / "a"), resume=str(middle))
        d, d_decisions, _ = run("d", seed=4, every=0)
        try:
            run("e", seed=1, replay=str(root / "a"), train_seed=7)
            refused = None
        except ValueError as exc:
            refused = str(exc)
        return {
            "e": (refused, (root / "e" / "metrics.jsonl").exists()),
            "a": (a.losses, a_decisions), "b": (b.losses, b_decisions),
            "c": (c.losses, c_decisions, restored == saved, len(saved["cache"])),
            "d": (d.losses, d_decisions),
        }  # fmt: skip
    finally:
        shutdown(runtime)


def test_decisions_survive_a_resume_and_a_replay_gives_the_same_losses_twice(tmp_path):
    out = run_on_ranks(_reproduce, 4, args=(str(tmp_path),), timeout=400)[0]
    a_losses, a_decisions = out["a"]
    assert len(a_losses) == 30 and len(a_decisions) >= 4
    # Replayed: A's decisions, and bitwise A's losses (fp32, the same machine and seed).
    b_losses, b_decisions = out["b"]
    assert b_decisions == a_decisions and b_losses == a_losses
    # Resumed at step 10: the tuner state saved with the checkpoint is restored, and with A's
    # decisions replayed the run continues exactly as the uninterrupted one.
    c_losses, c_decisions, restored, saved_count = out["c"]
    assert restored and saved_count >= 1
    assert c_losses == a_losses[10:]
    assert c_decisions == a_decisions
    # Without replay, other timings choose otherwise (what replay guards against).
    assert out["d"][1] != a_decisions
    # Another seed: refused before any work, naming both seeds.
    refused, wrote = out["e"]
    assert "the recorded run had train.seed 0, this run has 7" in refused and not wrote
