"""The SwiGLU gate silu(g) = g * sigmoid(g), applied inside the matmul kernels (matmul.swiglu)."""

from __future__ import annotations

import numpy as np
from numba import njit

from jitkernels.cache import CACHE
from jitkernels.exp import exp32


# error_model="numpy": 1 + e^-g >= 1 is never 0, and Python's zero-division check on the divisor
# kept every loop that calls silu from vectorising (benchmarks/KERNELS.md, silu)
@njit(error_model="numpy", cache=CACHE)
def silu(g: np.float32) -> np.float32:
    """g * sigmoid(g); exp(-g) overflows to inf for g << 0, where g / inf is the correct limit -0."""
    return g / (np.float32(1.0) + exp32(-g))
