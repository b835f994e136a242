"""The SwiGLU gate elementwise: silu(g) and silu(gate) * up (the fused GEMV form is matmul.swiglu)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels.exp import exp32
from kernels.threads import PARALLEL_MIN_ELEMENTS


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up with silu(g) = g / (1 + exp(-g)); NumPy twin: `qwen_ref.mlp.silu_mul`.

    gate, up: [T, F] float32. Returns a new [T, F] float32 array.
    """
    gate = np.ascontiguousarray(gate, dtype=np.float32)  # [T, F]
    up = np.ascontiguousarray(up, dtype=np.float32)  # [T, F]
    if gate.ndim != 2 or gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {gate.shape} and up {up.shape} differ")
    out = np.empty_like(gate)  # [T, F]
    if gate.size >= PARALLEL_MIN_ELEMENTS:
        _silu_mul_parallel(gate, up, out)
    else:
        _silu_mul_rows(gate, up, out, 0, gate.shape[0])
    return out


# error_model="numpy": 1 + e^-g >= 1 is never 0, and Python's zero-division check on the divisor
# kept every loop that calls silu from vectorising (measured 9x slower per element)
@njit(error_model="numpy", cache=True)
def silu(g: np.float32) -> np.float32:
    """g * sigmoid(g); exp(-g) overflows to inf for g << 0, where g / inf is the correct limit -0."""
    return g / (np.float32(1.0) + exp32(-g))


@njit(cache=True)
def _silu_mul_rows(gate, up, out, start, stop):
    for t in range(start, stop):
        for f in range(gate.shape[1]):
            out[t, f] = silu(gate[t, f]) * up[t, f]


@njit(parallel=True, cache=True)
def _silu_mul_parallel(gate, up, out):
    for t in prange(gate.shape[0]):
        _silu_mul_rows(gate, up, out, t, t + 1)
