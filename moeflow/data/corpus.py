"""A run's sources from `[data]`, checked against each other, against the model's vocabulary and
against the run's window before the first step.

Example:
    >>> from moeflow.data.config import DataConfig
    >>> corpus = load_corpus(DataConfig(max_bytes=50_000))
    >>> corpus.names, corpus.sources[0].bytes_per_token
    (['stdlib'], 1.0)
"""

from __future__ import annotations

import numpy as np

from moeflow.data.byte_corpus import byte_source
from moeflow.data.config import DataConfig
from moeflow.data.prepared import megatron_source, prepared_source
from moeflow.data.source import Corpus, Source
from moeflow.data.stream import check_validation_split


def load_corpus(cfg: DataConfig) -> Corpus:
    """Open (memory-map, or for byte corpora read) the sources that `cfg` names."""
    if cfg.kind in ("stdlib", "text", "tokens"):
        source = byte_source(cfg)
        if cfg.kind == "stdlib":
            source.name = "stdlib"
        return Corpus([source])
    eod = None
    wanted = None
    if cfg.tokenizer:
        from moeflow.data.tokenizer import load_tokenizer

        wanted = load_tokenizer(cfg.tokenizer).info
        eod = wanted.eod_id
    if cfg.kind == "prepared":
        sources = [prepared_source(s) for s in cfg.source_list()]
    else:
        if cfg.document_mask and eod is None:
            raise ValueError(
                "data.document_mask with data.kind = 'megatron' needs data.tokenizer (the "
                "end-of-document id of the corpus's tokenizer)"
            )
        sources = [megatron_source(s, cfg.val_percent, eod, cfg.document_mask)
                   for s in cfg.source_list()]  # fmt: skip
    _check_tokenizers(sources, wanted, cfg.tokenizer)
    return Corpus(sources)


def _check_tokenizers(sources: list[Source], wanted, wanted_path: str | None) -> None:
    """Every source's ids from one tokenizer: the run's (`data.tokenizer`), or the first's."""
    described = [s for s in sources if s.tokenizer is not None]
    if wanted is None and described:
        wanted, wanted_path = described[0].tokenizer, f"{described[0].name}'s manifest"
    for s in described:
        if s.tokenizer.hash != wanted.hash:
            raise ValueError(
                f"data: {s.name} was tokenized by {s.tokenizer.name!r} ({s.tokenizer.hash[:19]}), "
                f"not by {wanted.name!r} ({wanted.hash[:19]}, {wanted_path}): one model reads "
                "one tokenizer's ids; prepare it again with that tokenizer"
            )


def check_vocab(corpus: Corpus, vocab_size: int) -> None:
    """Each described source's tokenizer fits the model's embedding (its manifest says so; no
    token is read)."""
    for s in corpus.sources:
        if s.vocab_size is not None and s.vocab_size > vocab_size:
            what = f"tokenizer {s.tokenizer.name!r}" if s.tokenizer else "byte tokens"
            raise ValueError(
                f"data: {s.name}'s {what} has {s.vocab_size:,} ids but model.vocab_size is "
                f"{vocab_size:,}; set model.vocab_size = {s.vocab_size}"
            )


def check_tokens(tokens, vocab_size: int, what: str, offset: int = 0, chunk: int = 1 << 24) -> None:
    """Every id of `tokens` (positions `offset...` of `what`) below `vocab_size` (the model's
    embedding rows), scanned in chunks before the first step: an id past it would fail mid-run
    as an index error.

    Example:
        >>> try:
        ...     check_tokens(np.array([1, 7, 300], dtype=np.uint16), 256, "train.bin", offset=10)
        ... except ValueError as exc:
        ...     print(str(exc)[:88])
        data: train.bin holds token id 300 at position 12, outside 0..model.vocab_size - 1 (255)
    """
    for lo in range(0, len(tokens), chunk):
        part = np.asarray(tokens[lo : lo + chunk])
        if len(part) and (int(part.max()) >= vocab_size or int(part.min()) < 0):
            at = lo + int(np.argmax((part >= vocab_size) | (part < 0)))
            raise ValueError(
                f"data: {what} holds token id {int(tokens[at])} at position {offset + at}, "
                f"outside 0..model.vocab_size - 1 ({vocab_size - 1}); raise model.vocab_size or "
                "re-tokenize"
            )


def check_corpus(corpus: Corpus, vocab_size: int, seq_len: int, rank: int, world: int) -> None:
    """Before the first step: the vocabulary, a validation window per source, and (for ids no
    manifest describes) this rank's part of each split scanned for ids past the vocabulary."""
    check_vocab(corpus, vocab_size)
    for s in corpus.sources:
        what = f"{s.name}'s validation split" if len(corpus.sources) > 1 else "the validation split"
        check_validation_split(s.val, seq_len, what, s.val_remedy)
        if s.vocab_size is not None:
            continue
        names = s.split_names if len(corpus.sources) == 1 else [
            f"{s.name}'s {name}" for name in s.split_names]  # fmt: skip
        part = len(s.train) // world
        mine = s.train[rank * part : (rank + 1) * part]
        check_tokens(mine, vocab_size, names[0], offset=rank * part)
        step = -(-len(s.val) // world)
        check_tokens(s.val[rank * step : (rank + 1) * step], vocab_size, names[1], rank * step)
