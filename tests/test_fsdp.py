"""Sharded data parallelism (FSDP2: `parallel.dp_shard`, `moeflow.parallel.fsdp`) against the
replicated run, on 4 gloo ranks (one spawn serves every check of a kind):

- float64, the library API: the gradients of a sharded model (dp_shard 2 x ep 2, dp_shard 4,
  dp_replicate 2 x dp_shard 2) are the replicated model's to 1e-10, and so in every mode per call;
- fp32, the trainer: every step's loss equals the replicated run's (rel 1e-5: the same math, the
  reductions summed in another order) with re-placement and a replica slot, with `mode = "auto"`,
  with HSDP, with 2 accumulation steps and activation checkpointing; each rank holds at most 1.1 x
  a quarter of the replicated state;
- checkpoints reshard: written at dp_shard 2 x ep 2, resumed there (bit-identical losses) and at
  4 x 1, 1 x 4, replicated, and at world size 1 (the same validation loss), and back; a replicated
  (today's format) checkpoint resumes sharded;
- MoE++ with a shared expert, RMoE's shared GRU, the non-finite guard skipping updates, a Hugging
  Face model (`[model] hf_config`), and a SIGTERM checkpoint, sharded as replicated;
- bf16 parameters: fp32 master weights and AdamW state, bf16 compute, a loss near the fp32 one;
- DeepSpeed's `prepare` refuses a sharded model, in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from moeflow.train.config import RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.trainer import Trainer
from tests.distributed import run_on_ranks
from tests.test_hf_train import QWEN2_MOE

MODEL = {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
         "moe": {"num_experts": 4, "ffn_hidden_size": 64}}  # fmt: skip


def run_cfg(out: Path, ep: int, dp_shard: int, steps: int = 4, **sections) -> RunConfig:
    d = {
        "model": MODEL,
        "data": {"max_bytes": 100_000},
        "train": {"steps": steps, "seq_len": 32, "micro_batch_size": 2, "out_dir": str(out),
                  "eval_every": 0, "eval_windows": 8},
        "parallel": {"ep": ep, "dp_shard": dp_shard},
        "checkpoint": {"every": 2},
        "metrics": {"progress": False, "plot": False, "log_every": 1},
    }  # fmt: skip
    for name, values in sections.items():  # a model section replaces the tiny one
        d[name] = values if name == "model" else {**d.get(name, {}), **values}
    return RunConfig.from_dict(d)


# -- float64: the library API ---------------------------------------------------------------------
def _build(ctx, shard: bool):
    from moeflow.models.decoder import MoEDecoder
    from moeflow.parallel import parallelize
    from moeflow.parallel.fsdp import shard_model

    with torch.device("meta"):
        model = MoEDecoder(run_cfg(Path("unused"), 1, 1).model)
    parallelize(model, ctx)
    model.to_empty(device="cpu")
    model.init_weights(seed=3)
    model.double()
    return shard_model(model, ctx) if shard else model


def _gradients(model, ctx, rank: int, mode: str) -> tuple[float, dict]:
    from moeflow.parallel import set_parallel_mode
    from moeflow.parallel.grad_sync import GradSync

    set_parallel_mode(model, mode)
    sync = GradSync(model, ctx)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(rank))
    loss = model(x, x)
    loss.backward()
    sync.sync()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name] = g.clone()
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _accumulation_reduces_once(ctx, model, rank: int) -> tuple[int, int, int]:
    """Reduce-scatters issued by two micro-batches' backward, the first under `no_sync`."""
    import torch.distributed as dist

    from moeflow.parallel.grad_sync import GradSync

    sync, calls, real = GradSync(model, ctx), [], dist.reduce_scatter_single
    dist.reduce_scatter_single = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(rank))
        with sync.no_sync():
            model(x, x).backward()
        first = len(calls)
        model(x, x).backward()
    finally:
        dist.reduce_scatter_single = real
    model.zero_grad(set_to_none=True)
    # One reduce-scatter per parameter group of each unit (a block's dense and expert weights
    # are two groups, on their own meshes).
    groups = sum(len(m._get_fsdp_state()._fsdp_param_groups) for m in model.modules()
                 if isinstance(m, FSDPModule))  # fmt: skip
    return first, len(calls), groups


