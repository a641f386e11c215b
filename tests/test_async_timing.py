"""Timing on an asynchronous device, with a stand-in for one: work a call only queues, which takes
time when the device is synchronised (as a GPU kernel launch returns before the kernel runs). The
calibration and the tuner read the clock after synchronising, so they time the work, not the
launches: timed without synchronising, the tuner would pick the candidate whose work is queued;
timed as it is, it picks the truly faster one. The calibration runs in the run's compute dtype."""

from __future__ import annotations

import time

import pytest
import torch

from moeflow.utils import device_clock
from tests.distributed import run_on_ranks
from tests.test_tuner import cfg as tuner_run_config


class StandInDevice:
    """Queued seconds of work, done (slept) only at `synchronize`."""

    def __init__(self) -> None:
        self.queued = 0.0

    def launch(self, seconds: float) -> None:
        self.queued += seconds

    def synchronize(self, device=None) -> None:
        time.sleep(self.queued)
        self.queued = 0.0


def test_calibration_times_the_queued_work(monkeypatch):
    from moeflow.parallel.calibrate import _timed

    device = StandInDevice()

    def work():  # a call that only queues 20 ms
        device.launch(0.02)

    monkeypatch.setattr(device_clock, "synchronize", device.synchronize)
    assert _timed(work, repeats=3) >= 0.02
    monkeypatch.setattr(device_clock, "synchronize", lambda device=None: None)
    assert _timed(work, repeats=3) < 0.005  # the clock alone sees only the launch


def _tune(rank, world):
    from moeflow import MoEConfig, MoELayer, RouterConfig
    from moeflow.parallel import ParallelDims, parallelize
    from moeflow.parallel.cost_model import PRESETS, Candidate
    from moeflow.parallel.tuner import RuntimeTuner, TunerConfig
    from moeflow.train.distributed import init_distributed, shutdown

    runtime = init_distributed(60)
    try:
        ctx = ParallelDims().build()
        cfg = MoEConfig(hidden_size=8, num_experts=4, ffn_hidden_size=8, router=RouterConfig())
        layer = parallelize(MoELayer(cfg), ctx)
        settings = TunerConfig(samples=3, warmup=1, refine=0.0)
        tuner = RuntimeTuner(layer, ctx, PRESETS["h100"], settings)
        layer(torch.randn(16, 8)).sum().backward()  # the input the tuner replays
        device = StandInDevice()

        def cost(module, args, kwargs, out):
            if kwargs.get("mode") == "ep":
                device.launch(0.03)  # 30 ms of device work, queued: the launch is free
            else:
                time.sleep(0.01)  # 10 ms the host waits for

        layer.register_forward_hook(cost, with_kwargs=True)
        cands = [Candidate("ep"), Candidate("dp")]
        device_clock.synchronize = device.synchronize
        synced = tuner._measure(layer, cands)
        device_clock.synchronize = lambda device=None: None
        launches_only = tuner._measure(layer, cands)
        tuner.close()
        return synced, launches_only
    finally:
        shutdown(runtime)


def test_the_tuner_picks_the_truly_faster_candidate_on_an_asynchronous_device():
    ((synced, launches_only),) = run_on_ranks(_tune, 1)
    ep, dp = synced
    assert ep >= 0.03 and dp < ep  # dp is truly faster: the tuner ranks it first
    assert launches_only[0] < launches_only[1]  # without synchronising, ep would look faster


class AskedError(Exception):
    """Raised by a stand-in calibration once it has seen its arguments."""


def test_calibration_runs_in_the_runs_compute_dtype(tmp_path, monkeypatch):
    from moeflow.train import tuning

    seen = {}

    def fake_calibrate(ctx, out_dir, hidden, ffn, dtype=torch.float32, device="cpu"):
        seen["dtype"] = dtype
        raise AskedError  # enough: what it was asked to measure

    class Ctx:  # an expert group to tune for (ep 4), without processes
        class dims:  # noqa: N801
            ep = 4

    monkeypatch.setattr(tuning, "load_or_calibrate", fake_calibrate)
    cpu = torch.device("cpu")
    for train, want in (({}, torch.float32), ({"param_dtype": "bf16"}, torch.bfloat16),
                        ({"autocast": "fp16"}, torch.float16),
                        ({"autocast": "bf16"}, torch.bfloat16)):  # fmt: skip
        run = tuner_run_config(tmp_path, "auto", 1)
        run = type(run).from_dict({**run.to_dict(), "train": {**run.to_dict()["train"], **train}})
        assert tuning.compute_dtype(run, cpu) == want
        with pytest.raises(AskedError):
            tuning.build_tuner(run, Ctx(), torch.nn.Linear(2, 2), tmp_path, cpu)
        assert seen.pop("dtype") == want, train
