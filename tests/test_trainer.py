"""Trainer pieces: accumulation, activation checkpointing, EP-aware clipping, schedule, wandb."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moeflow.train.config import OptimConfig, RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.optim import build_optimizer, clip_grad_norm_, lr_at
from moeflow.train.trainer import Trainer, train
from tests.distributed import run_on_ranks


def cfg_for(out: Path, **train_kw) -> RunConfig:
    router = train_kw.pop("router", {})
    metrics = train_kw.pop("metrics", {})
    return RunConfig.from_dict(
        {
            "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
                      "moe": {"num_experts": 4, "ffn_hidden_size": 32, "router": router}},
            "data": {"max_bytes": 100_000},
            "train": {"steps": 3, "seq_len": 32, "micro_batch_size": 4, "out_dir": str(out),
                      "eval_every": 0, "eval_windows": 8, **train_kw},
            "metrics": {"progress": False, "plot": False, "log_every": 1, **metrics},
        }
    )  # fmt: skip


def params_after(cfg: RunConfig) -> dict[str, torch.Tensor]:
    runtime = init_distributed(60)
    try:
        # Float64: accumulation sums micro-batch gradients in another order than one big batch.
        trainer = Trainer(cfg, runtime, resume=None, overwrite=True, dtype=torch.float64)
        trainer.run(quiet=True)
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    finally:
        shutdown(runtime)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    # The balancing loss is per micro-batch by design (as in Megatron), so it is off here; the
    # z-loss is a mean over tokens and stays on.
    router = {"aux_loss_type": "none", "z_loss_coeff": 1e-3}
    big = params_after(cfg_for(tmp_path / "a", steps=2, micro_batch_size=8, router=router))
    small = params_after(
        cfg_for(tmp_path / "b", steps=2, micro_batch_size=4, grad_accum_steps=2, router=router)
    )
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-10, atol=1e-12, msg=name)


def test_activation_checkpointing_changes_nothing(tmp_path):
    # Recomputation runs the same kernels on the same inputs, so this holds bitwise in practice;
    # the tolerance only spares the test from a kernel that picks its blocking by thread timing.
    plain = train(cfg_for(tmp_path / "a"), quiet=True)
    ckpt = train(cfg_for(tmp_path / "b", activation_checkpointing=True), quiet=True)
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)
    assert ckpt.val_loss == pytest.approx(plain.val_loss, rel=1e-6)


def test_compiled_blocks_train_as_eager(tmp_path):
    """`train.compile`: the blocks compiled (inductor), with activation checkpointing around them,
    train to the eager parameters (float64: the same math) under the same names."""
    from torch._dynamo.utils import counters

    eager = params_after(cfg_for(tmp_path / "a", steps=2, activation_checkpointing=True))
    counters.clear()
    compiled = params_after(
        cfg_for(tmp_path / "b", steps=2, activation_checkpointing=True, compile=True)
    )
    assert counters["stats"]["unique_graphs"] >= 3  # before, after the MoE dispatch, and more
    assert list(compiled) == list(eager)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-10, atol=1e-12, msg=name)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    result = train(cfg_for(tmp_path, autocast="bf16", steps=4), quiet=True)
    assert all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0]


def _clip_on_ranks(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    dense = torch.nn.Parameter(torch.zeros(3))
    dense.grad = torch.tensor([1.0, 2.0, 2.0])  # identical on every rank after GradSync
    expert = torch.nn.Parameter(torch.zeros(2))
    expert.grad = torch.tensor([3.0, 4.0]) * (rank + 1)  # each rank holds other experts
    norm = clip_grad_norm_([dense], [expert], 1.0, group)
    return norm.item(), dense.grad.tolist(), expert.grad.tolist()


def test_clip_norm_counts_every_rank_experts_once():
    results = run_on_ranks(_clip_on_ranks, 2)
    expected = math.sqrt(9 + 25 + 100)
    for rank, (norm, dense, expert) in enumerate(results):
        assert norm == pytest.approx(expected)
        assert dense == pytest.approx([v / expected for v in (1, 2, 2)], rel=1e-5)
        assert expert == pytest.approx([v * (rank + 1) / expected for v in (3, 4)], rel=1e-5)


def test_schedule_and_decay_groups():
    cfg = OptimConfig(lr=2.0, warmup_steps=4, min_lr_ratio=0.0)
    assert [lr_at(s, cfg, 8) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert lr_at(6, cfg, 8) == pytest.approx(1.0) and lr_at(8, cfg, 8) == pytest.approx(0.0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.5))
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]


# (fused, foreach) as AdamW records them, per `optim.implementation` (on CPU).
KINDS = {"for_loop": (None, False), "foreach": (None, True), "fused": (True, None),
         "auto": (None, True)}  # fmt: skip


def test_optimizer_implementations_compute_the_same_update(monkeypatch):
    """fused, foreach and for_loop AdamW: the same parameters after 3 steps, to fp32 rounding
    (each evaluates the update's expression in its own order: a few ulps of the values, ~1e-6
    relative at most here); `auto` is foreach on CPU and fused on CUDA."""
    from moeflow.train.optim import implementation_for

    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)] for _ in range(3)]
    finals = {}
    for how in ("for_loop", "foreach", "fused", "auto"):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 4)
        opt = build_optimizer(model, OptimConfig(implementation=how, weight_decay=0.1))
        for step_grads in grads:
            for p, g in zip(model.parameters(), step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        finals[how] = [p.detach().clone() for p in model.parameters()]
        assert (opt.defaults["fused"], opt.defaults["foreach"]) == KINDS[how]
    for how, params in finals.items():
        for got, want in zip(params, finals["for_loop"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=how)
    torch.manual_seed(0)
    assert finals["for_loop"][0].ne(torch.nn.Linear(3, 4).weight).all()  # the steps moved it
    assert implementation_for(OptimConfig(), torch.device("cuda")) == "fused"
    with pytest.raises(ValueError, match=r"optim.implementation \('unfused'\) must be one of"):
        OptimConfig(implementation="unfused")

    def no_fused_kernel(*args, **kwargs):
        raise RuntimeError("`fused=True` requires all the params to be of supported devices")

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)
    with pytest.raises(
        ValueError,
        match=r"optim.implementation \('fused', here 'fused'\) "
        r"cannot update these parameters \(cpu\).*'foreach'",
    ):
        build_optimizer(torch.nn.Linear(3, 3), OptimConfig(implementation="fused"))


def test_wandb_logs_offline_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = cfg_for(tmp_path, steps=2, metrics={"wandb": True, "wandb_mode": "offline"})
    train(cfg, quiet=True)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
