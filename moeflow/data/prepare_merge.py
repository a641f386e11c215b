"""The merge of `moeflow data prepare`: the parts, in input order, become each split's shards.

Documents go to `train-00000`, `train-00001`, ... (and `val-NNNNN`) in input order; a shard is
closed after the document that brings it to `shard_tokens` tokens, so the shards depend only on
the sequence of documents, never on the input's format or its units: JSON lines and Parquet of
the same documents give the same bytes. Each shard is written with `IndexedWriter` (complete
under its name, or `.partial`); a rerun keeps the shards already complete (checked against the
documents and tokens they must hold) and writes the rest, so an interrupted merge resumes too.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> sink = ShardSink(out, "train", np.uint16, shard_tokens=4)
    >>> sink.add(np.array([1, 0, 2, 3, 0, 4, 0], np.uint16), np.array([2, 3, 2]))
    >>> [(s.prefix, s.documents, s.tokens) for s in sink.finish()]
    [('train-00000', 2, 5), ('train-00001', 1, 2)]
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from moeflow.data.indexed import IndexedTokens, IndexedWriter
from moeflow.data.manifest import SPLITS, Shard, Split
from moeflow.data.prepare_parts import read_part

PIECE_TOKENS = 1 << 24  # tokens of a part the merge holds at a time (a run of whole documents)


class ShardSink:
    """Cuts one split's documents into shards of about `shard_tokens` tokens and writes those
    not already complete on disk."""

    def __init__(self, out: Path, split: str, dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[Shard] = []
        self.documents = self.tokens = 0  # of the open shard
        self.writer: IndexedWriter | None = None
        self.kept = False  # the open shard is complete on disk already

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their tokens back to back and their lengths."""
        i = offset = 0
        while i < len(lengths):
            ends = np.cumsum(lengths[i:])
            k = min(i + int(np.searchsorted(ends, self.shard_tokens - self.tokens)) + 1,
                    len(lengths))  # fmt: skip
            count = int(ends[k - i - 1])
            self._write(tokens[offset : offset + count], lengths[i:k])
            offset, i = offset + count, k
            if self.tokens >= self.shard_tokens:
                self._close()

    def _write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if self.documents == 0:
            prefix = self.out / self._name()
            self.kept = Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()
            if not self.kept:
                self.writer = IndexedWriter(prefix, self.dtype)
        if self.writer is not None:
            self.writer.add_documents(tokens, lengths)
        self.documents += len(lengths)
        self.tokens += len(tokens)

    def _name(self) -> str:
        return f"{self.split}-{len(self.shards):05d}"

    def _close(self) -> None:
        name = self._name()
        if self.writer is not None:
            self.writer.finish()
            self.writer = None
        else:  # kept from an interrupted run: it must be the shard this run would write
            kept = IndexedTokens.open(self.out / name)
            if (kept.documents, len(kept.tokens)) != (self.documents, self.tokens):
                raise ValueError(
                    f"{self.out / name} holds {kept.documents} documents and {len(kept.tokens)} "
                    f"tokens where this prepare makes {self.documents} and {self.tokens}: the "
                    "folder was changed by hand; run again with --overwrite"
                )
        self.shards.append(Shard(name, self.documents, self.tokens))
        self.documents = self.tokens = 0

    def finish(self) -> tuple[Shard, ...]:
        if self.documents:
            self._close()
        return tuple(self.shards)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def merge(
    work: Path, out: Path, parts: int, dtype, vocab_size: int, shard_tokens: int, bar=None
) -> tuple[dict[str, Split], int]:
    """Write the shards of parts `0 .. parts - 1` and each split's id counts; the splits and
    the number of empty documents skipped."""
    sinks = {s: ShardSink(out, s, dtype, shard_tokens) for s in SPLITS}
    counts = {s: np.zeros(vocab_size, dtype=np.int64) for s in SPLITS}
    documents, text_bytes = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    empty = 0
    try:
        for index in range(parts):
            part = read_part(work, index, dtype)
            if part is None:  # the pool finished every unit before the merge starts
                raise RuntimeError(f"part {index} of {work} is missing after tokenizing")
            empty += part.empty
            for name in SPLITS:
                docs = part.val if name == "val" else ~part.val
                documents[name] += int(docs.sum())
                text_bytes[name] += int(part.text_bytes[docs].sum())
                ids, n = part.counts[name]
                counts[name][ids] += n
            for lo, hi, a, b in _pieces(part.lengths):
                tokens, lengths, val = part.tokens[lo:hi], part.lengths[a:b], part.val[a:b]
                in_val = np.repeat(val, lengths)
                for name, docs, toks in (("train", ~val, ~in_val), ("val", val, in_val)):
                    if docs.any():
                        sinks[name].add(tokens if docs.all() else tokens[toks], lengths[docs])
                if bar is not None:
                    bar.update(hi - lo)
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    splits = {}
    for name in SPLITS:
        shards = sinks[name].finish()
        tokens = sum(s.tokens for s in shards)
        assert tokens == int(counts[name].sum()), (name, tokens, int(counts[name].sum()))
        splits[name] = Split(documents[name], tokens, text_bytes[name], shards)
        save_counts(out / f"{name}.counts.npy", counts[name])
    return splits, empty


def _pieces(lengths: np.ndarray, piece_tokens: int | None = None):
    """(first token, end token, first document, end document) of runs of whole documents of
    about `piece_tokens` (default `PIECE_TOKENS`) tokens: the merge holds one run in memory,
    never a whole part."""
    piece_tokens = piece_tokens or PIECE_TOKENS
    ends = np.cumsum(lengths)
    cuts = np.searchsorted(ends, np.arange(piece_tokens, int(ends[-1]) if len(ends) else 0,
                                           piece_tokens)) + 1  # fmt: skip
    bounds = [0, *sorted(set(cuts.tolist()) - {0, len(lengths)}), len(lengths)]
    for a, b in itertools.pairwise(bounds):
        if b > a:
            yield int(ends[a] - lengths[a]), int(ends[b - 1]), a, b


def save_counts(path: Path, counts: np.ndarray) -> None:
    """An int64 [vocab_size] `.npy`, written under a temporary name and renamed."""
    tmp = Path(f"{path}.partial")
    with open(tmp, "wb") as stream:
        np.save(stream, counts)
    os.replace(tmp, path)
