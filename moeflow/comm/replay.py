"""Selective activation checkpointing's memory of a block's token exchanges: recorded in the
forward, replayed when activation checkpointing recomputes the block in backward, so the
recomputation repeats the local computation but none of the all-to-alls (torchtitan keeps the
all-to-all outputs for the same reason: they cost communication, not FLOPs).

Every exchange of tokens and counts (`exchange_counts`, `gather_counts`, `all_to_all` of
`GroupExchange` and `HierarchicalExchange`) goes through `replayed`: inside `replay.recording()`
each call's result is kept, in call order; inside `replay.replaying()` the calls return the kept
results in the same order without communicating (an all-to-all's handle is already complete). The
recomputation runs the same code on the same inputs, so the calls come in the same order on every
rank, and the ranks skip the same collectives. Weight gathers (`dp` / `sharded` modes) are not
kept: they are transients as large as the experts, and run again. Outside both, calls communicate.
What is kept (each MoE layer's received rows and returned outputs) lives as long as the `replay`.

Example:
    >>> replay = CollectiveReplay()
    >>> calls = []
    >>> @replayed
    ... def exchange(x):
    ...     calls.append(x)
    ...     return x * 2
    >>> with replay.recording():
    ...     first = exchange(torch.ones(2))
    >>> with replay.replaying():
    ...     again = exchange(torch.ones(2))
    >>> len(calls), again is first
    (1, True)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator

import torch

_ACTIVE: contextvars.ContextVar[tuple[CollectiveReplay, str] | None] = contextvars.ContextVar(
    "moeflow_collective_replay", default=None
)
# Told of every tensor a recording keeps (what a step holds for backward beside autograd's own).
_OBSERVER: contextvars.ContextVar[Callable[[torch.Tensor], None] | None] = contextvars.ContextVar(
    "moeflow_kept_observer", default=None
)


@contextlib.contextmanager
def observing_kept(observer: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Inside, `observer(tensor)` sees every tensor a `CollectiveReplay` records."""
    token = _OBSERVER.set(observer)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


class CollectiveReplay:
    """The kept results of one block call's exchanges (see the module doc)."""

    def __init__(self) -> None:
        self.results: list = []
        self._next = 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        token = _ACTIVE.set((self, "record"))
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Replay once: what was kept is let go after (the recomputed graph holds what backward
        still needs)."""
        self._next = 0
        token = _ACTIVE.set((self, "replay"))
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            self.results = []

    @property
    def kept_bytes(self) -> int:
        """Bytes of the tensors kept (each storage once)."""
        seen, total = set(), 0
        for result in self.results:
            for t in result if isinstance(result, tuple) else (result,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
        return total

    def _take(self):
        if self._next >= len(self.results):
            raise RuntimeError(
                "selective activation checkpointing: the recomputation made more exchanges than "
                f"the forward ({len(self.results)}); a block must exchange the same on recompute"
            )
        result = self.results[self._next]
        self._next += 1
        return result


def replayed(fn: Callable) -> Callable:
    """Wrap an exchange method (see the module doc). A result `(tensor, handle)` replays as
    `(tensor, None)`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        active = _ACTIVE.get()
        if active is None:
            return fn(*args, **kwargs)
        replay, mode = active
        if mode == "record":
            result = fn(*args, **kwargs)
            # An all-to-all's handle holds its input, whose graph leads back to the checkpoint
            # that holds this replay: keeping it would make a cycle the garbage collector cannot
            # see (autograd's nodes). The output alone is kept.
            replay.results.append((result[0], None) if isinstance(result, tuple) else result)
            observer = _OBSERVER.get()
            for t in result if isinstance(result, tuple) else (result,):
                if observer is not None and isinstance(t, torch.Tensor):
                    observer(t)
            return result
        return replay._take()

    return wrapper
