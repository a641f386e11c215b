"""The `start` record of metrics.jsonl: each rank's measured parameter, gradient and optimizer
bytes (its local tensors: under expert parallelism its own experts only) and the activations its
step kept for backward, on 2 gloo ranks at ep 2, with and without activation checkpointing."""

from __future__ import annotations

import json
from pathlib import Path

from moeflow.train.config import RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.trainer import Trainer
from tests.distributed import run_on_ranks


def _cfg(out: Path, checkpointing: bool) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
                      "moe": {"num_experts": 4, "ffn_hidden_size": 64}},
            "data": {"max_bytes": 100_000},
            "train": {"steps": 2, "seq_len": 32, "micro_batch_size": 4, "out_dir": str(out),
                      "eval_every": 0, "eval_windows": 8, "grad_accum_steps": 2,
                      "activation_checkpointing": checkpointing},
            "parallel": {"ep": 2},
            "metrics": {"progress": False, "plot": False, "log_every": 1},
        }
    )  # fmt: skip


def _run(rank, world, root):
    runtime = init_distributed(60)
    held = {}
    try:
        for checkpointing in (False, True):
            out = Path(root) / str(checkpointing)
            with Trainer(_cfg(out, checkpointing), runtime, None, True) as trainer:
                trainer.run(quiet=True)
                params = list(trainer.model.parameters())
                named = trainer.model.named_parameters()
                experts = sum(p.numel() * 4 for n, p in named if ".experts." in n)
                held[checkpointing] = (sum(p.numel() * 4 for p in params), len(params), experts)
    finally:
        shutdown(runtime)
    return held


def test_the_start_record_holds_what_each_rank_holds(tmp_path):
    ranks = run_on_ranks(_run, 2, args=(str(tmp_path),), timeout=240)
    starts = {}
    for checkpointing in (False, True):
        lines = (tmp_path / str(checkpointing) / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines]
        start = [r for r in records if r["kind"] == "start"]
        assert len(start) == 1 and start[0]["step"] == 1, start
        starts[checkpointing] = start[0]
        state = start[0]["state_bytes"]
        for rank, held in enumerate(ranks):
            param_bytes, tensors, _ = held[checkpointing]
            assert state["params"][rank] == param_bytes
            assert state["grads"][rank] == param_bytes  # every parameter has a gradient
            # AdamW: two moments per parameter, and a 4-byte step count per tensor.
            assert state["optimizer"][rank] == 2 * param_bytes + 4 * tensors
    # Each rank holds half of the experts: the same dense bytes, its own experts' bytes.
    experts = [held[False][2] for held in ranks]
    assert experts[0] == experts[1] > 0
    total_experts = 2 * 4 * (32 * 2 * 64 + 64 * 32) * 4  # 2 layers x 4 experts (SwiGLU w1, w2)
    assert sum(experts) == total_experts
    # The dry run's prediction of the same ranks' state, from the meta-device model alone.
    from moeflow.train.dry_run import dry_run

    predicted = dry_run(_cfg(tmp_path / "dry", False), world_size=2, device="cpu")[
        "state_bytes_per_rank"
    ]
    for kind, value in predicted.items():
        measured = starts[False]["state_bytes"][kind]
        assert all(abs(value - m) <= 0.05 * m for m in measured), (kind, value, measured)
    plain, recomputed = starts[False]["activation_bytes"], starts[True]["activation_bytes"]
    assert all(a > 0 for a in plain) and all(b < a for a, b in zip(plain, recomputed, strict=True))
