"""The cost of document masking: forward + backward of the demo decoder (examples/configs/
tiny_cpu.toml: its model, seq_len and micro-batch) with `document_ids_BS` None (causal SDPA over
the whole window) against given (a boolean `[B, 1, S, S]` mask and per-row rotary tables), on
windows that pack ~4 documents each; then the same at seq_len 1024.

    .venv/bin/python bench/document_mask.py [--steps 10] [--warmup 3] [--threads 1]

CPU, float32, `torch.set_num_threads(threads)`. The two run in one process, interleaved step by
step (a slow spell of the machine hits both); "ms/step" is the median over the steps, the ratio
the median of the per-step ratios masked / unmasked. The masked step includes computing the
document ids from the end-of-document tokens (`document_ids`).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeflow.models.decoder import MoEDecoder  # noqa: E402
from moeflow.models.documents import document_ids  # noqa: E402
from moeflow.train.config import RunConfig  # noqa: E402

CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.toml"
EOD = 0
DOCS_PER_WINDOW = 4


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def windows(batch: int, seq_len: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Random tokens with `DOCS_PER_WINDOW - 1` end-of-document tokens at random places in each
    row (and none elsewhere): ~4 documents per window, of varied lengths."""
    tokens = torch.randint(1, vocab, (batch, seq_len + 1), generator=gen)
    for row in tokens:
        cuts = torch.randperm(seq_len - 1, generator=gen)[: DOCS_PER_WINDOW - 1]
        row[cuts] = EOD
    return tokens


def step(model: MoEDecoder, tokens: torch.Tensor, masked: bool) -> float:
    """Seconds of one forward + backward (the loss on the next tokens)."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    x, y = tokens[:, :-1], tokens[:, 1:]
    ids = document_ids(x, EOD) if masked else None
    model(x, y, document_ids_BS=ids).backward()
    return time.perf_counter() - t0


def measure(model: MoEDecoder, tokens: torch.Tensor, steps: int, warmup: int):
    for _ in range(warmup):
        step(model, tokens, False), step(model, tokens, True)
    plain, masked, ratios = [], [], []
    for _ in range(steps):
        a, b = step(model, tokens, False), step(model, tokens, True)
        plain.append(a)
        masked.append(b)
        ratios.append(b / a)
    return statistics.median(plain), statistics.median(masked), statistics.median(ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--long", type=int, default=1024, help="the second seq_len (0: skip it)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = RunConfig.from_toml(CONFIG)
    batch, base = run.train.micro_batch_size, run.train.seq_len
    m = run.model
    print(
        f"{cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, fp32 | "
        f"demo model dim={m.dim} layers={m.n_layers} heads={m.n_heads} "
        f"experts={m.moe.num_experts} top_k={m.moe.router.top_k} ffn={m.moe.ffn_hidden_size}, "
        f"micro-batch {batch}, ~{DOCS_PER_WINDOW} documents per window, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"{'seq_len':>7} {'unmasked ms/step':>17} {'masked ms/step':>15} {'masked/unmasked':>16}")
    for seq_len in (base, args.long) if args.long else (base,):
        cfg = dataclasses.replace(m, max_seq_len=max(m.max_seq_len, seq_len))
        torch.manual_seed(0)
        model = MoEDecoder(cfg)
        tokens = windows(batch, seq_len, cfg.vocab_size, torch.Generator().manual_seed(0))
        plain, masked, ratio = measure(model, tokens, args.steps, args.warmup)
        print(f"{seq_len:>7} {1e3 * plain:>17.1f} {1e3 * masked:>15.1f} {ratio:>16.3f}")


if __name__ == "__main__":
    main()
