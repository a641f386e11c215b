"""DCP checkpoints: experts by logical id, resharding across ep, atomicity, refusing bad files."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from moeflow.train import checkpoint as ckpt
from moeflow.train.config import RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.trainer import Trainer, train
from tests.distributed import run_on_ranks


def tiny_cfg(out_dir: Path, ep: int, steps: int = 4, **train_kw) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
                      "moe": {"num_experts": 8, "ffn_hidden_size": 32}},
            "data": {"max_bytes": 200_000},
            "train": {"steps": steps, "seq_len": 32, "micro_batch_size": 4, "out_dir":
                      str(out_dir), "eval_windows": 24, "eval_every": 0, **train_kw},
            "optim": {"warmup_steps": 2},
            "parallel": {"ep": ep},
            "metrics": {"progress": False, "plot": False, "log_every": 1},
        }
    )  # fmt: skip


def _train_ranks(rank, world_size, out_dir):
    result = train(tiny_cfg(out_dir, ep=world_size), quiet=True)
    return result.val_loss, str(result.checkpoint)


def _eval_checkpoint(rank, world_size, out_dir, path):
    """Load `path` at this world size (ep = world size); the validation loss and this rank's
    expert weights and AdamW moments by logical id."""
    cfg = tiny_cfg(out_dir, ep=world_size)
    runtime = init_distributed(60)
    trainer = Trainer(cfg, runtime, resume=path, overwrite=False)
    trainer._load()
    loss = trainer.evaluate()["val_loss"]
    by_id = {}
    for name, layer in trainer.model.named_modules():
        if hasattr(layer, "local_expert_ids") and hasattr(layer, "experts"):
            w1 = layer.experts.w1
            moment = trainer.optimizer.state[w1]["exp_avg"]
            for slot, logical in enumerate(layer.local_expert_ids):
                by_id[(name, logical)] = (w1[slot].detach().clone(), moment[slot].clone())
    steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    return loss, by_id, steps


def test_checkpoint_from_ep2_loads_at_ep1_and_ep4(tmp_path):
    (loss2, path), _ = run_on_ranks(_train_ranks, 2, args=(str(tmp_path / "ep2"),))
    meta = ckpt.read_meta(path)
    assert meta["step"] == 4 and meta["parallel"] == {"dp": 1, "ep": 2, "dp_shard": 1}
    losses, experts = {}, {}
    for world in (1, 4):
        results = run_on_ranks(
            _eval_checkpoint, world, args=(str(tmp_path / f"load{world}"), path), timeout=240
        )
        losses[world] = [r[0] for r in results]
        experts[world] = {k: v for r in results for k, v in r[1].items()}
        assert all(r[2] == {4.0} for r in results)  # AdamW step count restored everywhere
    for world in (1, 4):  # one fp32 forward per layout: sums in other orders, no optimizer
        assert losses[world] == pytest.approx([loss2] * world, rel=1e-6)
    assert len(experts[1]) == len(experts[4]) == 2 * 8
    for key, (w, m) in experts[1].items():
        assert torch.equal(w, experts[4][key][0]) and torch.equal(m, experts[4][key][1])
        assert m.abs().sum() > 0  # real moments, not fresh zeros


def test_checkpoint_keys_are_logical_expert_ids(tmp_path):
    result = train(tiny_cfg(tmp_path, ep=1, steps=1), quiet=True)
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(result.checkpoint).read_metadata().state_dict_metadata)
    assert "blocks.1.ffn.experts.7.w1" in keys
    assert "optim.blocks.0.ffn.experts.3.w2.exp_avg_sq" in keys
    assert "blocks.0.ffn.experts.w1" not in keys
    assert "optim.head.weight.exp_avg" in keys


def _write_malicious_metadata(path: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (shutil.rmtree, ("/definitely/not/here",))

    (path / ".metadata").write_bytes(pickle.dumps(Exploit()))


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    good = train(tiny_cfg(tmp_path / "run", ep=1, steps=2), quiet=True).checkpoint
    cfg = tiny_cfg(tmp_path / "other", ep=1, steps=4)

    def load(path):
        runtime = init_distributed(60)
        try:
            with Trainer(cfg, runtime, resume=str(path), overwrite=False) as trainer:
                trainer._load()
        finally:
            shutdown(runtime)

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    _write_malicious_metadata(bad)
    with pytest.raises(ValueError, match=r"corrupt: \.metadata: \d+ bytes, \d+ when it was"):
        load(bad)  # the manifest catches it before any unpickling
    meta = json.loads((bad / "moeflow.json").read_text())
    del meta["files"]  # as a checkpoint written before manifests: the unpickler refuses it
    (bad / "moeflow.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"asks for shutil\.rmtree"):
        load(bad)
    shutil.rmtree(bad)
    shutil.copytree(good, bad)
    data = next(bad.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])  # truncated
    with pytest.raises(ValueError, match=rf"corrupt: {data.name}: \d+ bytes, \d+ when it was"):
        load(bad)
    (bad / "moeflow.json").write_text("{not json")
    with pytest.raises(ValueError, match="is corrupt"):
        load(bad)
    (bad / "moeflow.json").unlink()
    with pytest.raises(ValueError, match=r"incomplete \(no moeflow.json\)"):
        load(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "missing")


def test_partial_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    cfg = tiny_cfg(tmp_path, ep=1, steps=6).to_dict()
    cfg["checkpoint"] = {"every": 2, "keep": 2}
    result = train(RunConfig.from_dict(cfg), quiet=True)
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000004", "step_00000006"]
    assert result.checkpoint == root / "step_00000006"
    (root / ".step_00000008.partial").mkdir()  # a save that died half-way
    (root / "step_00000010").mkdir()  # no moeflow.json: never finished
    assert ckpt.latest_checkpoint(root) == root / "step_00000006"
