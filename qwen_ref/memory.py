"""Let the C allocator keep freed memory for the next layer instead of returning it to the OS.

A forward pass makes its intermediates as new arrays: ~30 MB per layer for a 512-token chunk of
Qwen1.5-0.5B, the largest the 5.8 MB SwiGLU activations. glibc serves them from its heap, but trims
the top of the heap whenever more than twice the largest freed block lies free there, so every
layer takes its pages from the kernel again, zeroed, one fault per 4 KB page: ~57,000 page faults
and ~0.3 s of system time per 512-token prefill (of ~2.5 s). Raising the trim threshold keeps the
heap; the mmap threshold must be set with it, because setting either one by hand turns off glibc's
own adjustment of both. After the first chunk the faults drop to ~600. The cost is that the process
keeps its peak of intermediates (~50 MB here) until it exits.
"""

import ctypes
import os
import sys

# glibc's <malloc.h>: mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks above this still get their own mapping, zeroed lazily and unmapped on free: the KV cache,
# [T, V] logits. 32 MiB is also the largest value older glibc accepts (HEAP_MAX_SIZE / 2).
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 256 << 20  # well above a prefill chunk's peak. Both go to C as int: below 2**31


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process. False where there is no glibc, or
    where the environment already sets the allocator's thresholds."""
    if not sys.platform.startswith("linux") or _user_tuned_malloc():
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the interpreter runs on
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def _user_tuned_malloc() -> bool:
    """Whether the environment sets either threshold already: the user's choice wins."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")  # e.g. glibc.malloc.trim_threshold=...:...
    names = ("trim_threshold", "mmap_threshold")
    return any(f"glibc.malloc.{name}" in tunables or f"MALLOC_{name.upper()}_" in os.environ for name in names)
