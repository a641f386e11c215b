"""A read-only sequence of token ids over several memory-mapped arrays, sliced without copying.

A split of a prepared folder is its shards back to back; a rank reads the part of it that is its
own and, of that, only the windows it draws. `TokenView` gives that a numpy-like face: `len`,
an integer index, and slices that stay views (no token is read until `np.asarray` asks for one).

Example:
    >>> view = TokenView([np.arange(5), np.arange(10, 13)])
    >>> len(view), int(view[6]), np.asarray(view[3:7]).tolist()
    (8, 11, [3, 4, 10, 11])
    >>> np.asarray(view[4:][1:3]).tolist()  # a view of a view
    [10, 11]
"""

from __future__ import annotations

import numpy as np


class TokenView:
    """Positions `[lo, hi)` of `pieces` laid end to end."""

    def __init__(self, pieces: list[np.ndarray], lo: int = 0, hi: int | None = None) -> None:
        # Plain ndarray views of the maps: slicing a `np.memmap` costs a Python-level hook.
        self.pieces = [np.asarray(p) for p in pieces if len(p)]
        self.ends = np.cumsum([len(p) for p in self.pieces], dtype=np.int64)
        self._ends = self.ends.tolist()
        total = int(self.ends[-1]) if len(self.ends) else 0
        self.lo, self.hi = lo, total if hi is None else hi
        self.dtype = self.pieces[0].dtype if self.pieces else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.hi - self.lo

    def _view(self, lo: int, hi: int) -> TokenView:
        view = TokenView.__new__(TokenView)
        view.pieces, view.ends, view.dtype = self.pieces, self.ends, self.dtype
        view._ends = self._ends
        view.lo, view.hi = lo, hi
        return view

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("a TokenView is sliced with step 1 only")
            return self._view(self.lo + start, self.lo + max(start, stop))
        index = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"token {key} of {len(self)}")
        return self.read(index, index + 1)[0]

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens `[lo, hi)` of this view, copied out of the pieces they lie in."""
        lo, hi = self.lo + lo, self.lo + min(hi, len(self))
        if hi <= lo:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.ends, lo, side="right"))
        parts = []
        while lo < hi:
            begin = int(self.ends[first - 1]) if first else 0
            end = min(hi, int(self.ends[first]))
            parts.append(self.pieces[first][lo - begin : end - begin])
            lo, first = end, first + 1
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def gather_into(self, out: np.ndarray, rows: np.ndarray, starts: np.ndarray) -> None:
        """`out[rows[j]] = self[starts[j] : starts[j] + out.shape[1]]` for every j: the windows
        of a batch, copied (and cast to `out`'s dtype) straight from the pieces."""
        length, ends = out.shape[1], self._ends
        at = np.asarray(starts, dtype=np.int64) + self.lo
        pieces = np.searchsorted(self.ends, at, side="right").tolist()
        for row, p, a in zip(rows.tolist(), pieces, at.tolist(), strict=True):
            b = ends[p - 1] if p else 0
            if a + length <= ends[p]:
                out[row] = self.pieces[p][a - b : a - b + length]
            else:  # a window across two pieces
                out[row] = self.read(a - self.lo, a - self.lo + length)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.read(0, len(self))
        return out if dtype is None else out.astype(dtype, copy=False)


def as_view(tokens) -> TokenView:
    """`tokens` (an array or a view) as a `TokenView`."""
    return tokens if isinstance(tokens, TokenView) else TokenView([tokens])
