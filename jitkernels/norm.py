"""RMSNorm over the rows of a float32 matrix, with a weight in its stored dtype."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from jitkernels.cache import CACHE
from jitkernels.threads import PARALLEL_MIN_ELEMENTS
from jitkernels.widen import as_kernel_dtype, widen


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """weight * x / sqrt(mean(x^2) + eps) per row; NumPy twin: `qwen_ref.rms_norm.rms_norm`.

    x: [T, D] float32; weight: [D] float32, float16 or bfloat16 words. Returns a new [T, D] float32.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)  # [T, D]
    weight = as_kernel_dtype(np.ascontiguousarray(weight))  # [D]
    if x.ndim != 2 or weight.shape != x.shape[1:]:
        raise ValueError(f"rms_norm: x {x.shape} and weight {weight.shape} do not match")
    out = np.empty_like(x)  # [T, D]
    if x.size >= PARALLEL_MIN_ELEMENTS:
        _rms_norm_parallel(x, weight, np.float32(eps), out)
    else:
        _rms_norm_rows(x, weight, np.float32(eps), out, 0, x.shape[0])
    return out


@njit(fastmath={"reassoc"}, cache=CACHE)
def _sum_squares(row):
    """sum(row^2) in float32; reassoc lets LLVM spread it over SIMD lanes (NumPy sums pairwise)."""
    acc = np.float32(0.0)
    for d in range(row.shape[0]):
        acc += row[d] * row[d]
    return acc


@njit(cache=CACHE)
def _rms_norm_rows(x, weight, eps, out, start, stop):
    D = x.shape[1]
    for t in range(start, stop):
        # float32 throughout, rounded in transformers' order: mean, + eps, rsqrt, x * r, then w * (x r)
        inv_rms = np.float32(1.0) / np.sqrt(_sum_squares(x[t]) / np.float32(D) + eps)
        for d in range(D):
            out[t, d] = widen(weight[d]) * (x[t, d] * inv_rms)


@njit(parallel=True, cache=CACHE)
def _rms_norm_parallel(x, weight, eps, out):
    for t in prange(x.shape[0]):
        _rms_norm_rows(x, weight, eps, out, t, t + 1)
