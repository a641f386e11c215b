"""Token sources and the per-rank batch stream of `moeflow train`.

Sources (`DataConfig.kind`): the embedded default corpus (the running interpreter's standard
library source, present offline on every machine), a text file or folder (byte tokens), and
nanoGPT-style `uint16` token files (memory-mapped). Byte sources split train/validation by file, by
a hash of the file's relative path, so adding a file never moves another one across the split.

Each rank reads its own shard: the training tokens are cut into `world_size` contiguous shards and
rank r draws windows of `seq_len + 1` tokens from shard r only, in a shuffled order that is a pure
function of `(seed, rank, epoch)`. The stream's position `(epoch, index)` is its whole state, so a
resumed run continues with exactly the batches the uninterrupted run would have drawn.

Example:
    >>> tokens = np.arange(1000, dtype=np.uint16)
    >>> stream = BatchStream(tokens, seq_len=8, batch_size=2, rank=0, world_size=2, seed=0)
    >>> x, y = stream.next_batch()
    >>> x.shape, bool((y[:, :-1] == x[:, 1:]).all())
    (torch.Size([2, 8]), True)
"""

from __future__ import annotations

import functools
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeflow.train.config import DataConfig

# Not prose-like source: the test suite, codec tables, bundled third-party and generated data.
STDLIB_SKIP = frozenset(
    {"test", "tests", "idlelib", "encodings", "lib2to3", "site-packages", "dist-packages",
     "pydoc_data", "turtledemo", "__pycache__", "__phello__"}
)  # fmt: skip


@dataclass
class Corpus:
    """Training and validation token arrays (numpy, possibly memory-mapped) and what they are."""

    train: np.ndarray
    val: np.ndarray
    description: str
    bytes_per_token: float | None  # 1.0 for byte tokens; None when unknown (bits/byte undefined)


def _is_val(relative: str, val_percent: int) -> bool:
    return zlib.crc32(relative.encode()) % 100 < val_percent


