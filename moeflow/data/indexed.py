"""Megatron-LM's indexed token format (`PREFIX.bin` + `PREFIX.idx`): read memory-mapped, written
in bulk.

The format is the one megatron-core's `IndexedDatasetBuilder` writes and its `IndexedDataset`
reads (and `tools/preprocess_data.py` produces), so a prepared folder is a Megatron corpus and a
Megatron corpus reads in place. moeflow reads and writes it with numpy alone: importing
megatron-core costs seconds and thousands of modules, which every rank of every run would pay.
The tests cross-check both directions against megatron-core itself.

Layout of the `.idx` (little-endian): the 9-byte header `MMIDIDX\\0\\0`, version `<Q` (1), the
token dtype's code `<B`, the sequence count S `<Q`, the document count D `<Q`, then
`int32[S]` sequence lengths (tokens), `int64[S]` byte offsets of the sequences in the `.bin`, and
`int64[D]` document indices (0, then the sequence index that ends each document). The `.bin` is
the sequences' tokens back to back. moeflow writes one sequence per document (the document's
tokens, ending with the end-of-document id), as `preprocess_data.py --append-eod` does.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> writer = IndexedWriter(f"{folder}/part", np.uint16)
    >>> writer.add_documents(np.array([5, 6, 0, 7, 0], dtype=np.uint16), np.array([3, 2]))
    >>> writer.finish()
    >>> data = IndexedTokens.open(f"{folder}/part")
    >>> data.documents, data.tokens.tolist(), data.document(1).tolist()
    (2, [5, 6, 0, 7, 0], [7, 0])
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
HEAD_BYTES = len(HEADER) + 8 + 1 + 8 + 8
# Megatron's dtype codes (megatron.core.datasets.indexed_dataset.DType); token ids are integers.
CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest Megatron token dtype for ids below `vocab_size`: uint16, else int32 (the
    format has no uint32; Megatron's own builder makes the same choice).

    Example:
        >>> token_dtype(50_257), token_dtype(151_936)
        (dtype('uint16'), dtype('int32'))
    """
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def _idx_fields(path: Path) -> tuple[np.dtype, int, int]:
    """(dtype, sequences, documents) from the `.idx` header, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as stream:
        head = stream.read(HEAD_BYTES)
    if len(head) < HEAD_BYTES or head[: len(HEADER)] != HEADER:
        raise ValueError(
            f"{path} is not a Megatron index: it is {size} bytes and does not start with "
            f"{HEADER!r}; rebuild it (moeflow data prepare, or Megatron's preprocess_data.py)"
        )
    version, code, sequences, documents = struct.unpack("<QBQQ", head[len(HEADER) :])
    if version != 1 or code not in CODES:
        raise ValueError(
            f"{path}: index version {version}, dtype code {code}; moeflow reads version 1 with "
            f"integer token codes {sorted(CODES)}"
        )
    expected = HEAD_BYTES + 12 * sequences + 8 * documents
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {what}: {size} bytes where its header ({sequences} sequences, "
            f"{documents - 1} documents) needs {expected}; rebuild it (an interrupted write?)"
        )
    return np.dtype(CODES[code]), sequences, documents


@dataclass(frozen=True)
class IndexedTokens:
    """One `.bin`/`.idx` pair, memory-mapped: opening reads the header and maps the files; pages
    are read when a window touches them. `starts[d]` is the first token of document d."""

    prefix: Path
    tokens: np.ndarray  # the whole .bin, read-only memmap
    lengths: np.ndarray  # int32 [sequences]
    pointers: np.ndarray  # int64 [sequences], byte offsets
    document_indices: np.ndarray  # int64 [documents + 1]

    @classmethod
    def open(cls, prefix: str | os.PathLike) -> IndexedTokens:
        prefix = Path(prefix)
        idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for file in (idx, bin_):
            if not file.is_file():
                raise ValueError(f"{file} is missing: a Megatron corpus is a .bin/.idx pair")
        dtype, sequences, documents = _idx_fields(idx)
        index = np.memmap(idx, mode="r", dtype=np.uint8)
        lengths = np.frombuffer(index, np.int32, sequences, HEAD_BYTES)
        pointers = np.frombuffer(index, np.int64, sequences, HEAD_BYTES + 4 * sequences)
        doc_index = np.frombuffer(index, np.int64, documents, HEAD_BYTES + 12 * sequences)
        size = bin_.stat().st_size
        need = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if sequences else 0
        if size != need or size % dtype.itemsize:
            raise ValueError(
                f"{bin_} is {size} bytes but its index {idx.name} says {need} ({sequences} "
                f"sequences of {dtype.name}): the pair does not belong together or one was cut "
                "short; rebuild it"
            )
        tokens = np.memmap(bin_, mode="r", dtype=dtype) if size else np.zeros(0, dtype)
        return cls(prefix, tokens, lengths, pointers, doc_index)

    @property
    def documents(self) -> int:
        return len(self.document_indices) - 1

    def starts(self) -> np.ndarray:
        """int64 [documents + 1]: the token offset where each document starts, then the end."""
        # A sequence's start, and one past the last: an empty document (no sequence; Megatron
        # writes one for an empty text) starts where the next sequence does.
        sequence_starts = np.append(self.pointers // self.tokens.dtype.itemsize, len(self.tokens))
        return np.append(sequence_starts[self.document_indices[:-1]], len(self.tokens))

    def span(self, first: int, count: int) -> tuple[int, int]:
        """Token offsets `[lo, hi)` of documents `first .. first + count - 1`."""
        if count == 0:
            return (0, 0)
        itemsize = self.tokens.dtype.itemsize
        lo_seq = int(self.document_indices[first])
        hi_seq = int(self.document_indices[first + count])
        if hi_seq == lo_seq:
            return (0, 0)
        lo = int(self.pointers[lo_seq]) // itemsize
        hi = int(self.pointers[hi_seq - 1]) // itemsize + int(self.lengths[hi_seq - 1])
        return lo, hi

    def document(self, d: int) -> np.ndarray:
        """Document d's tokens (a view of the map)."""
        lo, hi = self.span(d, 1)
        return self.tokens[lo:hi]


class IndexedWriter:
    """Writes one pair; the files appear under their names only when `finish()` has written
    both (an interrupted write leaves `*.partial` files, never a pair that looks complete)."""

    def __init__(self, prefix: str | os.PathLike, dtype) -> None:
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"token dtype {self.dtype} is not one of Megatron's integer codes")
        self._bin = open(f"{self.prefix}.bin.partial", "wb")  # noqa: SIM115 (closed by finish)
        self._lengths: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their tokens back to back and their lengths."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())}, tokens are {len(tokens)}")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(lengths.astype(np.int32))

    def finish(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
        head = HEADER + struct.pack("<QBQQ", 1, CODE_OF[self.dtype], len(lengths), len(doc_index))
        with open(f"{self.prefix}.idx.partial", "wb") as out:
            for part in (head, lengths.tobytes(), pointers.tobytes(), doc_index.tobytes()):
                out.write(part)
            out.flush()
            os.fsync(out.fileno())
        os.replace(f"{self.prefix}.bin.partial", f"{self.prefix}.bin")
        os.replace(f"{self.prefix}.idx.partial", f"{self.prefix}.idx")

    def abort(self) -> None:
        self._bin.close()
        Path(f"{self.prefix}.bin.partial").unlink(missing_ok=True)
