"""Upcycle a Hugging Face Llama (or Qwen2, or GPT-2) into an MoE model and train it expert-parallel
on 2 ranks.

    .venv/bin/python examples/hf_upcycle.py            # spawns 2 gloo ranks itself
    .venv/bin/python examples/hf_upcycle.py --model gpt2
    .venv/bin/torchrun --nproc-per-node 2 examples/hf_upcycle.py --out runs/hf_upcycle

1. A tiny Llama is built from its config class (nothing downloads; byte-level vocabulary of 256).
2. `moeflow.integrations.hf.upcycle` turns both MLPs into 8-expert top-2 MoE layers whose experts
   are copies of the MLP (GPT-2's with its biases and tanh GELU): the logits are the dense
   model's (checked).
3. `moeflow.parallel.parallelize` lays the experts out over the 2 ranks (ep = 2, 4 experts each);
   200 AdamW steps on the embedded corpus (the Python standard library's source, byte tokens),
   gradients synced by `GradSync`. The validation loss before and after is printed (bits/byte).
4. A DCP checkpoint is saved (`moeflow.train.checkpoint`), loaded into a freshly built model, and
   the reloaded model's logits are checked to equal the trained model's.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.data.config import DataConfig
from moeflow.data.corpus import load_corpus
from moeflow.data.stream import BatchStream
from moeflow.integrations.hf import upcycle
from moeflow.parallel import GradSync, ParallelDims, parallelize
from moeflow.train.checkpoint import load_checkpoint, save_checkpoint
from moeflow.train.distributed import (
    free_port,
    init_distributed,
    local_rank_env,
    shutdown,
)

SHAPE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 128}  # fmt: skip
GPT2 = {"vocab_size": 256, "n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4,
        "n_positions": 128, "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
# GPT-2's MLP: biases in both projections and gelu_new (tanh): the experts copy both.
EXPERTS = {"gpt2": {"activation": "gelu_tanh", "ffn_bias": True}}


def moe_config(model: str) -> MoEConfig:
    return MoEConfig(hidden_size=64, num_experts=8, ffn_hidden_size=128,
                     router=RouterConfig(top_k=2), **EXPERTS.get(model, {}))  # fmt: skip


def build(model: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model, **(GPT2 if model == "gpt2" else SHAPE))
    return AutoModelForCausalLM.from_config(config)


def mean_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def val_bits_per_byte(model, val, rank: int, world: int, windows: int = 16) -> float:
    """Cross-entropy over `windows` fixed validation windows of 64 bytes (this rank's share)."""
    model.eval()
    with torch.no_grad():
        losses = []
        for w in range(rank, windows, world):
            row = torch.from_numpy(val[w * 64 : w * 64 + 65].astype("int64"))
            logits = model(row[None, :-1]).logits
            losses.append(F.cross_entropy(logits[0], row[1:]).item())
    model.train()
    return mean_over_ranks(sum(losses) / len(losses)) / math.log(2)


def main(args) -> None:
    runtime = init_distributed(120.0)
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    ctx = ParallelDims(ep=world).build()
    moe = moe_config(args.model)
    model = build(args.model)
    probe = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    model.eval()  # GPT-2 has dropout
    with torch.no_grad():
        dense = model(probe).logits
        upcycle(model, moe)
        same = torch.allclose(model(probe).logits, dense, rtol=1e-5, atol=1e-6)
    model.train()
    say(f"upcycled {args.model}: 2 MLPs -> {moe.num_experts}-expert top-{moe.router.top_k} MoE "
        f"layers; logits equal to the dense model's: {same}")  # fmt: skip
    assert same
    parallelize(model, ctx)
    corpus = load_corpus(DataConfig(max_bytes=2_000_000))
    stream = BatchStream(
        corpus.train, seq_len=64, batch_size=8, rank=rank, world_size=world, seed=0
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sync = GradSync(model, ctx)
    before = val_bits_per_byte(model, corpus.val, rank, world)
    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    say(f"ep {world}: {len(layer.local_expert_ids)} experts per rank; "
        f"validation {before:.3f} bits/byte before training")  # fmt: skip
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = stream.next_batch()
        logits = model(x.long()).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.long().reshape(-1))
        loss.backward()
        sync.sync()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            say(f"step {step}: loss {mean_over_ranks(loss.item()):.3f}")
    after = val_bits_per_byte(model, corpus.val, rank, world)
    say(f"validation {after:.3f} bits/byte after {args.steps} steps "
        f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
    assert after < before, (before, after)
    path = save_checkpoint(args.out, args.steps, model, opt, meta={}, rank_state={})
    fresh = build(args.model, seed=1)
    upcycle(fresh, moe)
    parallelize(fresh, ctx)
    load_checkpoint(path, fresh, None)
    model.eval(), fresh.eval()
    with torch.no_grad():
        equal = torch.equal(fresh(probe).logits, model(probe).logits)
    say(f"saved {path}; reloaded into a fresh model: logits identical: {equal}")
    assert equal
    shutdown(runtime)


def _spawned(rank: int, world: int, port: int, args) -> None:
    os.environ.update(local_rank_env(rank, world, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    main(args)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--model", choices=("llama", "qwen2", "gpt2"), default="llama")
    p.add_argument("--out", default=None, help="checkpoint folder (default: a temporary one)")
    cli = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cli.out = cli.out or tmp
        if "WORLD_SIZE" in os.environ:  # launched by torchrun
            main(cli)
        else:
            mp.spawn(_spawned, args=(2, free_port(), cli), nprocs=2)
