"""Timing work on a device that runs asynchronously: the host clock is read only after the device
has finished what was queued (`synchronize`), before and after the timed work. On an accelerator,
a kernel launch returns before the kernel runs: timing without synchronising measures launches,
and would rank a slow candidate with cheap launches first. On a CPU, work runs when called and
`synchronize` does nothing.

Example:
    >>> seconds = elapsed(lambda: torch.ones(64, 64) @ torch.ones(64, 64), torch.device("cpu"))
    >>> seconds > 0
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait until `device` has finished the work queued on it (a no-op on a CPU)."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "synchronize"):
        module.synchronize(device)
    else:
        torch.accelerator.synchronize(device)


def elapsed(fn: Callable[[], object], device: torch.device | str, calls: int = 1) -> float:
    """Seconds per call of `calls` back-to-back calls of `fn`, the device synchronised before
    the clock starts and before it stops."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / calls
