"""A Megatron corpus (`PREFIX.bin` + `PREFIX.idx`, from Megatron-LM's `preprocess_data.py`)
described in place: `moeflow data prepare PREFIX --tokenizer T --out DIR` writes only a manifest
and the id counts into DIR; the manifest's shards point at the pair (absolute prefix), so nothing
is copied and a run memory-maps the pair itself.

Each pair's last `val_percent`% of documents are validation, the rest training (Megatron's
contiguous split). The counts are a bincount over the pair in chunks, on the pool, which also
checks every id is below the tokenizer's vocabulary. The text bytes (for bits per byte) are the
UTF-8 bytes of the decoded documents: all of a split's documents when it holds at most
`sample_tokens` tokens, else every k-th document, scaled to the split (the manifest's
`split_rule.text_bytes` says which).

Example:
    >>> val_documents(1000, 1.0), val_documents(3, 1.0), val_documents(10, 0.0)
    (10, 0, 0)
"""

from __future__ import annotations

import numpy as np

from moeflow.data.indexed import IndexedTokens
from moeflow.data.manifest import SPLITS, Shard, Split
from moeflow.data.tokenizer import Tokenizer

CHUNK_TOKENS = 1 << 24  # tokens a count task reads (in slices of COUNT_SLICE)
COUNT_SLICE = 1 << 21
RULE = "the last val_percent% of each pair's documents are val (Megatron's contiguous split)"


def val_documents(documents: int, val_percent: float) -> int:
    """How many of a pair's last documents are validation."""
    return round(documents * val_percent / 100)


def count_tokens(prefix: str, lo: int, hi: int, vocab_size: int, index: int) -> tuple:
    """(index, int64 [vocab_size] counts of tokens `[lo, hi)` of the pair at `prefix`)."""
    tokens = IndexedTokens.open(prefix).tokens
    counts = np.zeros(vocab_size, dtype=np.int64)
    for a in range(lo, hi, COUNT_SLICE):
        piece = np.asarray(tokens[a : min(a + COUNT_SLICE, hi)])
        low, high = (int(piece.min()), int(piece.max())) if len(piece) else (0, 0)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"{prefix}.bin holds id {bad}, outside the tokenizer's vocabulary of "
                f"{vocab_size}: the pair was made by another tokenizer; give that one with "
                "--tokenizer"
            )
        counts += np.bincount(piece, minlength=vocab_size)
    return index, counts


def plan_pairs(prefixes: list[str], val_percent: float) -> tuple[str, dict, list[tuple]]:
    """The pairs' dtype, each split's shards, and the count tasks `(prefix, lo, hi, split)`."""
    dtypes, shards, ranges = {}, {s: [] for s in SPLITS}, []
    for prefix in prefixes:
        pair = IndexedTokens.open(prefix)
        dtypes[prefix] = pair.tokens.dtype.name
        starts = pair.starts()
        cut = pair.documents - val_documents(pair.documents, val_percent)
        for split, (a, b) in zip(SPLITS, ((0, cut), (cut, pair.documents)), strict=True):
            if b > a:
                lo, hi = int(starts[a]), int(starts[b])
                shards[split].append(Shard(prefix, b - a, hi - lo, first_document=a))
                for c in range(lo, hi, CHUNK_TOKENS):
                    ranges.append((prefix, c, min(c + CHUNK_TOKENS, hi), split))
    if len(set(dtypes.values())) > 1:
        raise ValueError(
            f"the Megatron pairs hold different token types ({dtypes}): describe each type in "
            "its own folder and blend the folders with weights"
        )
    return next(iter(dtypes.values())), shards, ranges


def text_bytes(shards: list[Shard], tok: Tokenizer, sample_tokens: int) -> tuple[int, str]:
    """UTF-8 bytes of the split's text (decoded, eod ids left out) and how it was measured."""
    total = sum(s.tokens for s in shards)
    step = max(1, -(-total // sample_tokens))
    measured = tokens = documents = 0
    for shard in shards:
        pair = IndexedTokens.open(shard.prefix)
        for d in range(shard.first_document, shard.first_document + shard.documents, step):
            ids = pair.document(d)
            body = ids[:-1] if len(ids) and ids[-1] == tok.info.eod_id else ids
            measured += len(tok.decode(body).encode("utf-8"))
            tokens += len(ids)
            documents += 1
    if step == 1:
        return measured, "decoded: every document"
    estimate = round(measured * total / max(tokens, 1))
    return estimate, f"estimated: {documents} documents decoded (every {step}th), scaled"


def splits_of(shards: dict, counts: dict, tok: Tokenizer, sample_tokens: int):
    """The manifest's splits and the rule of their text bytes."""
    splits, how = {}, {}
    for name in SPLITS:
        documents = sum(s.documents for s in shards[name])
        tokens = sum(s.tokens for s in shards[name])
        measured, how[name] = text_bytes(shards[name], tok, sample_tokens) if tokens else (0, "")
        splits[name] = Split(documents, tokens, measured, tuple(shards[name]))
        assert int(counts[name].sum()) == tokens, (name, int(counts[name].sum()), tokens)
    return splits, how
