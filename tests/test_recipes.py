"""The GPU recipes of `examples/configs/` (64 GPUs: ep 8 x dp_shard 8, bf16 parameters, 1 x 4,096
tokens per micro-batch, selective activation checkpointing): each fits an 80 GB GPU by the dry
run's memory planner, and the figures quoted in its header are the ones the dry run prints today."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeflow.train.config import RunConfig
from moeflow.train.dry_run import dry_run, format_report, parse_memory

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"
RECIPES = {  # total parameters, as the model cards give them (the decoder's closest shape)
    "mixtral_8x7b_64gpu.toml": 46.70e9,
    "qwen3_30b_a3b_64gpu.toml": 30.53e9,
    "deepseek_v2_lite_like_64gpu.toml": 15.79e9,
    "olmoe_1b7b_64gpu.toml": 6.92e9,
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_fits_80gb_at_64_gpus_and_quotes_its_dry_run(name):
    path = CONFIGS / name
    report = dry_run(RunConfig.from_toml(path), world_size=64, gpu_memory=parse_memory("80GB"))
    assert (report["dp"], report["ep"], report["dp_shard"]) == (8, 8, 8)
    assert report["param_dtype"] == "bf16" and report["activation_checkpointing"]
    assert abs(report["total_params"] - RECIPES[name]) < 0.01 * RECIPES[name]
    assert report["verdict"].startswith("fits")
    state = sum(report["state_bytes_per_rank"].values())
    # Sharded over 64 ranks: a 64th of 16 bytes per parameter (fp32 weights, gradients, AdamW).
    assert abs(state - 16 * report["total_params"] / 64) < 0.02 * state
    if name.startswith("mixtral"):
        assert state <= 20e9  # the bar: <= 20 GB of state per rank
    quoted = " ".join(
        line.removeprefix("#").strip()
        for line in path.read_text().splitlines()
        if line.startswith("#   ")
    )
    for line in format_report(report).splitlines():
        line = line.strip()
        if line.startswith(("state per rank", "memory per rank", "fits")):
            assert line in quoted, f"{name}: the header quotes an old dry run; now: {line}"
