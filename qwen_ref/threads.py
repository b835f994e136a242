"""How many threads the matrix kernels use: Numba's parallel loops and NumPy's BLAS alike."""

from __future__ import annotations

import os

import numba
from threadpoolctl import threadpool_limits

from qwen_ref.errors import QwenRefError


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), not merely cores in the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(n: int | None = None) -> int:
    """Run on `n` threads (default: every available core); returns the number used."""
    n = available_cores() if n is None else n
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise QwenRefError(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {n}")
    numba.set_num_threads(n)
    threadpool_limits(limits=n)  # BLAS (OpenBLAS in NumPy's wheels), used by the numpy backend and prefill
    return n

