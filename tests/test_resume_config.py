"""`--resume` continues with the checkpoint's `[model]` (`moeflow.train.resume_config`): a run
started with a `--model.*` override resumes without repeating it; an explicit change of the model
(on the command line, or in the config file since the checkpoint) is refused in one line naming
the key, both values and the fix; a key that may change on resume is taken from the user."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeflow.launch.cli import main
from moeflow.train.config import RunConfig
from moeflow.train.resume_config import GivenModel, resumed_config
from tests.test_cli import write_config


def _meta(step: Path) -> dict:
    return json.loads((step / "moeflow.json").read_text())


def _one_line(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_resume_keeps_the_checkpoints_model_and_refuses_explicit_changes(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=1)  # [model] n_layers = 2, n_heads = 2
    assert main(["train", str(cfg), "--quiet", "--model.n_layers", "1"]) == 0
    capsys.readouterr()
    # Resumed without repeating the override: the checkpoint's model, said once.
    assert main(["train", str(cfg), "--resume", "--train.steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert (
        "resumed with the checkpoint's [model]: model.n_layers = 1 (the config says 2)" in printed
    )
    step2 = out / "checkpoints" / "step_00000002"
    assert _meta(step2)["config"]["model"]["n_layers"] == 1
    assert _meta(step2)["given"]["model"]["n_layers"] == 2  # the file as written
    losses = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if r["kind"] == "train"] == [1, 2]
    # An explicit change of the model: one line, the key, both values, the fix.
    args = ["train", str(cfg), "--quiet", "--resume", "--train.steps", "3"]
    line = _one_line(capsys, [*args, "--model.n_layers", "2"])
    assert line.startswith(f"moeflow: error: --resume: checkpoint {str(step2)!r} was written")
    assert line.endswith(
        "for another model: model.n_layers is 1 there, 2 here (--model.n_layers); drop it to "
        "resume with the checkpoint's [model]"
    )
    # Repeating the checkpoint's own value is no change.
    text = cfg.read_text()
    cfg.write_text(text.replace("n_heads = 2", "n_heads = 4"))  # the file changed since
    line = _one_line(capsys, [*args, "--model.n_layers", "1"])
    assert line.endswith(
        "model.n_heads is 2 there, 4 here (c.toml, changed since); undo it to resume with the "
        "checkpoint's [model]"
    )
    cfg.write_text(text)
    # A key that may change on resume is the user's; the checkpoint records it.
    assert main([*args, "--model.moe.router.z_loss_coeff", "0.01"]) == 0
    saved = _meta(out / "checkpoints" / "step_00000003")["config"]["model"]
    assert (saved["n_layers"], saved["moe"]["router"]["z_loss_coeff"]) == (1, 0.01)


def _checkpoint_of(cfg: RunConfig, given: GivenModel | None = None) -> dict:
    meta = {"config": cfg.to_dict(), "model_fingerprint": cfg.fingerprint()}
    return {**meta, "given": given.record()} if given else meta


def test_a_config_given_whole_is_explicit_in_every_key():
    """From Python (`train(cfg, resume=...)`, no `GivenModel`): the model must be the same, but a
    resumable key (capacity) is taken; a checkpoint this version reads another way is refused."""
    model = {"dim": 32, "n_layers": 1, "moe": {"num_experts": 4}}
    meta = _checkpoint_of(RunConfig.from_dict({"model": model}))
    other = RunConfig.from_dict({"model": {**model, "moe": {"num_experts": 8}}})
    with pytest.raises(ValueError) as refused:
        resumed_config(other, meta, "ck", None)
    assert str(refused.value) == (
        "--resume: checkpoint 'ck' was written for another model: model.moe.num_experts is 4 "
        "there, 8 here; resume with the same [model]"
    )
    router = {"capacity_factor": 1.5}
    wider = RunConfig.from_dict({"model": {**model, "moe": {"num_experts": 4, "router": router}}})
    resumed, note = resumed_config(wider, meta, "ck", None)
    assert resumed.model.moe.router.capacity_factor == 1.5 and note == ""
    with pytest.raises(ValueError, match="written by another moeflow version"):
        resumed_config(wider, {**meta, "model_fingerprint": "0" * 16}, "ck", None)
    # The file changed one key and the command line another: both named, in one line (the keys
    # that follow from them, moe.hidden_size from dim, are the checkpoint's like any other).
    given = GivenModel("a/c.toml", {"dim": 32}, {})
    meta = _checkpoint_of(RunConfig.from_dict({"model": model}), given)
    now = RunConfig.from_dict({"model": {**model, "dim": 64, "n_heads": 8}})
    asked = GivenModel("a/c.toml", {"dim": 64}, {"model.n_heads": 8})
    with pytest.raises(ValueError) as refused:
        resumed_config(now, meta, "ck", asked)
    assert str(refused.value).endswith(
        "for another model: model.dim is 32 there, 64 here (c.toml, changed since); "
        "model.n_heads is 4 there, 8 here (--model.n_heads); drop or undo them to resume with "
        "the checkpoint's [model]"
    )
