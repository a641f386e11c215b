"""Stop glibc from returning freed memory to the OS between training steps (CPU runs only).

PyTorch's CPU allocator is plain `malloc`. glibc serves large blocks with `mmap` and unmaps them on
`free`, and trims the heap top eagerly, so every step's activations are page-faulted in again.
Measured here (2-core VM, fp32, 2 threads, forward+backward of one GELU MoE layer, T=4096 D=256):
with E=64 experts of F=64 and k=8 the `[T*k, D]` buffers are 33.5 MB, above glibc's largest mmap
threshold (32 MiB), and fault 41,000 pages per step: 110 ms a step, 68.6 ms without the faults.
`keep_freed_memory` raises the trim threshold and turns `mmap` off for the heap (`M_MMAP_MAX = 0`,
so no block size escapes), so freed blocks stay in the heap for reuse: the effect of preloading
jemalloc or tcmalloc, which PyTorch's CPU performance guide recommends. The cost: memory a process
freed is kept by it, not returned to the OS.

It changes process-wide allocator settings, so moeflow never calls it on import. The first
forward of an `MoELayer` on a CPU tensor calls it once (`apply_once`), as does the trainer, unless
the environment sets `MOEFLOW_CPU_ALLOC=system`; the benchmarks say which setting they ran with.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
ENV = "MOEFLOW_CPU_ALLOC"  # "system": leave glibc's defaults alone
_applied: bool | None = None


def keep_freed_memory(trim_threshold: int = 2**31 - 1) -> bool:
    """Apply the settings with `mallopt`. Returns False (and changes nothing) where glibc's
    `mallopt` is unavailable (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit: larger blocks would still be mmapped and
    # unmapped every step, so mmap is turned off (the threshold is set too, for older glibc).
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    ok &= mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)) == 1
    return bool(ok)


def apply_once() -> bool:
    """`keep_freed_memory()` the first time it is called in a process (unless `MOEFLOW_CPU_ALLOC`
    is `system`); returns whether the setting is in effect."""
    global _applied
    if _applied is None:
        _applied = os.environ.get(ENV, "").lower() != "system" and keep_freed_memory()
    return _applied
