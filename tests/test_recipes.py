"""The GPU recipes of `examples/configs/` (64 GPUs: ep 8 x dp_shard 8, bf16 parameters, 1 x 4,096
tokens per micro-batch, selective activation checkpointing): each fits an 80 GB GPU by the dry
run's memory planner, and the figures quoted in its header are the ones the dry run prints today."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeflow.launch.arguments import memory_bytes
from moeflow.train.config import RunConfig
from moeflow.train.dry_run import dry_run, format_report

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
    report = dry_run(RunConfig.from_toml(path), world_size=64, gpu_memory=memory_bytes("80GB"))
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


def _fits(path: Path, world: int, overrides: list[str], memory: str) -> tuple[bool, dict]:
    cfg = RunConfig.from_toml(path, overrides)
    report = dry_run(cfg, world_size=world, gpu_memory=memory_bytes(memory))
    return report["verdict"].startswith("fits"), report


ADVICE_CASES = [
    # (recipe, world, overrides, memory, settings it must not name, what it must name)
    ("mixtral_8x7b_64gpu.toml", 8, ["--parallel.dp_shard", "1"], "80GB",
     ["dp_shard = 1", "param_dtype", "parallel.ep"], ["smallest world size that fits is 16"]),
    ("mixtral_8x7b_64gpu.toml", 64, ["--parallel.dp_shard", "1"], "80GB",
     ["param_dtype"], ["parallel.dp_shard = 8 (now 1)"]),
    # Its activations would fit with full checkpointing, but a rank's share is built whole
    # before sharding (19.2 GiB): no micro-batch below 1, and the start-up peak named.
    ("qwen3_30b_a3b_64gpu.toml", 64, [], "20GB",
     ["micro_batch_size", "param_dtype", "activation_checkpointing"],
     ["no number of ranks at ep 8 makes it fit: the start-up peak (19.2 GiB"]),
]  # fmt: skip


@pytest.mark.parametrize("case", ADVICE_CASES, ids=lambda c: f"{c[0][:7]}-{c[1]}-{c[3]}")
def test_the_dry_runs_advice_is_true(case):
    """A "does not fit" line names only settings that make the run fit (each planned again: it
    fits), and the smallest world size with its dp_shard: the dry run there fits, at the next
    smaller world size the line names (the next dp_shard the layout takes) it does not."""
    name, world, overrides, memory, never, named = case
    path = CONFIGS / name
    fits, report = _fits(path, world, overrides, memory)
    line = report["verdict"]
    assert not fits and "advice" in report, line
    for text in never:
        assert text not in report["advice"], (text, line)
    for text in named:
        assert text in report["advice"], (text, line)
    for setting in re.findall(r"(\w+\.\w+ = \S+) \(now [^)]*\)", report["advice"]):
        key, value = setting.split(" = ")
        fits, _ = _fits(path, world, [*overrides, f"--{key}", value.strip('"')], memory)
        assert fits, (setting, line)
    smallest = re.search(
        r"smallest world size that fits is (\d+) ranks \(dp \d+ x ep \d+, parallel.dp_shard = "
        r"(\d+), needs [^)]*\)(?:; (\d+) ranks need)?",
        report["advice"],
    )
    if smallest is None:
        return
    ranks, shard, below = smallest.groups()
    fits, _ = _fits(path, int(ranks), [*overrides, "--parallel.dp_shard", shard], memory)
    assert fits
    if below:  # the next smaller fully sharded world the layout takes
        shards = int(below) * int(shard) // int(ranks)
        fits, _ = _fits(path, int(below), [*overrides, "--parallel.dp_shard", str(shards)], memory)
        assert not fits


def test_the_dry_run_says_when_no_number_of_ranks_fits():
    """Neither what a rank builds at start-up nor what it keeps while training whatever the
    number of ranks fits: the advice says which (a planner whose state shrinks with ranks)."""
    from moeflow.train.fit_advice import START_UP, smallest_world

    cfg = RunConfig.from_dict({"model": {"dim": 64, "n_layers": 2, "n_heads": 4}})

    def plan(activations: float, start: float):
        return lambda c, world: (max(activations + 100 / world, start),
                                 {"weights": 100 / world, "activations": activations,
                                  START_UP: start})  # fmt: skip

    world, why = smallest_world(cfg, 2, 40.0, plan(activations=45, start=10))
    assert world is None and why.startswith("no number of ranks makes it fit: activations 45 B")
    world, why = smallest_world(cfg, 2, 40.0, plan(activations=5, start=50))
    assert world is None and "the start-up peak (50 B" in why
    assert smallest_world(cfg, 2, 40.0, plan(activations=5, start=30))[0] == 4  # 5 + 100/4 fits
