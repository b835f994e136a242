"""y = x @ W.T + b over weights in their stored dtype (float32, bfloat16 or float16 words).

Two kernels, chosen by the number of rows of x:
  - `_gemv` (the decode step, T = 1, and T <= 3) streams every weight row once, widening it in
    registers. It is bound by memory bandwidth, so it is parallel over output rows and does nothing
    else. bfloat16 rows of even length take `_gemv_bf16_pairs`, which reads two words at a time as
    one uint32 (a shift and a mask widen both, no shuffles): ~25 GB/s instead of ~23 on the
    [151936, 1024] LM head, against ~29 GB/s for a plain streaming read on this 2-core machine.
  - `_gemm` (T >= 4, the prefill) widens a tile of 32 weight rows into a float32 scratch once and
    reuses it for every row of x, in register tiles of 4 rows of x by 2 weight rows.

Both accumulate in float32. `fastmath` is limited to `reassoc` (LLVM may split a dot product over
SIMD lanes: the summation order differs from BLAS's, but it is fixed for given shapes, so results
are reproducible and do not depend on the thread count) and `contract` (fused multiply-add).
Neither assumes finite values, so inf and nan propagate.

Why not widen a block of rows and call NumPy's BLAS for the prefill, as the twin does? Alone, BLAS
is ahead (T = 512: ~175 GFLOP/s on float32 weights; this GEMM 130-165 on bf16). But between Numba
kernels, OpenBLAS's worker threads and Numba's spin while the other pool works: in a layer-like
sequence the BLAS route fell to ~90 GFLOP/s at T = 512 and ~25 at T = 64, where this GEMM kept ~140
and ~100. See tools/bench_kernels.py.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from kernels.widen import as_kernel_dtype, widen, widen_bf16_pair

_FASTMATH = {"reassoc", "contract"}
# Weight rows widened together by `_gemm`, and the columns of them reduced together (see _gemm);
# one thread at T = 512 measured 32 x 1024 ahead of 64 x 1024, 64 x 512 and 128 x 1024 by 5-15%.
_TILE_ROWS = 32
_K_BLOCK = 1024
# Up to this many rows of x, reading each weight row once and dotting it with every row beats
# widening tiles (one thread, [2816, 1024] bf16: 0.46 ms against 0.71 ms at T = 2, even at T = 4).
_GEMV_MAX_ROWS = 3


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ weight.T + bias in float32; NumPy twin: `qwen_ref.linear.linear`.

    x: [T, n_in] float32; weight: [n_out, n_in] float32, float16 or bfloat16 words (uint16);
    bias: [n_out] in a stored dtype, or None. Returns a new [T, n_out] float32 array.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)  # [T, n_in]
    weight = as_kernel_dtype(np.ascontiguousarray(weight))  # [n_out, n_in]
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear: x {x.shape} and weight {weight.shape} do not chain")
    if bias is None:
        bias = weight.reshape(-1)[:0]  # empty, but of the weight's array type: no separate compilation
    else:
        bias = as_kernel_dtype(np.ascontiguousarray(bias))  # [n_out]
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"linear: bias {bias.shape} does not match weight {weight.shape}")
    y = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)  # [T, n_out]
    if x.shape[0] <= _GEMV_MAX_ROWS and weight.dtype == np.uint16 and weight.shape[1] % 2 == 0:
        _gemv_bf16_pairs(x, weight.view(np.uint32), bias, y)
    elif x.shape[0] <= _GEMV_MAX_ROWS:
        _gemv(x, weight, bias, y)
    else:
        _gemm(x, weight, bias, y, numba.get_num_threads())
    return y


@njit(fastmath=_FASTMATH, cache=True)
def _dot(w_row, x_row):
    """sum_j widen(w_row[j]) * x_row[j] in float32."""
    acc = np.float32(0.0)
    for j in range(x_row.shape[0]):
        acc += widen(w_row[j]) * x_row[j]
    return acc


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _gemv(x, weight, bias, y):
    """y = x @ weight.T (+ bias) for a few rows of x: one pass over the weight, split by rows across threads."""
    has_bias = bias.shape[0] > 0
    for r in prange(weight.shape[0]):
        w_row = weight[r]  # [n_in]
        c = widen(bias[r]) if has_bias else np.float32(0.0)
        for t in range(x.shape[0]):
            acc = _dot(w_row, x[t])
            y[t, r] = acc + c if has_bias else acc


@njit(fastmath=_FASTMATH, cache=True)
def _dot_bf16_pairs(w_pairs, x_even, x_odd):
    """sum_j widen(w[j]) * x[j] for bfloat16 words read in pairs: little-endian, so the low half of
    pair j is element 2j and the high half element 2j + 1."""
    acc = np.float32(0.0)
    for j in range(w_pairs.shape[0]):
        low, high = widen_bf16_pair(w_pairs[j])
        acc += low * x_even[j] + high * x_odd[j]
    return acc


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _gemv_bf16_pairs(x, w_pairs, bias, y):
    """_gemv for bfloat16 weights of even row length, viewed as uint32 pairs [n_out, n_in/2]."""
    has_bias = bias.shape[0] > 0
    x_even = np.ascontiguousarray(x[:, 0::2])  # [T, n_in/2] elements 0, 2, 4, ...
    x_odd = np.ascontiguousarray(x[:, 1::2])  # [T, n_in/2] elements 1, 3, 5, ...
    for r in prange(w_pairs.shape[0]):
        w_row = w_pairs[r]  # [n_in/2]
        c = widen(bias[r]) if has_bias else np.float32(0.0)
        for t in range(x.shape[0]):
            acc = _dot_bf16_pairs(w_row, x_even[t], x_odd[t])
            y[t, r] = acc + c if has_bias else acc


@njit(fastmath=_FASTMATH, cache=True)
def _dot_4x2(x0, x1, x2, x3, w0, w1):
    """The 8 dot products of 4 rows of x with 2 weight rows: each load feeds 2 or 4 FMAs, and the 8
    sums (each spread over SIMD lanes by LLVM) stay in registers."""
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    for k in range(x0.shape[0]):
        u, v = w0[k], w1[k]
        a0 += x0[k] * u
        a1 += x1[k] * u
        a2 += x2[k] * u
        a3 += x3[k] * u
        b0 += x0[k] * v
        b1 += x1[k] * v
        b2 += x2[k] * v
        b3 += x3[k] * v
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(cache=True)
def _store_column(y, t, r, s0, s1, s2, s3, first):
    """y[t:t+4, r] = (s0, .., s3) on the first column slice, += on later ones; rows past T are dropped."""
    n = min(4, y.shape[0] - t)
    if first:
        y[t, r] = s0
        if n > 1:
            y[t + 1, r] = s1
        if n > 2:
            y[t + 2, r] = s2
        if n > 3:
            y[t + 3, r] = s3
    else:
        y[t, r] += s0
        if n > 1:
            y[t + 1, r] += s1
        if n > 2:
            y[t + 2, r] += s2
        if n > 3:
            y[t + 3, r] += s3


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _gemm(x, weight, bias, y, n_threads):
    """y = x @ weight.T (+ bias) for T >= 2, by tiles of weight rows split across n_threads.

    Within a tile, the reduction runs over slices of _K_BLOCK columns: one slice of the tile
    (32 x 1024 float32, 128 KB) stays in L2 and the 4 x rows (16 KB) in L1 while it is used; y
    accumulates the partial sums when n_in > _K_BLOCK.
    """
    T, n_in = x.shape
    n_out = weight.shape[0]
    has_bias = bias.shape[0] > 0
    n_tiles = (n_out + _TILE_ROWS - 1) // _TILE_ROWS
    n_parts = min(n_threads, n_tiles)  # given by the caller: get_num_threads() here would defeat caching
    for part in prange(n_parts):
        tile = np.empty((_TILE_ROWS, n_in), dtype=np.float32)  # [TILE_ROWS, n_in], one scratch per thread
        for tile_index in range(part * n_tiles // n_parts, (part + 1) * n_tiles // n_parts):
            r0 = tile_index * _TILE_ROWS
            rows = min(_TILE_ROWS, n_out - r0)
            for i in range(rows):
                for k in range(n_in):
                    tile[i, k] = widen(weight[r0 + i, k])
            for k0 in range(0, n_in, _K_BLOCK):
                k1 = min(k0 + _K_BLOCK, n_in)
                first = k0 == 0
                for t in range(0, T, 4):
                    # Past the last row of x (or of the tile) the micro-kernel reads the last row
                    # again rather than branching; those results are computed and not stored.
                    t1, t2, t3 = min(t + 1, T - 1), min(t + 2, T - 1), min(t + 3, T - 1)
                    x0, x1, x2, x3 = x[t, k0:k1], x[t1, k0:k1], x[t2, k0:k1], x[t3, k0:k1]  # [k1-k0] each
                    for i in range(0, rows, 2):
                        i1 = min(i + 1, rows - 1)
                        a0, a1, a2, a3, b0, b1, b2, b3 = _dot_4x2(x0, x1, x2, x3, tile[i, k0:k1], tile[i1, k0:k1])
                        if has_bias and first:
                            c = widen(bias[r0 + i])
                            a0, a1, a2, a3 = a0 + c, a1 + c, a2 + c, a3 + c
                            c = widen(bias[r0 + i1])
                            b0, b1, b2, b3 = b0 + c, b1 + c, b2 + c, b3 + c
                        _store_column(y, t, r0 + i, a0, a1, a2, a3, first)
                        if i + 1 < rows:
                            _store_column(y, t, r0 + i1, b0, b1, b2, b3, first)
