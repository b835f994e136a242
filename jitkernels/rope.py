"""Rotary position embedding in the rotate_half convention (element j pairs with j + hd/2)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from jitkernels.cache import CACHE
from jitkernels.threads import PARALLEL_MIN_ELEMENTS


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x * cos + rotate_half(x) * sin for every head; NumPy twin: `qwen_ref.rope.apply_rope`.

    x: [T, n_heads, hd] float32; cos, sin: [T, hd/2] float32. Returns a new array; x is not written.
    Each output is rounded as the twin rounds it (two products, then one sum), so the two agree
    bit for bit.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)  # [T, n_heads, hd]
    cos = np.ascontiguousarray(cos, dtype=np.float32)  # [T, hd/2]
    sin = np.ascontiguousarray(sin, dtype=np.float32)  # [T, hd/2]
    T, _, hd = x.shape
    if hd % 2 or cos.shape != (T, hd // 2) or sin.shape != cos.shape:
        raise ValueError(f"apply_rope: x {x.shape} needs cos and sin of shape ({T}, {hd // 2})")
    out = np.empty_like(x)  # [T, n_heads, hd]
    if x.size >= PARALLEL_MIN_ELEMENTS:
        _apply_rope_parallel(x, cos, sin, out)
    else:
        _apply_rope_rows(x, cos, sin, out, 0, T)
    return out


# No fastmath: `contract` would fuse a product into the sum and round differently from the twin.
@njit(cache=CACHE)
def _apply_rope_rows(x, cos, sin, out, start, stop):
    half = x.shape[2] // 2
    for t in range(start, stop):
        for h in range(x.shape[1]):
            for j in range(half):
                x1, x2 = x[t, h, j], x[t, h, j + half]
                c, s = cos[t, j], sin[t, j]
                out[t, h, j] = x1 * c - x2 * s
                out[t, h, j + half] = x2 * c + x1 * s


@njit(parallel=True, cache=CACHE)
def _apply_rope_parallel(x, cos, sin, out):
    for t in prange(x.shape[0]):
        _apply_rope_rows(x, cos, sin, out, t, t + 1)
