"""A replay of recorded tuner decisions (`tuner.replay`) checks what it replays, in one process
(issue 39, item 5): a record of another seed, world size or layout is refused before any work,
naming both values, and so is one for another layer, other sizes or a choice this run does not
allow; a replay that meets a situation the record does not hold stops with one line. The replay
of a real 4-rank run (the same losses twice) is in tests/test_tuner.py."""

from __future__ import annotations

import json

import pytest
import torch

from moeflow.moe.config import MoEConfig, RouterConfig
from moeflow.moe.layer import MoELayer
from moeflow.parallel import ParallelDims, parallelize
from moeflow.parallel.cost_model import PRESETS, Candidate, LayerShape
from moeflow.parallel.decision import decision_record
from moeflow.parallel.tuner import RuntimeTuner, TunerConfig
from moeflow.train.config import RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.tuning import build_tuner

RUN = {"seed": 0, "world_size": 1, "dp": 1, "ep": 1, "dp_shard": 1}


@pytest.fixture(scope="module")
def ctx():
    runtime = init_distributed(60.0)
    yield ParallelDims().build()
    shutdown(runtime)


def record(step=1, choice="ep", experts=2, situation=(6.0, 1.0, 0.0), **run) -> dict:
    """A decision as the tuner writes it: one layer `0`, 8 wide, `experts` experts."""
    shape = LayerShape(tokens=6, hidden=8, ffn=8, experts=experts, top_k=1, group=1)
    cand = Candidate.parse(choice)
    out = decision_record("0", step, shape, [cand], [1e-3], {cand: 1e-3}, {})
    return {**out, "situation": list(situation), "run": {**RUN, **run}}


def layer_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=8, router=RouterConfig(top_k=1))
    return torch.nn.Sequential(MoELayer(cfg))


@pytest.mark.parametrize(
    ("recorded", "expected"),
    [
        (record(world_size=2, ep=2), "the recorded run had the world size 2, this run has 1"),
        (record(seed=3), "the recorded run had train.seed 3, this run has 0; replay a run of"),
        (record(dp_shard=2), "the recorded run had parallel.dp_shard 2, this run has 1"),
        (record(), "this run makes no tuner decision to replay (parallel.ep is 1: there is no"),
        ({k: v for k, v in record().items() if k != "run"}, "does not say which run and"),
    ],
)
def test_a_record_of_another_run_is_refused_before_any_work(ctx, tmp_path, recorded, expected):
    """A 2-rank record replayed on 1 process, another seed or layout: one line, both values."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 1, "loss": 2.0}) + "\n"
                    + json.dumps(recorded) + "\n")  # fmt: skip
    cfg = RunConfig.from_dict({"parallel": {"ep": 1, "mode": "auto"},
                               "tuner": {"replay": str(tmp_path)}})  # fmt: skip
    with pytest.raises(ValueError) as err:
        build_tuner(cfg, ctx, layer_model(), tmp_path, torch.device("cpu"))
    assert expected in str(err.value) and str(tmp_path) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([record(experts=4)], "0 had experts 4 in the recorded run, 2 here"),
        ([record(choice="dp")], "ran 0 as dp from step 1, which this run's settings do not allow"),
        ([{**record(), "layer": "blocks.7.ffn"}], "decided for blocks.7.ffn, a MoE layer this"),
        ([record(seed=5)], "the recorded run had train.seed 5, this run has 0"),
    ],
)
def test_a_record_for_other_layers_or_choices_is_refused_when_the_tuner_is_built(
    ctx, records, expected
):
    replay = {(r["layer"], r["step"]): r for r in records}
    with pytest.raises(ValueError) as err:
        RuntimeTuner(layer_model(), ctx, PRESETS["h100"], TunerConfig(replay="runs/a"),
                     replay=replay, seed=0)  # fmt: skip
    assert str(err.value).startswith("tuner.replay ('runs/a'): ") and expected in str(err.value)


def test_a_replay_that_meets_another_situation_stops_with_one_line(ctx):
    settings = TunerConfig(samples=1, first_check=1, check_every=1, replay="runs/a")
    model = parallelize(layer_model(), ctx)
    x = torch.randn(6, 8)

    def replayed(records: list[dict], steps: int) -> list[list[dict]]:
        replay = {(r["layer"], r["step"]): r for r in records}
        tuner = RuntimeTuner(model, ctx, PRESETS["h100"], settings, replay=replay, seed=0)
        try:
            out = []
            for step in range(1, steps + 1):
                model(x).sum().backward()
                out.append(tuner.after_step(step))
            return out
        finally:
            tuner.close()

    # The situation the record holds: its decision, marked as replayed, with this run's figures.
    (taken,), () = replayed([record()], 2)
    assert taken["choice"] == "ep" and taken["reason"].startswith("replayed (")
    assert taken["situation"] == [6.0, 1.0, 0.0] and taken["run"] == RUN
    with pytest.raises(ValueError) as err:  # more tokens per rank than the recorded run had
        replayed([record(situation=(1024.0, 1.0, 0.0))], 1)
    assert str(err.value) == (
        "tuner.replay ('runs/a'): at step 1, 0 meets 6 tokens per rank, load 1.00, 0% of pairs "
        "off-group; the recorded run met 1024 tokens per rank, load 1.00, 0% of pairs off-group: "
        "the runs diverged (another config or data?); replay a run of the same config, or drop "
        "tuner.replay"
    )
    with pytest.raises(ValueError) as err:  # this run reuses a decision, the recorded run did not
        replayed([record(), record(step=2)], 2)
    assert "0% of pairs off-group, one it had measured before; the recorded run met a new" in str(
        err.value
    )
    with pytest.raises(ValueError) as err:  # the other way round
        replayed([record(step=2)], 1)
    assert "none it had measured; the recorded run met one it had measured: the runs" in str(
        err.value
    )
