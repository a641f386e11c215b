"""The chunked loss: the plain cross-entropy's value and gradients (float64), without the
`[tokens, vocab]` logits ever being held, and a trainer run with it equal to one without."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow.train.config import RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.loss import chunked_token_loss, token_loss
from moeflow.train.trainer import Trainer


@pytest.mark.parametrize("chunk", [1, 7, 16, 50])
def test_chunked_loss_has_the_plain_value_and_gradients(chunk):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(13, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randint(0, 13, (3, 11), generator=gen)
    plain = token_loss(h @ w.T, y)
    gh, gw = torch.autograd.grad(plain, (h, w))
    chunked = chunked_token_loss(h, w, y, chunk)
    ch, cw = torch.autograd.grad(chunked, (h, w))
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(ch, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cw, gw, rtol=1e-10, atol=1e-12)


def largest_saved(fn) -> int:
    """The largest tensor (elements) autograd keeps for backward while `fn()` runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().backward()
    return max(sizes)


def test_the_chunked_loss_never_keeps_the_logits():
    tokens, vocab, dim = 64, 1000, 16
    h = torch.randn(tokens, dim, requires_grad=True)
    w = torch.randn(vocab, dim, requires_grad=True)
    y = torch.randint(0, vocab, (tokens,))
    assert largest_saved(lambda: token_loss(h @ w.T, y)) >= tokens * vocab
    # A chunk's inputs (the head's weight is the largest) and never more than one chunk's logits.
    assert largest_saved(lambda: chunked_token_loss(h, w, y, 8)) <= max(vocab * dim, 8 * vocab)


def _cfg(out: Path, chunk: int) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
                      "moe": {"num_experts": 4, "ffn_hidden_size": 32}},
            "data": {"max_bytes": 100_000},
            "train": {"steps": 3, "seq_len": 32, "micro_batch_size": 2, "out_dir": str(out),
                      "eval_every": 0, "eval_windows": 8, "loss_chunk_tokens": chunk},
            "metrics": {"progress": False, "plot": False, "log_every": 1},
        }
    )  # fmt: skip


def test_a_run_with_the_chunked_loss_equals_the_plain_one(tmp_path):
    runs = {}
    runtime = init_distributed(60)
    try:
        for chunk in (0, 24):  # 64 tokens per micro-batch: chunks of 24, 24 and 16
            with Trainer(_cfg(tmp_path / str(chunk), chunk), runtime, None, True,
                         torch.float64) as trainer:  # fmt: skip
                result = trainer.run(quiet=True)
                params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            runs[chunk] = (result.losses, result.val_loss, params)
    finally:
        shutdown(runtime)
    (plain, val, params), (chunked, val_c, params_c) = runs[0], runs[24]
    assert chunked == pytest.approx(plain, rel=1e-12) and val_c == pytest.approx(val, rel=1e-12)
    for name, p in params.items():
        torch.testing.assert_close(params_c[name], p, rtol=1e-10, atol=1e-12, msg=name)
