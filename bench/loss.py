"""The chunked loss against the plain one: forward + backward of the output head and the
cross-entropy, time and the bytes autograd keeps, at the demo's vocabulary (256) and at 50,257.

    OMP_NUM_THREADS=2 .venv/bin/python bench/loss.py [--tokens 4096] [--dim 256] [--repeats 7]

Both run in one process, interleaved per repeat (a slow spell of the machine hits both); the
ratio is the median of the per-repeat ratios. "kept" is the sum of the tensors saved for backward
(saved-tensor hooks), "largest" the largest of them: the plain loss keeps the fp32 logits.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow.train.loss import chunked_token_loss, token_loss


def step(fn, h, w):
    """Seconds of one forward + backward, and (sum, largest) bytes saved for backward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    h.grad = w.grad = None
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return time.perf_counter() - t0, sum(sizes), max(sizes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"T={args.tokens} D={args.dim} chunk={args.chunk}, fp32"
    )
    print(
        f"{'vocab':>6} {'plain ms':>9} {'chunked ms':>11} {'ratio':>6} {'plain kept MB':>14} "
        f"{'chunked kept MB':>16} {'largest MB (plain/chunked)':>28}"
    )
    for vocab in (256, 50257):
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(args.tokens, args.dim, generator=gen, requires_grad=True)
        w = torch.randn(vocab, args.dim, generator=gen).mul_(0.02).requires_grad_(True)
        y = torch.randint(0, vocab, (args.tokens,), generator=gen)

        def plain(h=h, w=w, y=y):
            return token_loss(h @ w.T, y)

        def chunked(h=h, w=w, y=y):
            return chunked_token_loss(h, w, y, args.chunk)

        step(plain, h, w), step(chunked, h, w)  # warm-up
        ratios, times = [], {"plain": [], "chunked": []}
        for _ in range(args.repeats):
            a, kept_a, big_a = step(plain, h, w)
            b, kept_b, big_b = step(chunked, h, w)
            times["plain"].append(a)
            times["chunked"].append(b)
            ratios.append(b / a)
        print(
            f"{vocab:>6} {1e3 * statistics.median(times['plain']):>9.2f} "
            f"{1e3 * statistics.median(times['chunked']):>11.2f} {statistics.median(ratios):>6.2f} "
            f"{kept_a / 2**20:>14.1f} {kept_b / 2**20:>16.1f} "
            f"{big_a / 2**20:>13.1f} / {big_b / 2**20:<.1f}"
        )


if __name__ == "__main__":
    main()
