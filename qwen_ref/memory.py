"""Let the C allocator keep freed memory for the next forward pass instead of returning it to the OS.

A forward pass makes its intermediates as new arrays: ~30 MB per layer for a 512-token chunk of
Qwen1.5-0.5B (the SwiGLU activations alone are 5.8 MB). glibc serves blocks of 128 KB and more
with mmap and gives them back on free, and trims the top of its heap as soon as 128 KB there is
free; each new array then takes its pages from the kernel again, zeroed, one fault per 4 KB page.
That was ~57,000 page faults and ~0.3 s of system time per 512-token prefill (of ~2.5 s). Raising
both thresholds keeps the memory mapped: after the first chunk the faults drop to ~600.
The cost is that the process keeps its peak of intermediates (tens of MB) until it exits.
"""

from __future__ import annotations

import ctypes
import sys

# glibc's <malloc.h>: mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2); arrays larger
# than this (a [T, V] logits matrix) are still mapped and unmapped whole.
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library the interpreter runs on
    mallopt = getattr(libc, "mallopt", None)  # glibc has it; musl does not
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
