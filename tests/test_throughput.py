"""What a run says about itself: tokens/s for the job and per rank and MFU (`metrics.jsonl`, the
progress bar, the closing summary; the peak from a table of known accelerators, none on a CPU),
and the start line's parameters (the model's and this rank's: its experts, its shards) and, for a
Hugging Face model, where its weights came from. Lines and fields, never timings' values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from moeflow.data.source import Corpus, Source
from moeflow.models.decoder import MoEDecoder
from moeflow.parallel.dims import ParallelDims
from moeflow.train.build import build_model
from moeflow.train.config import RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.metrics import flops_per_token
from moeflow.train.result import describe_run
from moeflow.train.throughput import Throughput, compute_dtype, peak_for
from moeflow.train.trainer import train
from tests.test_hf_train import LLAMA, QWEN2_MOE

T = 1e12
# torch.cuda.get_device_name of each card -> its dense bf16 and fp32 peaks (KNOWN_PEAKS' sources)
CARDS = {
    "NVIDIA H100 80GB HBM3": (989.5 * T, 67 * T),
    "NVIDIA H100 PCIe": (756.5 * T, 51 * T),
    "NVIDIA H100 NVL": (835.5 * T, 60 * T),
    "NVIDIA H200": (989.5 * T, 67 * T),
    "NVIDIA GH200 480GB": (989.5 * T, 67 * T),
    "NVIDIA A100-SXM4-80GB": (312 * T, 19.5 * T),
    "NVIDIA A100 80GB PCIe": (312 * T, 19.5 * T),
}


def test_peaks_of_known_devices_and_none_elsewhere(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, (half, single) in CARDS.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, name=name: name)
        assert (peak_for(0.0, cuda, "bf16")[0], peak_for(0.0, cuda, "fp32")[0]) == (half, single)
    line = peak_for(0.0, cuda, "bf16")[1]
    assert line == ("MFU against the NVIDIA A100 80GB PCIe's dense bf16 peak, 312.0 TFLOP/s "
                    "(metrics.peak_flops overrides it)")  # fmt: skip
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    assert peak_for(0.0, cuda, "bf16") == (None, "no MFU: no known peak FLOP/s for Tesla "
                                           "V100-SXM2-32GB; set metrics.peak_flops (per device) "
                                           "for one")  # fmt: skip
    assert peak_for(0.0, torch.device("cpu"), "fp32")[0] is None
    assert peak_for(2e14, cuda, "bf16") == (2e14, "MFU against metrics.peak_flops (200.0 TFLOP/s)")
    # Which peak: bf16 parameters or 16-bit autocast compute in bf16, else fp32.
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    dtypes = [
        compute_dtype(RunConfig.from_dict({"train": train}), device)
        for train, device in (({}, cuda), ({"param_dtype": "fp32", "autocast": "none"}, cuda),
                              ({}, cpu), ({"autocast": "fp16"}, cpu))
    ]  # fmt: skip
    assert dtypes == ["bf16", "fp32", "fp32", "bf16"]
    # The job's tokens are every rank's; MFU is per rank.
    cfg = RunConfig.from_dict({"metrics": {"peak_flops": 1e12}})
    fields = Throughput(cfg, torch.device("cpu"), world_size=4).fields(steps=3, seconds=2.0)
    per_rank = 3 * 8 * 128 / 2.0  # micro_batch_size x seq_len tokens a step, by default
    assert fields == {"tokens_per_s": 4 * per_rank, "tokens_per_s_per_rank": per_rank,
                      "mfu": flops_per_token(cfg.model, 128) * per_rank / 1e12}  # fmt: skip


def _run_cfg(out: Path) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 16,
                  "moe": {"num_experts": 2}},
        "data": {"max_bytes": 20000},
        "train": {"steps": 2, "seq_len": 16, "micro_batch_size": 2, "out_dir": str(out),
                  "eval_windows": 2},
        "metrics": {"plot": False, "log_every": 1, "peak_flops": 1e12},
    })  # fmt: skip


def test_a_run_prints_and_records_its_throughput(tmp_path, capsys):
    cfg = _run_cfg(tmp_path)
    result = train(cfg)
    err = capsys.readouterr().err  # the progress bar's, and the lines written above it
    assert re.search(r"\n?moeflow train: 1 rank\(s\) \(dp=1, ep=1\) on cpu; 0\.\d\dM parameters, "
                     r"all on this rank; data: ", err)  # fmt: skip
    assert err.count("MFU against metrics.peak_flops (1.0 TFLOP/s)") == 1
    rate = r"[\d,]+ tokens/s \([\d,]+ per rank x 1 rank\), MFU \d+\.\d%"
    assert re.search(rf"loss \d\.\d{{3}}, {rate}", err)  # the bar
    assert re.search(rf"throughput: {rate} over 2 step\(s\), \d+\.\d\d s of training", err)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    flops = flops_per_token(cfg.model, 16)
    for r in [r for r in records if r["kind"] in ("train", "end")]:
        assert r["tokens_per_s"] == r["tokens_per_s_per_rank"] > 0  # one rank: the job's
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s_per_rank"] / 1e12)
    end = records[-1]
    assert end["kind"] == "end" and end["train_s"] > 0
    assert result.throughput == {k: end[k] for k in result.throughput}


CORPUS = Corpus([Source("stdlib", range(10**6), range(10**5), "stdlib", 1.0)])
DATA = "; data: stdlib, 1.00M train / 0.10M validation tokens; steps 0 -> 4"


def _start_lines(world: int) -> tuple[int, dict[str, str]]:
    """The start line of each layout on a fake world (the model built on the meta device as the
    ranks build it: the dry run's way), and the model's parameter count built whole."""
    from tests.test_fsdp import MODEL

    cfg = RunConfig.from_dict({"model": MODEL, "train": {"seq_len": 32}})
    with torch.device("meta"):
        whole = sum(p.numel() for p in MoEDecoder(cfg.model).parameters())
    lines = {}
    for name, (ep, shard) in {"replicated": (1, 1), "sharded": (1, 2), "ep": (2, 1)}.items():
        runtime = init_distributed(60, fake_world_size=world)
        try:
            ctx = ParallelDims(dp=world // ep, ep=ep, dp_shard=shard).build("cpu")
            model = build_model(cfg, ctx, torch.device("meta"), param_dtype="fp32")
            lines[name] = describe_run(model, ctx.dims, runtime, CORPUS, 0, 4)
        finally:
            shutdown(runtime)
    return whole, lines


def test_the_start_line_says_what_a_sharded_rank_holds_and_where_hf_weights_came_from():
    whole, lines = _start_lines(2)
    total, data = f"{whole / 1e6:.2f}M parameters", DATA
    assert lines["replicated"] == (
        f"moeflow train: 2 rank(s) (dp=2, ep=1) on cpu; {total}, all on this rank{data}"
    )
    half = f"{whole / 2e6:.2f}M on this rank (its shards)"
    assert lines["sharded"] == (
        f"moeflow train: 2 rank(s) (dp=2, dp_shard=2, ep=1) on cpu; {total}, {half}{data}"
    )
    assert re.fullmatch(rf"moeflow train: 2 rank\(s\) \(dp=1, ep=2\) on cpu; {total}, 0\.\d\dM "
                        rf"on this rank \(its experts\){re.escape(data)}", lines["ep"])  # fmt: skip
    # A Hugging Face model: what was converted, and where the weights came from.
    runtime = init_distributed(60)
    try:
        ctx = ParallelDims().build("cpu")
        said = []
        for hf, moe in ((QWEN2_MOE, {}), (LLAMA, {"num_experts": 4})):
            cfg = RunConfig.from_dict({"model": {"hf_config": hf, "moe": moe},
                                       "train": {"seq_len": 32}})  # fmt: skip
            model = build_model(cfg, ctx, torch.device("meta"))
            said.append(describe_run(model, ctx.dims, runtime, CORPUS, 0, 4).split("; ")[2:4])
        resumed = model.origin.describe(Path("run/checkpoints/step_00000004"))
    finally:
        shutdown(runtime)
    assert said == [
        ["Hugging Face qwen2_moe: 2 of 2 layers' sparse MoE blocks converted",
         "weights: HF's init (train.seed 0)"],
        ["Hugging Face llama: 2 of 2 layers' MLPs upcycled to 4 experts each",
         "weights: HF's init (train.seed 0)"],
    ]  # fmt: skip
    assert resumed.endswith("weights: checkpoint step_00000004 (the run began from HF's init "
                            "(train.seed 0))")  # fmt: skip
