"""Stop glibc from returning freed memory to the OS between training steps (CPU runs only).

PyTorch's CPU allocator is plain `malloc`. glibc serves large blocks with `mmap` and unmaps them on
`free`, and trims the heap top eagerly, so every step's activations are page-faulted in again:
measured here (2-core VM, one MoE layer at T=4096, D=256) as ~5,000 minor faults and ~10% of the
step. Raising `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` keeps freed blocks in the heap for reuse.
This is the same effect as preloading jemalloc or tcmalloc, which PyTorch's CPU performance guide
recommends.

It changes process-wide allocator settings, so moeflow never calls it on import: the trainer and the
benchmarks call it explicitly (and say so), and a user may call it at the top of a CPU training
script.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 34) -> bool:
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
    # glibc caps M_MMAP_THRESHOLD at HEAP_MAX (32 MiB on 64-bit) and rejects larger values.
    ok = mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, 32 << 20)) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)) == 1
    return bool(ok)