def _read_split(files: list[Path], root: Path, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Files in a fixed pseudo-random order (by the hash of their path), so a `max_bytes` cap
    samples the whole tree instead of its alphabetical start."""
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    files = sorted(files, key=lambda p: (zlib.crc32(p.relative_to(root).as_posix().encode()), p))
    cap = cfg.max_bytes or None
    budget = {False: cap, True: cap // 9 if cap else None}
    for path in files:
        is_val = _is_val(path.relative_to(root).as_posix(), cfg.val_percent)
        left = budget[is_val]
        if left is not None and left <= 0:
            continue
        data = path.read_bytes()
        if left is not None:
            data = data[:left]
            budget[is_val] = left - len(data)
        parts[is_val].append(data)
    train = np.frombuffer(b"".join(parts[False]), dtype=np.uint8)
    val = np.frombuffer(b"".join(parts[True]), dtype=np.uint8)
    return train, val


def _byte_corpus(files: list[Path], root: Path, cfg: DataConfig, what: str) -> Corpus:
    if not files:
        raise ValueError(f"data: no files found for {what}; check data.path and data.glob")
    if len(files) == 1:
        data = files[0].read_bytes()
        if cfg.max_bytes:
            data = data[: cfg.max_bytes + cfg.max_bytes // 9]
        cut = len(data) * (100 - cfg.val_percent) // 100
        train = np.frombuffer(data[:cut], dtype=np.uint8)
        val = np.frombuffer(data[cut:], dtype=np.uint8)
    else:
        train, val = _read_split(files, root, cfg)
    return Corpus(train, val, f"{what} ({len(files)} files, byte tokens)", 1.0)


@functools.cache
def _stdlib_files(root: Path) -> tuple[Path, ...]:
    """The standard library's own sources: walked once per process (13,000 files: most of a small
    run's start-up when walked for every run of a process that trains several)."""
    return tuple(
        p for p in root.rglob("*.py") if not STDLIB_SKIP.intersection(p.relative_to(root).parts)
    )


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read (or memory-map) the tokens that `cfg` names."""
    if cfg.kind == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = list(_stdlib_files(root))
        return _byte_corpus(files, root, cfg, f"Python {sysconfig.get_python_version()} stdlib")
    path = Path(cfg.path)
    if not path.exists():
        raise ValueError(f"data.path ({cfg.path!r}) does not exist")
    if cfg.kind == "text":
        if path.is_file():
            return _byte_corpus([path], path.parent, cfg, str(path))
        files = sorted(p for p in path.rglob(cfg.glob) if p.is_file())
        return _byte_corpus(files, path, cfg, f"{path}/**/{cfg.glob}")
    arrays = []
    for split in ("train", "val"):
        file = path / f"{split}.bin"
        kind = cfg.token_dtype
        width = np.dtype(kind).itemsize
        if not file.is_file():
            raise ValueError(
                f"data.path ({cfg.path!r}) must hold train.bin and val.bin ({kind} token ids, "
                f"nanoGPT layout) for data.kind = 'tokens'; {file} is missing"
            )
        if file.stat().st_size == 0:
            raise ValueError(f"data.path: {file} is empty (0 bytes); it must hold {kind} tokens")
        if file.stat().st_size % width:
            raise ValueError(
                f"{file} has {file.stat().st_size} bytes, not a multiple of {width}: it is not a "
                f"{kind} token file (data.token_dtype)"
            )
        arrays.append(np.memmap(file, dtype=kind, mode="r"))
    return Corpus(arrays[0], arrays[1], f"{path} ({kind} tokens, memory-mapped)", None)


def check_tokens(
    tokens: np.ndarray, vocab_size: int, what: str, offset: int = 0, chunk: int = 1 << 24
) -> None:
    """Every id of `tokens` (positions `offset...` of the file `what`) below `vocab_size` (the
    model's embedding rows), scanned in chunks before the first step: an id past it would fail
    mid-run as an index error.

    Example:
        >>> try:
        ...     check_tokens(np.array([1, 7, 300], dtype=np.uint16), 256, "train.bin", offset=10)
        ... except ValueError as exc:
        ...     print(str(exc)[:56])
        data: train.bin holds token id 300 at position 12, >= mo
    """
    for lo in range(0, len(tokens), chunk):
        part = np.asarray(tokens[lo : lo + chunk])
        if len(part) and int(part.max()) >= vocab_size:
            at = lo + int(np.argmax(part >= vocab_size))
            raise ValueError(
                f"data: {what} holds token id {int(tokens[at])} at position {offset + at}, >= "
                f"model.vocab_size ({vocab_size}); raise model.vocab_size or re-tokenize"
            )


def check_validation_split(tokens: np.ndarray, seq_len: int) -> None:
    """At least one validation window, checked before the first step (not at the first
    validation, after the training)."""
    if (len(tokens) - 1) // seq_len < 1:
        raise ValueError(
            f"data: the validation split has {len(tokens)} tokens, fewer than one window of "
            f"{seq_len + 1} (train.seq_len + 1); use more data or a larger data.val_percent"
        )


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    return torch.from_numpy(rows)


class BatchStream:
    """Shuffled, non-overlapping windows of this rank's shard; `state_dict()` is its position."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        shard = len(tokens) // world_size
        self.tokens = tokens[rank * shard : (rank + 1) * shard]
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < batch_size:
            raise ValueError(
                f"data: rank {rank}'s shard has {len(self.tokens)} tokens, fewer than one batch "
                f"of {batch_size} x {seq_len + 1}; use more data or fewer ranks"
            )
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.seed = rank, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        return rng.permutation(self.num_windows)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._next_rows()
        return rows[:, :-1], rows[:, 1:]

    def _next_rows(self) -> torch.Tensor:
        """The next batch's windows `[B, seq_len + 1]`: inputs and, shifted by one, targets."""
        if self.index + self.batch_size > self.num_windows:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._shuffle(self.epoch)
        picks = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return _windows(self.tokens, picks * self.seq_len, self.seq_len)

    def next_batch_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`next_batch` on `device`. On an accelerator the batch's window rows are pinned and
        copied once, asynchronously (the host goes on queueing the step while they travel), and
        split into inputs and targets there."""
        rows = self._next_rows()
        if device.type != "cpu":
            rows = rows.pin_memory().to(device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    def skip(self, batches: int) -> None:
        """Advance as if `batches` batches had been drawn (a resumed run whose checkpoint came
        from another world size starts where this rank would have been)."""
        per_epoch = self.num_windows // self.batch_size
        self.epoch, done = divmod(batches, per_epoch)
        self.index = done * self.batch_size
        self._order = self._shuffle(self.epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffle(self.epoch)


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    num_windows: int,
    batch_size: int,
    rank: int,
    world_size: int,
):
    """This rank's share of `num_windows` fixed validation windows, as `(x, y, mask)` batches.

    The windows are the same for every world size (evenly spaced over the validation tokens);
    window i goes to rank `i % world_size`. Every rank yields the same number of batches (an
    expert-parallel forward is collective); padding rows repeat window 0 with a zero mask.
    """
    check_validation_split(tokens, seq_len)
    available = (len(tokens) - 1) // seq_len
    num_windows = min(num_windows, available)
    starts = np.linspace(0, (available - 1) * seq_len, num_windows).astype(np.int64)
    mine = starts[rank::world_size]
    per_rank = -(-num_windows // world_size)
    for lo in range(0, per_rank, batch_size):
        picks = mine[lo : lo + batch_size]
        rows = min(batch_size, per_rank - lo)
        mask = torch.zeros(rows, dtype=torch.bool)
        mask[: len(picks)] = True
        padded = np.concatenate([picks, np.zeros(rows - len(picks), dtype=np.int64)])
        data = _windows(tokens, padded, seq_len)
        yield data[:, :-1], data[:, 1:], mask
