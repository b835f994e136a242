"""y = x @ W.T + b over weights in their stored dtype (float32, bfloat16 or float16 words).

Two kernels, chosen by the number of rows of x:
  - `_gemv` (the decode step, T = 1, and T <= 3) streams every weight row once, widening it in
    registers. It is bound by memory bandwidth, so it is parallel over output rows and does nothing
    else. bfloat16 rows of even length are read as uint32 pairs (`_dot_bf16_pairs`: a shift and a
    mask widen both words, no shuffles). It takes several weights at once (`linears`: q, k and v;
    `swiglu`: gate and up, with the SwiGLU gate applied as each pair of rows is done), because each
    parallel region costs a thread wake-up and a wait for the slower thread: on the decode step of
    Qwen1.5-0.5B, 4 regions per layer instead of 7 and no separate silu_mul. The weight GEMVs of a
    whole step, called back to back, stream at the machine's read bandwidth (32 GB/s against 32-33
    for tools/bench.py's streaming read); per core the bf16 GEMV reads ~17 GB/s against ~21 for a
    float32 sum, the cost of widening.
  - `_gemm` (T >= 4, the prefill) widens a tile of 32 weight rows into a float32 scratch once and
    reuses it for every row of x, in register tiles of 4 rows of x by 2 weight rows. On one core it
    reaches 73-77 GFLOP/s where OpenBLAS does 90 on float32 weights (T = 512, [2816, 1024]): each
    4 x 2 tile ends in 8 horizontal sums. BLAS kernels broadcast x and keep a 6 x 16 block of y in
    vector registers instead, which needs vector types Numba does not expose.

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
from numba import njit, prange, types
from numba.extending import overload

from kernels.silu import silu, silu_mul
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
    (y,) = linears(x, (weight,), (bias,))
    return y


def linears(
    x: np.ndarray, weights: tuple[np.ndarray, ...], biases: tuple[np.ndarray | None, ...]
) -> tuple[np.ndarray, ...]:
    """(x @ W.T + b for each W, b): projections of one input; NumPy twin: `qwen_ref.linear.linears`.

    The weights share a dtype and n_in. For a few rows of x (decode) they are read in one parallel
    pass, so q, k and v cost one wake-up of the threads instead of three. This wrapper runs once
    per projection per token, so it keeps its Python work small.
    """
    if len(biases) != len(weights):
        raise ValueError(f"linears: {len(weights)} weights but {len(biases)} biases")
    x = np.ascontiguousarray(x, dtype=np.float32)  # [T, n_in]
    gemv = x.shape[0] <= _GEMV_MAX_ROWS
    ws = tuple(_kernel_weight(w, x, gemv) for w in weights)  # [n_out_i, n_in] (uint32 pairs for bfloat16)
    bs = tuple(_kernel_bias(b, w) for w, b in zip(ws, biases))  # [n_out_i] stored words
    if any(w.dtype != ws[0].dtype for w in ws):
        raise ValueError(f"linears: weights of one call must share a dtype, not {[w.dtype for w in weights]}")
    ys = tuple(np.empty((x.shape[0], len(w)), dtype=np.float32) for w in ws)  # [T, n_out_i]
    if gemv:
        _gemv(x, ws, bs, ys)
    else:
        for w, b, y in zip(ws, bs, ys):
            _gemm(x, w, b, y, numba.get_num_threads())
    return ys


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray) -> np.ndarray:
    """silu(x @ w_gate.T) * (x @ w_up.T); NumPy twin: `qwen_ref.mlp.swiglu`.

    For a few rows of x the two products and the gate share one parallel pass over both weights.
    Returns a new [T, F] float32 array.
    """
    if w_gate.shape != w_up.shape or w_gate.dtype != w_up.dtype:
        raise ValueError(f"swiglu: gate {w_gate.shape} {w_gate.dtype} and up {w_up.shape} {w_up.dtype} differ")
    x = np.ascontiguousarray(x, dtype=np.float32)  # [T, D]
    if x.shape[0] > _GEMV_MAX_ROWS:
        gate, up = linears(x, (w_gate, w_up), (None, None))  # [T, F] each
        return silu_mul(gate, up)
    wg, wu = _kernel_weight(w_gate, x, True), _kernel_weight(w_up, x, True)  # [F, D] each
    y = np.empty((x.shape[0], len(wg)), dtype=np.float32)  # [T, F]
    _gemv_swiglu(x, wg, wu, y)
    return y


def _kernel_weight(w: np.ndarray, x: np.ndarray, gemv: bool) -> np.ndarray:
    """The weight as the kernels read it; for the GEMV, bfloat16 rows of even length as uint32 pairs."""
    w = as_kernel_dtype(w)  # [n_out, n_in]
    shape = w.shape
    if len(shape) != 2 or x.ndim != 2 or x.shape[1] != shape[1]:
        raise ValueError(f"linear: x {x.shape} and weight {shape} do not chain")
    if gemv and shape[1] % 2 == 0 and w.dtype.char == "H":
        if w.ctypes.data % 4:
            w = as_kernel_dtype(w.copy())  # a uint32 view must be 4-byte aligned (safetensors data is 8-byte aligned)
        return w.view(np.uint32)  # [n_out, n_in/2]
    return w


def _kernel_bias(b: np.ndarray | None, kernel_w: np.ndarray) -> np.ndarray:
    """The bias as stored words, or an empty array of the stored type (no separate compilation for
    "no bias"). The bias of uint32 pairs is made of uint16 (bfloat16) words."""
    words = kernel_w.view(np.uint16) if kernel_w.dtype.char == "I" else kernel_w  # [n_out, n_in]
    if b is None:
        return words.reshape(-1)[:0]  # [0], read-only like the weight
    stored = words.dtype.char
    b = as_kernel_dtype(b)  # [n_out]
    if b.dtype.char != stored or b.shape != (len(kernel_w),):
        raise ValueError(f"linear: bias {b.shape} {b.dtype} does not match weight {kernel_w.shape} {kernel_w.dtype}")
    return b


@njit(fastmath=_FASTMATH, cache=True)
def _dot(w_row, x_row):
    """sum_j widen(w_row[j]) * x_row[j] in float32."""
    acc = np.float32(0.0)
    for j in range(x_row.shape[0]):
        acc += widen(w_row[j]) * x_row[j]
    return acc


@njit(fastmath=_FASTMATH, cache=True)
def _dot_bf16_pairs(w_pairs, x_even, x_odd):
    """sum_j widen(w[j]) * x[j] for bfloat16 words read in pairs: little-endian, so the low half of
    pair j is element 2j and the high half element 2j + 1."""
    acc = np.float32(0.0)
    for j in range(w_pairs.shape[0]):
        low, high = widen_bf16_pair(w_pairs[j])
        acc += low * x_even[j] + high * x_odd[j]
    return acc


def _row_dot(w_row, x_row, x_even, x_odd):
    """One output of a GEMV: a weight row (stored words, or uint32 bfloat16 pairs) dotted with x."""
    if w_row.dtype == np.uint32:
        return _dot_bf16_pairs(w_row, x_even, x_odd)
    return _dot(w_row, x_row)


@overload(_row_dot)
def _row_dot_jit(w_row, x_row, x_even, x_odd):
    if w_row.dtype == types.uint32:
        return lambda w_row, x_row, x_even, x_odd: _dot_bf16_pairs(w_row, x_even, x_odd)
    return lambda w_row, x_row, x_even, x_odd: _dot(w_row, x_row)


@njit(cache=True)
def _locate_row(weights, r):
    """(i, row): overall row r of the weights numbered one after another is row `row` of weights[i]."""
    i, row = 0, np.int64(r)  # prange's index may be unsigned: uint64 - int64 would be float64 in Numba
    while row >= weights[i].shape[0]:
        row -= weights[i].shape[0]
        i += 1
    return i, row


@njit(cache=True)
def _even_odd(x):
    """x[:, 0::2] and x[:, 1::2], contiguous: the partners of the low and high words of bfloat16 pairs."""
    return np.ascontiguousarray(x[:, 0::2]), np.ascontiguousarray(x[:, 1::2])


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _gemv(x, weights, biases, ys):
    """ys[i] = x @ weights[i].T (+ biases[i]) for a few rows of x: one pass over every weight, their
    rows numbered one after another and split across threads."""
    x_even, x_odd = _even_odd(x)  # [T, n_in/2] each; used for uint32 pairs only
    n_out = 0
    for w in weights:
        n_out += w.shape[0]
    for r in prange(n_out):
        i, row = _locate_row(weights, r)
        w_row, bias, y = weights[i][row], biases[i], ys[i]
        c = widen(bias[row]) if bias.shape[0] > 0 else np.float32(0.0)
        for t in range(x.shape[0]):
            y[t, row] = _row_dot(w_row, x[t], x_even[t], x_odd[t]) + c


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _gemv_swiglu(x, w_gate, w_up, y):
    """y = silu(x @ w_gate.T) * (x @ w_up.T) for a few rows of x, gate and up rows read side by side."""
    x_even, x_odd = _even_odd(x)  # [T, n_in/2] each; used for uint32 pairs only
    for r in prange(w_gate.shape[0]):
        for t in range(x.shape[0]):
            g = _row_dot(w_gate[r], x[t], x_even[t], x_odd[t])
            u = _row_dot(w_up[r], x[t], x_even[t], x_odd[t])
            y[t, r] = silu(g) * u


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
    """y = x @ weight.T (+ bias) for T >= 4 (any T works), by tiles of weight rows split across n_threads.

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
