"""Quick start: a small byte-level transformer whose FFNs are MoELayers, trained on CPU.

    make quickstart                                     # sets up .venv, then runs this file
    .venv/bin/python examples/quickstart.py --steps 300  # the same, by hand

The text is the Python standard library's own source (present on every machine, no download), split
by file as `moeflow train` does (`moeflow.data`). For the full trainer (checkpoints, expert
parallelism, metrics) see `make demo` and examples/configs/. Prints the
training loss, the validation loss in bits per byte against the unigram baseline, and each layer's
share of tokens per expert, so you can watch the balancing loss work.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.data.config import DataConfig
from moeflow.data.corpus import load_corpus
from moeflow.train.trainer import unigram_bpb
from moeflow.utils import keep_freed_memory


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, moe: MoEConfig) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.RMSNorm(dim)
        self.moe = MoELayer(moe)  # the FFN slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.moe(self.norm2(x))


class TinyMoEGPT(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, seq_len: int, moe: MoEConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, moe) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batch(data: torch.Tensor, size: int, seq_len: int, gen: torch.Generator):
    starts = torch.randint(0, len(data) - seq_len - 1, (size,), generator=gen)
    x = torch.stack([data[s : s + seq_len] for s in starts])
    y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts])
    return x, y


@torch.no_grad()
def validation_bpb(model: nn.Module, val: torch.Tensor, seq_len: int, batches: int = 8) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same validation windows every time
    losses = []
    for _ in range(batches):
        x, y = batch(val, 16, seq_len, gen)
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses) / math.log(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    keep_freed_memory()  # CPU: reuse freed activations instead of page-faulting them in again
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    torch.manual_seed(args.seed)
    corpus = load_corpus(DataConfig(max_bytes=4_000_000))  # the stdlib corpus of `moeflow train`
    train, val = (torch.from_numpy(a.astype("int64")) for a in (corpus.train, corpus.val))
    moe = MoEConfig(
        hidden_size=args.dim,
        num_experts=args.experts,
        ffn_hidden_size=2 * args.dim,
        router=RouterConfig(top_k=args.top_k, aux_loss_coeff=1e-2, z_loss_coeff=1e-3),
    )
    model = TinyMoEGPT(args.dim, args.layers, 4, args.seq_len, moe)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"moeflow quickstart: {n_params / 1e6:.2f}M params, {args.layers} MoE layers x "
        f"{args.experts} experts (top-{args.top_k}); {len(train) / 1e6:.1f} MB train / "
        f"{len(val) / 1e6:.2f} MB validation bytes of Python stdlib source"
    )
    baseline = unigram_bpb(corpus)
    print(
        f"unigram baseline: {baseline:.3f} bits/byte; step 0 validation: "
        f"{validation_bpb(model, val, args.seq_len):.3f} bits/byte"
    )
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch(train, args.batch_size, args.seq_len, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # the MoE balancing losses ride along; no change to the loop
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            tok_s = step * args.batch_size * args.seq_len / (time.perf_counter() - t0)
            print(
                f"step {step:4d}  loss {loss.item():.3f}  "
                f"val {validation_bpb(model, val, args.seq_len):.3f} bits/byte  {tok_s:,.0f} tok/s"
            )
            for i, block in enumerate(model.blocks):
                stats = block.moe.last_stats
                share = stats.tokens_per_expert.float() / stats.tokens_per_expert.sum()
                loads = " ".join(f"{v:.2f}" for v in share.tolist())
                print(
                    f"    layer {i} expert load [{loads}]  aux {stats.aux_loss.item():.3f}  "
                    f"max violation {stats.max_load_violation.item():+.0%}"
                )
    final = validation_bpb(model, val, args.seq_len, batches=16)
    print(
        f"final validation {final:.3f} bits/byte vs unigram {baseline:.3f} "
        f"({'below' if final < baseline else 'NOT below'} the baseline)"
    )


if __name__ == "__main__":
    main()
