"""The unigram baseline: the best context-free model of a source's validation ids (training id
frequencies, add-one), in bits per byte, for any tokenizer.

A prepared folder carries each split's id counts, so the baseline costs no read of the corpus;
other sources count a bounded, evenly spread sample of their ids (`SAMPLE` tokens at most).

Example:
    >>> src = Source("bytes", np.frombuffer(b"abab", np.uint8), np.frombuffer(b"ab", np.uint8),
    ...              "", bytes_per_token=1.0, vocab_size=256)
    >>> round(source_baseline(src)[0], 4)  # nats per token: -ln(3 / 260)
    4.4621
"""

from __future__ import annotations

import math

import numpy as np

from moeflow.data.source import Corpus, Source

SAMPLE = 1 << 24  # tokens per split counted where no counts were prepared
PIECES = 64  # ... in this many evenly spaced runs


def _sample_counts(tokens, minlength: int) -> np.ndarray:
    n = len(tokens)
    if n <= SAMPLE:
        return np.bincount(np.asarray(tokens).astype(np.int64), minlength=minlength)
    run = SAMPLE // PIECES
    counts = np.zeros(minlength, dtype=np.int64)
    for lo in np.linspace(0, n - run, PIECES).astype(np.int64):
        part = np.asarray(tokens[int(lo) : int(lo) + run]).astype(np.int64)
        found = np.bincount(part, minlength=len(counts))
        if len(found) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(found) - len(counts), np.int64)])
        counts += found
    return counts


def source_baseline(source: Source) -> tuple[float, float | None]:
    """(nats per validation token, bits per byte or None) of the unigram model of `source`."""
    vocab = source.vocab_size or 0
    if source.counts is not None:
        train, val = (np.asarray(c, dtype=np.int64) for c in source.counts)
    else:
        train = _sample_counts(source.train, vocab)
        val = _sample_counts(source.val, vocab)
    size = max(len(train), len(val), vocab)
    train = np.pad(train, (0, size - len(train)))
    val = np.pad(val, (0, size - len(val)))
    logp = np.log((train + 1.0) / (train.sum() + size))
    nats = float(-(val * logp).sum() / max(val.sum(), 1))
    bpt = source.bytes_per_token
    return nats, (nats / math.log(2) / bpt if bpt else None)


def corpus_baseline(corpus: Corpus) -> tuple[float, float | None, dict]:
    """The mixture's baseline (weighted as the sources are drawn) in nats per token and bits per
    byte, and each source's `{name: (nats, bpb)}`."""
    per = {s.name: source_baseline(s) for s in corpus.sources}
    return (*mix_losses(corpus, {k: v[0] for k, v in per.items()}), per)


def mix_losses(corpus: Corpus, nats: dict[str, float]) -> tuple[float, float | None]:
    """The mixture's loss from its sources' (nats per token, by name): their mean weighted as
    the sources are drawn, and its bits per byte (the weighted bits over the weighted bytes)."""
    w = np.array(corpus.weights) / sum(corpus.weights)
    loss = float(sum(wi * nats[s.name] for wi, s in zip(w, corpus.sources, strict=True)))
    bpts = [s.bytes_per_token for s in corpus.sources]
    if any(b is None for b in bpts):
        return loss, None
    return loss, loss / math.log(2) / float(np.dot(w, bpts))
