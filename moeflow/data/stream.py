"""The per-rank batch stream of `moeflow train` and the fixed validation windows.

Every source's training tokens are cut into `world_size` contiguous parts and rank r draws
windows of `seq_len + 1` tokens from part r of each. Which source window i comes from is the
mixture's fixed cycle (`moeflow.data.mixture`); the j-th window a rank draws from a source is
position `j % n` of a shuffled order of that source's n windows, a pure function of `(seed,
rank, source, j // n)`. The number of windows drawn is the stream's whole state, so a resumed
run continues with exactly the batches the uninterrupted run would have drawn.

Windows start every `seq_len` tokens (`window_start = "any"`: non-overlapping, across document
boundaries), or at documents (`"document"`: every document is cut into windows from its first
token, every `seq_len` tokens; its last window runs on into the next documents).

Example:
    >>> tokens = np.arange(1000, dtype=np.uint16)
    >>> stream = BatchStream(tokens, seq_len=8, batch_size=2, rank=0, world_size=2, seed=0)
    >>> x, y = stream.next_batch()
    >>> x.shape, bool((y[:, :-1] == x[:, 1:]).all())
    (torch.Size([2, 8]), True)
"""

from __future__ import annotations

import numpy as np
import torch

from moeflow.data.mixture import Mixture
from moeflow.data.token_view import TokenView, as_view


def document_windows(starts: np.ndarray, length: int, seq_len: int) -> np.ndarray:
    """Window starts aligned to documents (`starts`: sorted offsets of the documents in a span
    of `length` tokens): each document's first token, then every `seq_len` tokens while the
    document lasts, every window whole inside the span. Every token of a document is an input of
    a window that began in that document.

    Example:
        >>> document_windows(np.array([0, 3, 9, 10, 20]), length=30, seq_len=8).tolist()
        [0, 3, 9, 10, 18, 20]
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.append(starts[1:], length)
    counts = np.maximum(-(-(ends - starts) // seq_len), 0)
    first = np.repeat(starts, counts)
    step = np.arange(len(first)) - np.repeat(np.cumsum(counts) - counts, counts)
    picked = first + step * seq_len
    return picked[picked + seq_len + 1 <= length]


class _SourceWindows:
    """One source's windows on one rank: window k starts at `k * seq_len`, or at `picked[k]`."""

    def __init__(self, tokens: TokenView, seq_len: int, starts: np.ndarray | None) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.picked = None if starts is None else document_windows(starts, len(tokens), seq_len)
        n = (len(tokens) - 1) // seq_len if self.picked is None else len(self.picked)
        self.count = max(n, 0)
        self.epoch, self.order = -1, np.zeros(0, dtype=np.int64)


