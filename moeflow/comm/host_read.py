"""The MoE path's device-to-host reads, in one named function, and a static-size count.

On an accelerator every read of device data by the host (`.tolist()`, `.item()`, an `if` on a
tensor, an op whose output size depends on the data such as `bincount` or `nonzero`) waits for
the device to finish everything queued before it. An MoE layer call needs one such read: the
split sizes of a dropless all-to-all (`moeflow.comm.dispatcher`, the count exchange). Every read
of the MoE path goes through `read_to_host` (or `start_read`, which lets the caller queue more
device work before it waits: the copy runs on its own stream into pinned memory), so there is
one place to look, and `count_reads` counts them (tests assert the budget: at most one per call,
none with static shapes). On a CPU the data is already on the host; such reads are free, but
still go through the same functions.

`count_per_value` counts values with a fixed-size scatter-add: the output size is a given, so it
never reads the data on the host (unlike `torch.bincount`).

Example:
    >>> ids = torch.tensor([2, 0, 2, 1])
    >>> counts = count_per_value(ids, 4)
    >>> with count_reads() as reads:
    ...     read_to_host(counts, "expert loads")
    [1, 1, 2, 0]
    >>> reads
    ['expert loads']
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_reads: ContextVar[list[str] | None] = ContextVar("moeflow_host_reads", default=None)
_inside: ContextVar[bool] = ContextVar("moeflow_inside_host_read", default=False)


def read_to_host(t: torch.Tensor, what: str) -> list:
    """`t.tolist()`: the one way the MoE path reads device data on the host (see the module
    doc). `what` names the read for `count_reads`."""
    return start_read(t, what).wait()


class PendingRead:
    """A read in flight (`start_read`): `wait()` returns the values as `tolist()` would."""

    def __init__(self, host: torch.Tensor, event: torch.Event | None) -> None:
        self._host, self._event = host, event

    def wait(self) -> list:
        """Block until the copy has landed (only it: not the work queued after it) and return
        the values."""
        token = _inside.set(True)
        try:
            if self._event is not None:
                self._event.synchronize()
            return self._host.tolist()
        finally:
            _inside.reset(token)


_copy_streams: dict[torch.device, torch.Stream] = {}


def start_read(t: torch.Tensor, what: str) -> PendingRead:
    """Start reading `t` on the host (counted as `what`). On an accelerator the copy runs on a
    stream of its own into pinned host memory, after the work queued so far on the current
    stream and beside what is queued after it, and `wait()` waits for the copy alone: the device
    keeps computing what the caller queued between the two calls. On a CPU the data is already
    on the host."""
    reads = _reads.get()
    if reads is not None:
        reads.append(what)
    if t.device.type == "cpu":
        return PendingRead(t, None)
    stream = _copy_streams.get(t.device)
    if stream is None:
        stream = _copy_streams[t.device] = torch.Stream(device=t.device)
    stream.wait_stream(torch.accelerator.current_stream(t.device))
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    with stream:
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)  # the allocator keeps `t` until the copy has read it
    event = torch.Event(device=t.device)
    event.record(stream)
    return PendingRead(host, event)


def inside_read() -> bool:
    """True while `read_to_host` runs (a read-counting tool skips what it does)."""
    return _inside.get()


@contextmanager
def count_reads() -> Iterator[list[str]]:
    """Collect the names of the `read_to_host` calls made inside the block (this thread)."""
    reads: list[str] = []
    token = _reads.set(reads)
    try:
        yield reads
    finally:
        _reads.reset(token)


def count_per_value(values: torch.Tensor, size: int) -> torch.Tensor:
    """`[size]` int64 counts of each value in `[0, size)` of `values` (any shape), on its device;
    `torch.bincount(values.flatten(), minlength=size)` without reading the data on the host."""
    flat = values.reshape(-1).to(torch.int64)
    out = torch.zeros(size, dtype=torch.int64, device=values.device)
    return out.scatter_add_(0, flat, torch.ones_like(flat))
