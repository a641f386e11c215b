"""Parallel modes in the trainer, on 4 gloo ranks with 2 experts (ep = 4 > E: every rank holds an
F-slice of one expert): switching the mode every step changes nothing but speed, and checkpoints
written at E < ep resume at ep = 2 and ep = 1, and back, with the uninterrupted run's losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow.parallel import MODES, set_parallel_mode
from moeflow.train import checkpoint as ckpt
from moeflow.train.config import RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.trainer import Trainer
from tests.distributed import run_on_ranks


def cfg(out_dir: Path, ep: int, steps: int, **extra) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16,
                      "moe": {"num_experts": 2, "ffn_hidden_size": 32,
                              "router": {"top_k": 2, "aux_loss_type": "aux_loss"}}},
            "data": {"max_bytes": 100_000},
            "train": {"steps": steps, "seq_len": 16, "micro_batch_size": 2, "out_dir": str(out_dir),
                      "eval_windows": 8, "eval_every": 0, "activation_checkpointing": True},
            "optim": {"warmup_steps": 2, "lr": 3e-3},
            "parallel": {"ep": ep},
            "checkpoint": {"every": extra.pop("every", 0)},
            "metrics": {"progress": False, "plot": False, "log_every": 1},
        }
    )  # fmt: skip


def run(config: RunConfig, resume: str | None = None, switch: bool = False, dtype=None):
    """Train `config` in this rank; with `switch`, a different parallel mode every step. Returns
    the losses and this rank's model and AdamW state by checkpoint key (experts by logical id)."""
    runtime = init_distributed(60)
    try:
        trainer = Trainer(config, runtime, resume=resume, overwrite=resume is None, dtype=dtype)
        if switch:
            step = trainer.train_step

            def switching(acc):
                set_parallel_mode(trainer.model, MODES[trainer.step % len(MODES)])
                return step(acc)

            trainer.train_step = switching
        result = trainer.run(quiet=True)
        state = {**ckpt.model_state_dict(trainer.model)}
        state.update(ckpt.optimizer_state_dict(trainer.model, trainer.optimizer))
        state = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in state.items()
        }
        return result.losses, str(result.checkpoint), state
    finally:
        shutdown(runtime)


def _switching(rank, world, root):
    # Float64: every mode is the same math; in fp32 the modes' different summation orders differ
    # in the last bits, which 20 AdamW steps amplify where a gradient is near zero.
    fixed = run(cfg(Path(root) / "fixed", ep=4, steps=20), dtype=torch.float64)
    switching = run(cfg(Path(root) / "switching", ep=4, steps=20), None, True, torch.float64)
    return fixed[0], switching[0], fixed[2], switching[2]


def test_switching_mode_every_step_gives_the_fixed_mode_run(tmp_path):
    for fixed, switching, state, switched_state in run_on_ranks(
        _switching, 4, args=(str(tmp_path),), timeout=400
    ):
        assert len(fixed) == 20
        assert switching == pytest.approx(fixed, rel=1e-12)
        assert state.keys() == switched_state.keys()
        for key, value in state.items():
            torch.testing.assert_close(switched_state[key], value, rtol=1e-10, atol=1e-12)


def _resume(rank, world, root, first_ep, then_ep):
    """`first_ep` for 6 steps with a checkpoint at step 3; then every rank resumes that
    checkpoint at each of `then_ep` (the same world size: dp = 4 / ep)."""
    root = Path(root)
    losses, _, _ = run(cfg(root / f"first{first_ep}", ep=first_ep, steps=6, every=3))
    middle = str(root / f"first{first_ep}" / "checkpoints" / "step_00000003")
    resumed = {ep: run(cfg(root / f"then{ep}", ep=ep, steps=6), resume=middle)[0] for ep in then_ep}
    return losses, resumed


def test_a_run_at_fewer_experts_than_ranks_resumes_at_other_ep_and_back(tmp_path):
    sliced = run_on_ranks(_resume, 4, args=(str(tmp_path / "a"), 4, (2, 1)), timeout=400)
    whole = run_on_ranks(_resume, 4, args=(str(tmp_path / "b"), 1, (4,)), timeout=400)
    losses, resumed = sliced[0]
    assert len(losses) == 6
    # fp32 on purpose (the run as users run it): other layouts sum in other orders, so the
    # losses 3 steps after a resume agree to the last bits amplified by AdamW, seen <= 1e-6.
    for ep in (2, 1):  # ep = 4 (F-slices) -> ep = 2 (whole experts) and ep = 1
        assert resumed[ep] == pytest.approx(losses[3:], rel=1e-5), ep
    ep1_losses, back = whole[0]
    assert ep1_losses == pytest.approx(losses, rel=1e-5)  # ep = 1 and ep = 4: the same run
    assert back[4] == pytest.approx(ep1_losses[3:], rel=1e-5)  # ep = 1 -> ep = 4 (F-slices)
    meta = ckpt.read_meta(tmp_path / "a" / "first4" / "checkpoints" / "step_00000003")
    assert meta["parallel"] == {"dp": 1, "ep": 4, "dp_shard": 1}