def _library_checks(rank, world):
    from moeflow.parallel import ParallelDims

    worst = {}
    for ep, shard, modes in ((2, 2, ("ep", "sharded", "dp")), (1, 4, ("ep",)), (1, 2, ("ep",))):
        reference = _build(ParallelDims(dp=world // ep, ep=ep).build(), shard=False)
        ctx = ParallelDims(dp=world // ep, ep=ep, dp_shard=shard).build()
        sharded = _build(ctx, shard=True)
        assert isinstance(sharded.blocks[0].ffn.experts.w1, DTensor)
        loss0, g0 = _gradients(reference, ctx, rank, "ep")
        for mode in modes:
            loss1, g1 = _gradients(sharded, ctx, rank, mode)
            scale = max(g.abs().max().item() for g in g0.values())
            err = max((g0[n] - g1[n]).abs().max().item() for n in g0) / scale
            worst[(ep, shard, mode)] = (abs(loss1 - loss0) / loss0, err)
    # Gradient accumulation: nothing reduced until the last micro-batch, then every unit once.
    worst["reduce-scatters"] = _accumulation_reduces_once(ctx, sharded, rank)
    return worst


def _bf16_and_refusals(rank, world, root):
    from moeflow.integrations.deepspeed import prepare

    runtime = init_distributed(60)
    try:
        losses = {}
        for dtype in ("fp32", "bf16"):
            cfg = run_cfg(Path(root) / dtype, 2, 2, steps=3, train={"param_dtype": dtype})
            with Trainer(cfg, runtime, None, True) as trainer:
                seen = []
                block = trainer.model.blocks[0]
                hook = block.attn.register_forward_pre_hook(
                    lambda m, args, seen=seen: seen.append(m.qkv.weight.dtype)
                )
                losses[dtype] = trainer.run(quiet=True).losses
                hook.remove()
                w1 = trainer.model.blocks[0].ffn.experts.w1
                state = trainer.optimizer.state[w1]
                dtypes = (w1.dtype, state["exp_avg"].dtype, seen[0])
                if dtype == "bf16":
                    bf16 = dtypes
                    with pytest.raises(ValueError) as refused:
                        prepare(trainer.model, trainer.ctx)
    finally:
        shutdown(runtime)
    return losses, bf16, str(refused.value)


def test_sharded_gradients_are_the_replicated_ones_in_float64_and_bf16_keeps_fp32_state(tmp_path):
    worst = run_on_ranks(_library_checks, 4, timeout=300)
    for rank_worst in worst:
        first, last, groups = rank_worst.pop("reduce-scatters")
        assert first == 0 and last == groups >= 3
        for case, (loss_err, grad_err) in rank_worst.items():
            assert loss_err < 1e-12 and grad_err < 1e-10, (case, loss_err, grad_err)
    assert {mode for _, _, mode in worst[0]} == {"ep", "sharded", "dp"}
    ranks = run_on_ranks(_bf16_and_refusals, 4, args=(str(tmp_path),), timeout=300)
    losses, dtypes, refused = ranks[0]
    # Master weights and AdamW moments in fp32, the block computing from bf16 copies.
    assert dtypes == (torch.float32, torch.float32, torch.bfloat16)
    # bf16 compute (8 significant bits) on the same data: within 1% of the fp32 losses.
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"], strict=True):
        assert abs(bf16 - fp32) / fp32 < 1e-2
    assert "\n" not in refused and "dp_shard" in refused and "DeepSpeed" in refused


# -- fp32: the trainer ----------------------------------------------------------------------------
def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _run(runtime, cfg, resume=None) -> list[float]:
    with Trainer(cfg, runtime, resume, resume is None) as trainer:
        return trainer.run(quiet=True).losses


def _evaluate(runtime, cfg, path) -> float:
    with Trainer(cfg, runtime, path, False) as trainer:
        trainer._load()
        return trainer.evaluate()["val_loss"]


# (name, ep, dp_shard, sections): each compared with the replicated run of its baseline.
PLACE = {"every": 2, "min_steps": 2, "replica_slots": 1, "min_gain": 0.0, "method": "greedy"}
CASES = [
    ("replicated", 2, 1, {}),
    ("2x2 re-placed", 2, 2, {"placement": PLACE}),
    ("2x2 auto", 2, 2, {"parallel": {"mode": "auto"},
                        "tuner": {"first_check": 1, "check_every": 1}}),
    ("hsdp 2x2", 1, 2, {}),
    ("4", 1, 4, {}),
    ("replicated accum", 1, 1, {"train": {"grad_accum_steps": 2,
                                          "activation_checkpointing": True}}),
    ("2x2 accum", 2, 2, {"train": {"grad_accum_steps": 2, "activation_checkpointing": True}}),
    ("replicated ep1", 1, 1, {}),
]  # fmt: skip
# Features that change what is sharded or how a step ends: each sharded (2 x 2) and replicated.
MOEPP = {
    "num_experts": 4,
    "ffn_hidden_size": 64,
    "shared_expert_ffn_hidden_size": 32,
    "router": {"type": "moepp", "zero_experts": 1, "copy_experts": 1},
}
RMOE = {"num_experts": 4, "ffn_hidden_size": 64, "router": {"type": "rmoe", "rnn_dim": 8}}
FEATURES = {
    "moe++ shared": {"model": {**MODEL, "moe": MOEPP}},
    "rmoe": {"model": {**MODEL, "moe": RMOE}},
    "skip": {"train": {"on_nonfinite": "skip"}, "optim": {"lr": 1e30}},
    "hf qwen2-moe": {"model": {"hf_config": QWEN2_MOE, "moe": {}}},
}  # fmt: skip
for _name, _sections in FEATURES.items():
    CASES += [(f"{_name} replicated", 2, 1, _sections), (f"{_name} 2x2", 2, 2, _sections)]


def _trainer_checks(rank, world, root):
    root = Path(root)
    runtime = init_distributed(60)
    out = {}
    try:
        for name, ep, shard, sections in CASES:
            out[name] = _run(runtime, run_cfg(root / name, ep, shard, **sections))
        # Resumed from the 2 x 2 run's step-2 checkpoint: at its layout, and at others.
        written = root / "2x2 auto" / "checkpoints" / "step_00000002"
        for ep, shard in ((2, 2), (1, 4), (4, 1), (2, 1), (1, 1)):
            cfg = run_cfg(
                root / f"resume {ep}x{shard}",
                ep,
                shard,
                parallel={"mode": "auto"},
                tuner={"first_check": 1, "check_every": 1},
            )
            _copy(rank, written, root / f"resume {ep}x{shard}" / "checkpoints" / written.name)
            out[f"resume {ep}x{shard}"] = _run(runtime, cfg, resume="latest")
            out[f"eval {ep}x{shard}"] = _evaluate(runtime, cfg, str(written))
        # SIGTERM on one rank during step 3: every rank checkpoints after it, and resuming from
        # that checkpoint gives the uninterrupted losses.
        cfg = run_cfg(root / "sigterm", 2, 2)
        with Trainer(cfg, runtime, None, True) as trainer:
            calls = []

            def stop(module, args):
                calls.append(1)
                if rank == 1 and len(calls) == 3:
                    os.kill(os.getpid(), signal.SIGTERM)

            trainer.model.register_forward_pre_hook(stop)
            result = trainer.run(quiet=True)
        out["sigterm"] = (result.losses, result.stopped_by_signal, result.checkpoint.name)
        out["after sigterm"] = _run(runtime, cfg, resume="latest")
        # Today's (replicated) checkpoint resumed sharded.
        back = root / "back"
        _copy(rank, root / "replicated" / "checkpoints" / written.name,
              back / "checkpoints" / written.name)  # fmt: skip
        out["replicated -> 2x2"] = _run(runtime, run_cfg(back, 2, 2), resume="latest")
    finally:
        shutdown(runtime)
    return out


def _copy(rank: int, source: Path, target: Path) -> None:
    if rank == 0:
        shutil.copytree(source, target)
    torch.distributed.barrier()


def _relative(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def test_sharded_training_is_the_replicated_training_and_its_checkpoints_reshard(tmp_path):
    ranks = run_on_ranks(_trainer_checks, 4, args=(str(tmp_path),), timeout=600)
    out = ranks[0]
    base, accum = out["replicated"], out["replicated accum"]
    for name in ("2x2 re-placed", "2x2 auto", "hsdp 2x2", "4", "replicated ep1"):
        assert _relative(base, out[name]) < 1e-5, name
    for name in FEATURES:
        assert _relative(out[f"{name} replicated"], out[f"{name} 2x2"]) < 1e-5, name
    skipped = [r["skipped_steps"] for r in _records(tmp_path / "skip 2x2") if r["kind"] == "train"]
    assert skipped[-1] >= 3  # lr 1e30: the guard skips the updates, sharded as replicated
    assert _relative(accum, out["2x2 accum"]) < 1e-5
    records = {name: _records(tmp_path / name) for name, *_ in CASES}
    # The clipped gradient norm (every expert counted once, replicas too) is the replicated one.
    norms = {n: [r["grad_norm"] for r in records[n] if r["kind"] == "train"] for n in records}
    for name in ("2x2 re-placed", "hsdp 2x2", "4"):
        assert _relative(norms["replicated"], norms[name]) < 1e-5, name
    assert any(r["kind"] == "placement" for r in records["2x2 re-placed"])
    assert any(r["kind"] == "runtime" for r in records["2x2 auto"])
    # Memory: a rank holds about a quarter of the fully replicated state at dp_shard 4.
    full = next(r for r in records["replicated ep1"] if r["kind"] == "start")["state_bytes"]
    quarter = next(r for r in records["4"] if r["kind"] == "start")["state_bytes"]
    for part in ("params", "grads", "optimizer"):
        assert max(quarter[part]) <= 1.1 * full[part][0] / 4, part
    # The dry run predicts what the ranks measured: state within 5%, activations within 25%.
    from moeflow.train.dry_run import dry_run

    for name, ep, shard, sections in CASES:
        if name not in ("4", "2x2 re-placed", "2x2 accum", "replicated ep1"):
            continue
        cfg = run_cfg(tmp_path / "dry", ep, shard, **sections)
        predicted = dry_run(cfg, world_size=4, device="cpu")
        start = next(r for r in records[name] if r["kind"] == "start")
        for kind, value in predicted["state_bytes_per_rank"].items():
            measured = start["state_bytes"][kind]
            assert all(abs(value - m) <= 0.05 * m for m in measured), (name, kind, value, measured)
        acts = predicted["memory"]["activations"]
        for m in start["activation_bytes"]:
            assert abs(acts - m) <= 0.25 * m, (name, acts, start["activation_bytes"])
    # Resumed at step 2: the same layout gives the same losses bit for bit, the others the same
    # within fp32 reduction order; the validation loss of the checkpoint is the same everywhere.
    auto = out["2x2 auto"]
    assert out["resume 2x2"] == auto[2:]
    for ep, shard in ((1, 4), (4, 1), (2, 1), (1, 1)):
        assert _relative(auto[2:], out[f"resume {ep}x{shard}"]) < 1e-5, (ep, shard)
        assert abs(out[f"eval {ep}x{shard}"] - out["eval 2x2"]) < 1e-5 * out["eval 2x2"]
    assert _relative(base[2:], out["replicated -> 2x2"]) < 1e-5
    losses, stopped, where = out["sigterm"]
    assert stopped and where == "step_00000003" and len(losses) == 3
    assert _relative(base, losses + out["after sigterm"]) < 1e-5
    # World size 1 reads the 2 x 2 checkpoint, and 2 x 2 reads what world size 1 wrote.
    written = tmp_path / "2x2 auto" / "checkpoints" / "step_00000002"
    runtime = init_distributed(60)
    try:
        one = run_cfg(tmp_path / "one", 1, 1, steps=3)
        assert abs(_evaluate(runtime, one, str(written)) - out["eval 2x2"]) < 1e-5
        shutil.copytree(written, tmp_path / "one" / "checkpoints" / written.name)
        _run(runtime, one, resume="latest")
        alone = _evaluate(runtime, one, str(tmp_path / "one" / "checkpoints" / "step_00000003"))
    finally:
        shutdown(runtime)
    step3 = str(tmp_path / "one" / "checkpoints" / "step_00000003")
    again = run_on_ranks(_evaluate_on_ranks, 4, args=(str(tmp_path / "again"), step3))
    assert abs(again[0] - alone) < 1e-5 * alone


def _evaluate_on_ranks(rank, world, out, path):
    runtime = init_distributed(60)
    try:
        return _evaluate(runtime, run_cfg(Path(out), 2, 2, steps=3), path)
    finally:
        shutdown(runtime)


# -- bad input: one line each, before any work ----------------------------------------------------
def test_bad_sharding_input_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    from moeflow.train.config import TrainConfig
    from tests.test_cli import in_process

    recipe = "examples/configs/olmoe_1b7b_64gpu.toml"
    code, err = in_process(capsys, "train", recipe, "--dry-run", "--world-size", "64",
                           "--parallel.dp_shard", "3")  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "parallel.dp_shard (3) must divide the data-parallel degree (8" in err
    assert "choose one of [1, 2, 4, 8]" in err
    out = tmp_path / "never"
    code, err = in_process(capsys, "launch", "--nproc", "2", "--", "train", recipe,
                           "--parallel.ep", "1", "--parallel.dp_shard", "4",
                           "--train.out_dir", str(out))  # fmt: skip
    assert code == 2 and "parallel.dp_shard (4) must divide" in err and not out.exists()
    with pytest.raises(ValueError, match=r"train.param_dtype \('fp8'\) must be one of"):
        RunConfig.from_dict({"train": {"param_dtype": "fp8"}})
    # bf16 on a GPU without it (what torch reports for a V100), checked at start-up.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-32GB")
    with pytest.raises(ValueError, match=r"this GPU \(Tesla V100-SXM2-32GB\) has no bf16; set"):
        TrainConfig(param_dtype="bf16").param_dtype_for(torch.device("cuda"))
    assert TrainConfig().param_dtype_for(torch.device("cuda")) == "fp32"  # auto falls back
    # A checkpoint of another expert count: refused before anything is built, naming the field.
    runtime = init_distributed(60)
    try:
        _run(runtime, run_cfg(tmp_path / "four", 1, 1, steps=1))
        eight = {**MODEL, "moe": {**MODEL["moe"], "num_experts": 8}}
        with pytest.raises(ValueError) as refused:
            _run(runtime, run_cfg(tmp_path / "four", 1, 1, steps=2, model=eight), "latest")
    finally:
        shutdown(runtime)
    assert "model.moe.num_experts is 4 there, 8 here" in str(refused.value)
