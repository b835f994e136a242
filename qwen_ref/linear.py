"""Linear projection over stored weights: the NumPy specification of the matmul kernels."""

import numpy as np

from qwen_ref.weights import to_float32

# Rows of a 16-bit weight widened at a time: bounds the float32 scratch (the tied LM head of
# Qwen1.5-0.5B would otherwise need a 622 MB float32 copy) while keeping BLAS calls large.
_ROW_BLOCK = 4096


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ weight.T + bias, as torch.nn.Linear.forward, accumulated in float32.

    x: [T, n_in] float32; weight: [n_out, n_in] float32, float16 or bfloat16 words; bias: [n_out].
    """
    n_out = weight.shape[0]
    y = np.empty((x.shape[0], n_out), dtype=np.float32)  # [T, n_out]
    for start in range(0, n_out, _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        y[:, rows] = x @ to_float32(weight[rows]).T  # [T, block]
    if bias is not None:
        y += to_float32(bias)
    return y


def linears(
    x: np.ndarray, weights: tuple[np.ndarray, ...], biases: tuple[np.ndarray | None, ...]
) -> tuple[np.ndarray, ...]:
    """(linear(x, W, b) for each W, b): several projections of one input (q, k and v)."""
    return tuple(linear(x, w, b) for w, b in zip(weights, biases, strict=True))
