"""Prepared folders and Megatron corpora as a run's sources, opened in place: a manifest (or an
index) is read, the shards are memory-mapped, and no token is read until a window needs it.

Example:
    >>> import tempfile
    >>> from moeflow.data.indexed import IndexedWriter
    >>> prefix = tempfile.mkdtemp() + "/corpus_text_document"
    >>> w = IndexedWriter(prefix, np.uint16)
    >>> w.add_documents(np.arange(1, 101, dtype=np.uint16), np.full(10, 10))
    >>> w.finish()
    >>> src = megatron_source(SourceConfig(path=prefix), val_percent=10, eod_id=None)
    >>> len(src.train), len(src.val), src.doc_starts()[:3].tolist()
    (90, 10, [0, 10, 20])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moeflow.data.config import SourceConfig
from moeflow.data.indexed import IndexedTokens
from moeflow.data.manifest import Manifest, read_manifest
from moeflow.data.source import Source
from moeflow.data.token_view import TokenView


def _pieces(manifest: Manifest, folder: Path, split: str) -> tuple[list[np.ndarray], list]:
    """The token arrays of split `split`'s shards, and each shard's (pair, first, count)."""
    pieces, spans = [], []
    for shard in manifest.split(split).shards:
        prefix = Path(shard.prefix) if Path(shard.prefix).is_absolute() else folder / shard.prefix
        pair = IndexedTokens.open(prefix)
        if shard.first_document + shard.documents > pair.documents:
            raise ValueError(
                f"{folder}/manifest.json: shard {shard.prefix} holds documents "
                f"{shard.first_document}..{shard.first_document + shard.documents - 1} but the "
                f"pair has {pair.documents}: the folder changed after it was prepared; prepare "
                "it again"
            )
        lo, hi = pair.span(shard.first_document, shard.documents)
        if hi - lo != shard.tokens:
            raise ValueError(
                f"{folder}/manifest.json: shard {shard.prefix} should hold {shard.tokens} tokens, "
                f"its index says {hi - lo}: the folder changed after it was prepared; prepare it "
                "again"
            )
        pieces.append(pair.tokens[lo:hi])
        spans.append((pair, shard.first_document, shard.documents, lo))
    return pieces, spans


def _starts_of(spans: list) -> np.ndarray:
    """Document start offsets of shards laid end to end (read from their indexes, when asked)."""
    out, base = [], 0
    for pair, first, count, lo in spans:
        starts = pair.starts()[first : first + count + 1]
        out.append(starts[:-1] - lo + base)
        base += int(starts[-1] - lo)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def prepared_source(source: SourceConfig) -> Source:
    """A folder written by `moeflow data prepare` (or a manifest describing Megatron pairs)."""
    folder = Path(source.path)
    if not folder.is_dir():
        raise ValueError(f"data.path ({source.path!r}) is not a folder; prepare one with "
                         "`moeflow data prepare INPUT --out DIR`")  # fmt: skip
    manifest = read_manifest(folder)
    train, train_spans = _pieces(manifest, folder, "train")
    val, _ = _pieces(manifest, folder, "val")
    counts = None
    if set(manifest.counts) >= {"train", "val"}:
        counts = tuple(
            np.load(folder / manifest.counts[s], mmap_mode="r") for s in ("train", "val")
        )
    tok = manifest.tokenizer
    return Source(
        source.label,
        TokenView(train),
        TokenView(val),
        f"{folder} (prepared, tokenizer {tok.name}, {manifest.train.documents:,} documents)",
        manifest.bytes_per_token("val") or manifest.bytes_per_token("train"),
        weight=source.weight,
        vocab_size=tok.vocab_size,
        tokenizer=tok,
        eod_id=tok.eod_id,
        doc_starts=lambda: _starts_of(train_spans),
        counts=counts,
        val_remedy="prepare it again with a larger --val-percent (moeflow data prepare)",
    )


def _check_eod(pair: IndexedTokens, eod_id: int, sample: int = 1000) -> None:
    """Documents of `pair` end with `eod_id` (checked on up to `sample` of them, evenly spread):
    a document mask is built from it."""
    for d in np.unique(np.linspace(0, pair.documents - 1, sample).astype(np.int64)).tolist():
        doc = pair.document(d)
        if len(doc) and int(doc[-1]) != eod_id:
            raise ValueError(
                f"data.document_mask: document {d} of {pair.prefix} ends with id {int(doc[-1])}, "
                f"not the end-of-document id {eod_id} (of data.tokenizer): a pair written "
                "without preprocess_data.py --append-eod has no boundaries to mask; rebuild it "
                "with --append-eod, or leave data.document_mask unset"
            )


def megatron_source(
    source: SourceConfig, val_percent: int, eod_id: int | None, masked: bool = False
) -> Source:
    """A Megatron indexed corpus in place; its last `val_percent`% of documents validate
    (Megatron's contiguous split). Its ids are not described: they are checked against the
    model's vocabulary before the first step. `masked`: the run masks attention by documents,
    which must end with `eod_id`."""
    pair = IndexedTokens.open(source.path)
    if masked and pair.documents:
        _check_eod(pair, eod_id)
    n = pair.documents
    n_val = max(1, round(n * val_percent / 100)) if n > 1 else 0
    if n_val == 0 or n - n_val == 0:
        raise ValueError(
            f"data.path ({source.path!r}) holds {n} document(s): too few to split into training "
            f"and validation (data.val_percent = {val_percent})"
        )
    lo, mid = pair.span(0, n - n_val)
    _, hi = pair.span(n - n_val, n_val)
    return Source(
        source.label,
        TokenView([pair.tokens[lo:mid]]),
        TokenView([pair.tokens[mid:hi]]),
        f"{source.path} (Megatron corpus, {pair.tokens.dtype.name}, {n:,} documents)",
        None,
        weight=source.weight,
        eod_id=eod_id,
        doc_starts=lambda: pair.starts()[: n - n_val] - lo,
        split_names=(f"{pair.prefix}.bin (training documents)", f"{pair.prefix}.bin (validation)"),
    )
