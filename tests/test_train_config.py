"""The run config: TOML, overrides, close-match errors, the example configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeflow.train.config import RunConfig, parse_overrides

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"


def test_example_configs_load():
    tiny = RunConfig.from_toml(CONFIGS / "tiny_cpu.toml")
    assert tiny.parallel.ep == 2 and tiny.model.moe.num_experts == 8
    assert tiny.model.moe.hidden_size == tiny.model.dim == 128
    gpu = RunConfig.from_toml(CONFIGS / "olmoe_1b7b_64gpu.toml")
    assert gpu.model.moe.router.top_k == 8 and gpu.optim.betas == (0.9, 0.95)
    assert gpu.parallel.dp_for(64) == 8
    prepared = RunConfig.from_toml(CONFIGS / "tiny_prepared.toml")
    assert prepared.data.kind == "prepared" and prepared.data.document_mask
    assert prepared.model.vocab_size == 2048 and prepared.model.dim == tiny.model.dim


def test_overrides_are_toml_values():
    pairs = parse_overrides(
        ["--train.steps", "5", "--optim.betas=[0.8, 0.9]", "--data.path", "a b"]
    )
    assert pairs == [("train.steps", 5), ("optim.betas", [0.8, 0.9]), ("data.path", "a b")]
    cfg = RunConfig.from_toml(
        CONFIGS / "tiny_cpu.toml",
        ["--train.steps", "7", "--model.moe.router.top_k", "1", "--optim.lr", "1"],
    )
    assert cfg.train.steps == 7 and cfg.model.moe.router.top_k == 1
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.step", "3"], "did you mean train.steps"),
        (["--model.moe.router.topk", "3"], "did you mean model.moe.router.top_k"),
        (["--trian.steps", "3"], "unknown config key 'trian'"),
        (["--train.steps", "many"], "train.steps ('many') must be of type int"),
        (["--train.steps", "0"], "train.steps (0) must be an integer >= 1"),
        (["--model.moe.router.top_k", "9"], "must be <= moe.num_experts"),
        (["--train.seq_len", "4096"], "train.seq_len (4096) must be <= model.max_seq_len"),
        (["--data.kind", "web"], "data.kind ('web') must be one of"),
        (
            ["--parallel.mode", "tp"],
            "parallel.mode ('tp') must be one of ['ep', 'sharded', 'dp', 'auto']",
        ),
        (["--parallel.ep", "3"], "cannot be laid out over an expert group of 3 ranks"),
        (["--parallel.ep", "3"], "Valid expert-group sizes for these sizes: [1, 2, 4, 8, 16"),
        (["--parallel.ep", "16", "--model.moe.ffn_hidden_size", "9"], "quotient (2) divides F"),
        (["--train.compile", "1"], "train.compile (1) must be"),
        (["--train.steps"], "has no value"),
        (["train.steps", "3"], "must look like --section.key VALUE"),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig.from_toml(CONFIGS / "tiny_cpu.toml", overrides)


def test_unknown_key_in_file_lists_close_matches(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlearning_rate = 1e-3\nwarmup = 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.learning_rate'"):
        RunConfig.from_toml(path)
    path.write_text("[optim\n")
    with pytest.raises(ValueError, match="is not valid TOML"):
        RunConfig.from_toml(path)
    with pytest.raises(ValueError, match="does not exist"):
        RunConfig.from_toml(tmp_path / "missing.toml")


def test_world_size_must_split_into_ep():
    cfg = RunConfig.from_dict({"parallel": {"ep": 2}})
    assert cfg.parallel.dp_for(4) == 2
    with pytest.raises(ValueError, match=r"world size \(3\) is not divisible by parallel.ep \(2\)"):
        cfg.parallel.dp_for(3)
    pinned = RunConfig.from_dict({"parallel": {"ep": 2, "dp": 1}})
    with pytest.raises(ValueError, match=r"parallel.dp \(1\) x parallel.ep \(2\)"):
        pinned.parallel.dp_for(4)


def test_fields_added_later_leave_the_fingerprint_of_older_checkpoints_alone():
    # The default model's fingerprint as the release before shared experts, expert biases and
    # HF models wrote it into every checkpoint: those checkpoints still resume.
    assert RunConfig.from_dict({}).fingerprint() == "c99b1d0342091d44"
    for override in (
        ["--model.moe.ffn_bias", "true"],
        ["--model.moe.shared_expert_ffn_hidden_size", "64"],
        ["--model.moe.router.softmax_dtype", '"fp32"'],
        ["--model.moe.router.routed_scaling_factor", "2.5"],
        ["--model.moe.num_experts", "8", "--model.moe.router.n_group", "2"],
    ):
        assert RunConfig.from_dict({}, override).fingerprint() != "c99b1d0342091d44", override
