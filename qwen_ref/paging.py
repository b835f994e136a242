"""Checkpoints larger than memory: which weights the kernel should read ahead, and which it may drop.

Weights are views of read-only file mappings (weights.py), so the kernel pages them in on first
touch and may evict them at will. When they do not fit in memory, a prompt runs layer-major
(`QwenModel.decoder_layers_layer_major`): layer i's weights serve every chunk of the prompt and are then
done with. So while layer i computes, layer i+1 is read ahead (MADV_WILLNEED, from a thread: the
call can block while the reads are queued), and layer i's pages are marked cold (MADV_COLD), the
first the kernel reclaims, so that they, not the next layer's, make room. Both are hints: a kernel
without them reads the same bytes on demand.

`page_cache_fraction` says how much of a checkpoint the page cache holds before a run: a cold one is
read from disk during the first forward pass, which the command line's timings then say.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

MADV_COLD = 20  # Linux 5.4: deactivate these pages; Python's mmap module does not name it
MEMINFO = Path("/proc/meminfo")


def read_meminfo(path: Path = MEMINFO) -> dict[str, int] | None:
    """MemTotal and MemAvailable in bytes, from /proc/meminfo; None where it is missing (not Linux)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("MemTotal", "MemAvailable") and value.split():
            fields[name] = int(value.split()[0]) * 1024  # the file counts kB (KiB)
    return fields if len(fields) == 2 else None


def fits(weight_bytes: int, available: int) -> bool:
    """Whether weights can stay resident in `available` bytes, with a tenth of it left for the rest."""
    return weight_bytes <= 0.9 * available


def fits_in_memory(weight_bytes: int, meminfo: Path = MEMINFO) -> bool:
    """`fits` in this machine's MemAvailable now; True where that cannot be read (the chunk-by-chunk
    order, which needs no hints, is then kept unless asked for)."""
    memory = read_meminfo(meminfo)
    return memory is None or fits(weight_bytes, memory["MemAvailable"])


def page_cache_fraction(paths: Iterable[Path]) -> float | None:
    """The fraction of these files' pages that the page cache holds now, or None where that cannot be
    asked (mincore(2) on a fresh mapping: it reads nothing and faults nothing in)."""
    try:
        mincore = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        pages = np.zeros(-(-size // mmap.PAGESIZE), dtype=np.uint8)  # [n_pages], bit 0: resident
        view = np.frombuffer(mapping, dtype=np.uint8)
        failed = mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), ctypes.c_void_p(pages.ctypes.data))
        del view  # the mapping cannot close while a view exports it
        mapping.close()
        if failed:
            return None
        resident += int(np.count_nonzero(pages & 1))
        total += len(pages)
    return resident / total if total else None


def _mapping(array: np.ndarray) -> tuple[mmap.mmap, int] | None:
    """The file mapping an array is a view of, and the array's byte offset in it."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if not (isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)):
        return None
    start = np.frombuffer(base.obj, dtype=np.uint8).ctypes.data
    return base.obj, array.ctypes.data - start


def advise(arrays: Iterable[np.ndarray | None], advice: int) -> None:
    """madvise the file pages under each memory-mapped array (others are skipped)."""
    for array in arrays:
        found = None if array is None else _mapping(array)
        if found is None or array.nbytes == 0:
            continue
        mapping, offset = found
        begin = offset - offset % mmap.PAGESIZE  # madvise wants a page-aligned start
        try:
            mapping.madvise(advice, begin, offset + array.nbytes - begin)
        except (OSError, ValueError):
            pass  # an advice this kernel does not know: it stays a hint not given


class LayerPager:
    """Reads layer i+1 ahead and cools layer i-1 as a layer-major pass reaches layer i."""

    def __init__(self, layers: list[list[np.ndarray | None]]) -> None:
        self._layers = layers  # each layer's weight arrays
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-ref-readahead")

    def start(self, i: int) -> None:
        """Layer i is about to run on every chunk."""
        if i == 0:
            advise(self._layers[0], mmap.MADV_WILLNEED)
        if i + 1 < len(self._layers):
            self._reader.submit(advise, self._layers[i + 1], mmap.MADV_WILLNEED)
        if i > 0:
            advise(self._layers[i - 1], MADV_COLD)