class BatchStream:
    """Shuffled windows of this rank's part of each source; `state_dict()` is its position.

    `tokens`: one source's training tokens, or a list of them; `weights`: the mixture's (one per
    source); `doc_starts`: per source, the sorted document start offsets (needed for
    `window_start = "document"`)."""

    def __init__(
        self,
        tokens,
        seq_len: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        weights: list[float] | None = None,
        doc_starts: list[np.ndarray] | None = None,
        window_start: str = "any",
        names: list[str] | None = None,
    ) -> None:
        sources = [as_view(t) for t in (tokens if isinstance(tokens, list) else [tokens])]
        names = names or [f"source {i}" for i in range(len(sources))]
        self.mixture = Mixture(weights or [1.0] * len(sources))
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.seed, self.windows = rank, seed, 0
        self.counted = np.zeros(len(sources), dtype=np.int64)  # windows drawn, by source
        self.sources = []
        for s, view in enumerate(sources):
            part = len(view) // world_size
            mine = view[rank * part : (rank + 1) * part]
            starts = None
            if window_start == "document":
                if doc_starts is None:
                    raise ValueError(
                        f"data.window_start = 'document' needs document boundaries; {names[s]} "
                        "has none (a prepared folder or a Megatron corpus has them)"
                    )
                found = doc_starts[s]
                starts = found[(found >= rank * part) & (found < (rank + 1) * part)] - rank * part
                # The document under way where the part begins is cut from the part's start.
                starts = np.union1d([0], starts)
            windows = _SourceWindows(mine, seq_len, starts)
            needed = batch_size if len(sources) == 1 else 1
            if windows.count < needed:
                unit = f"one batch of {batch_size} x" if needed > 1 else "one window of"
                raise ValueError(
                    f"data: rank {rank}'s part of {names[s]} has {len(mine)} tokens, fewer than "
                    f"{unit} {seq_len + 1} (train.seq_len + 1); use more data or fewer ranks"
                )
            self.sources.append(windows)

    @property
    def num_windows(self) -> int:
        """Windows of one pass over this rank's part of every source."""
        return sum(w.count for w in self.sources)

    def windows_per_source(self) -> list[int]:
        return [w.count for w in self.sources]

    def _order(self, s: int, epoch: int) -> np.ndarray:
        windows = self.sources[s]
        if windows.epoch != epoch:
            key = [self.seed, self.rank, epoch] if len(self.sources) == 1 else [
                self.seed, self.rank, s, epoch]  # fmt: skip
            windows.order = np.random.default_rng(key).permutation(windows.count)
            windows.epoch = epoch
        return windows.order

    def _rows(self, first: int, count: int) -> torch.Tensor:
        """Windows `first .. first + count - 1` of the stream, `[count, seq_len + 1]` int64."""
        rows = np.empty((count, self.seq_len + 1), dtype=np.int64)
        sources, drawn = self.mixture.locate(np.arange(first, first + count, dtype=np.int64))
        mixed = len(self.sources) > 1
        for s in np.unique(sources).tolist() if mixed else [0]:  # the batch's sources
            picked = np.flatnonzero(sources == s) if mixed else np.arange(count)
            windows = self.sources[s]
            epochs, at = np.divmod(drawn[picked], windows.count)
            first_epoch, last_epoch = int(epochs[0]), int(epochs[-1])  # drawn grows along a batch
            ks = np.empty(len(picked), dtype=np.int64)
            for epoch in range(first_epoch, last_epoch + 1):  # two where it crosses an epoch
                here = epochs == epoch
                ks[here] = self._order(s, epoch)[at[here]]
            starts = ks * self.seq_len if windows.picked is None else windows.picked[ks]
            windows.tokens.gather_into(rows, picked, starts)
            self.counted[s] += len(picked)
        return torch.from_numpy(rows)

    def sources_of(self, first: int, count: int) -> list[int]:
        """The source of each of windows `first .. first + count - 1` (shares and tests)."""
        return [self.mixture.source(i) for i in range(first, first + count)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._next_rows()
        return rows[:, :-1], rows[:, 1:]

    def _next_rows(self) -> torch.Tensor:
        """The next batch's windows `[B, seq_len + 1]`: inputs and, shifted by one, targets."""
        rows = self._rows(self.windows, self.batch_size)
        self.windows += self.batch_size
        return rows

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
        self.windows = batches * self.batch_size

    def state_dict(self) -> dict:
        return {"windows": self.windows}

    def load_state_dict(self, state: dict) -> None:
        if "windows" in state:
            self.windows = int(state["windows"])
        else:  # moeflow 0.1's one-source stream, (epoch, index): the same place in the data (the
            # same batches where its epochs, which dropped a last partial batch, had none)
            per_epoch = self.num_windows // self.batch_size * self.batch_size
            self.windows = int(state["epoch"]) * per_epoch + int(state["index"])


def eval_batches(
    tokens,
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
    view = as_view(tokens)
    available = (len(view) - 1) // seq_len
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
        data = np.stack([view.read(int(s), int(s) + seq_len + 1) for s in padded])
        data = torch.from_numpy(data.astype(np.int64))
        yield data[:, :-1], data[:, 1:], mask


def check_validation_split(
    tokens,
    seq_len: int,
    what: str = "the validation split",
    remedy: str = "use more data or a larger data.val_percent",
) -> None:
    """At least one validation window, checked before the first step (not at the first
    validation, after the training)."""
    if (len(tokens) - 1) // seq_len < 1:
        raise ValueError(
            f"data: {what} has {len(tokens)} tokens, fewer than one window of "
            f"{seq_len + 1} (train.seq_len + 1); {remedy}"
        )
