"""Which source each window of a weighted mixture comes from: a fixed cycle, no randomness.

Window i of a stream comes from source `pattern[i % CYCLE]`. The pattern gives each window to
the source furthest behind its share (weight x windows so far minus windows it has had, as
Megatron's blended datasets do), so after any number of windows every source is within one window
of its share; over any 1,000 consecutive windows, within 0.2%. The number of windows source s had
before window i is a lookup, so a stream's position (the number of windows drawn) is its whole
state and a resumed stream needs no replay.

Example:
    >>> mix = Mixture([0.7, 0.3])
    >>> [mix.source(i) for i in range(10)]
    [0, 1, 0, 0, 0, 1, 0, 0, 1, 0]
    >>> mix.drawn(1, 1000), mix.drawn(0, 10_001)  # windows of source 1 among the first 1000
    (300, 7001)
"""

from __future__ import annotations

import numpy as np

CYCLE = 10_000  # the pattern's length: shares are exact to 1 / CYCLE over each cycle


class Mixture:
    """The draw order of sources with `weights` (positive; normalised here)."""

    def __init__(self, weights: list[float], cycle: int = CYCLE) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or (w <= 0).any() or not np.isfinite(w).all():
            raise ValueError(f"mixture weights {list(weights)} must be positive and finite")
        self.weights = w / w.sum()
        self.cycle = cycle if len(w) > 1 else 1
        if len(w) > 1 and self.weights.min() * self.cycle < 1:
            small = int(np.argmin(self.weights))
            raise ValueError(
                f"mixture weight {list(weights)[small]} of source {small} is "
                f"{self.weights[small]:.2g} of the total, less than one window in {cycle:,}: it "
                "would never be drawn; raise it or leave the source out"
            )
        self.pattern = self._pattern(self.weights, self.cycle)
        # before[s, j]: windows of source s among the first j of a cycle
        hits = self.pattern[None, :] == np.arange(len(w))[:, None]
        self.before = np.zeros((len(w), self.cycle + 1), dtype=np.int64)
        np.cumsum(hits, axis=1, out=self.before[:, 1:])

    @staticmethod
    def _pattern(weights: np.ndarray, cycle: int) -> np.ndarray:
        pattern = np.empty(cycle, dtype=np.int64)
        had = np.zeros(len(weights))
        for i in range(cycle):
            s = int(np.argmax(weights * (i + 1) - had))  # the source furthest behind
            pattern[i] = s
            had[s] += 1
        return pattern

    def locate(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each window index: its source, and how many windows of that source came before
        it (vectorised `source` and `drawn`)."""
        full, rest = np.divmod(windows, self.cycle)
        sources = self.pattern[rest]
        return sources, full * self.before[sources, -1] + self.before[sources, rest]

    def source(self, i: int) -> int:
        """The source of window i."""
        return int(self.pattern[i % self.cycle])

    def drawn(self, s: int, i: int) -> int:
        """How many of windows `0..i-1` came from source s."""
        full, rest = divmod(i, self.cycle)
        return full * int(self.before[s, -1]) + int(self.before[s, rest])
