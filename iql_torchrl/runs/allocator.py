"""glibc's allocator, set for a training process: freed tensor memory stays mapped for reuse.

By default glibc hands blocks above its mmap threshold (128 KiB, rising only to sizes it has
seen freed) straight back to the OS and trims the top of its heap, so each update's fresh
activation buffers are page-faulted in again, hundreds of times an eager update at 2×256 MLPs, B 256.
Serving blocks up to 32 MiB from the heap and trimming it only beyond 1 GiB keeps them mapped (the faults
and the time they cost: benchmarks/README.md). The process keeps its peak memory mapped until it exits.
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Sets glibc's mmap and trim thresholds for this process; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
