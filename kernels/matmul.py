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
  - `_gemm` (T >= 4, the prefill) widens a tile of 16 weight rows once, transposed, into a float32
    scratch and reuses it for every 4 rows of x. A 4 x 16 block of y stays in 8 AVX2 registers over
    the whole sum (`_block_4x16`, via `kernels.registers`): each step broadcasts one element of 4
    rows of x and needs 6 loads for 8 FMAs, with no horizontal sums. Against the dot-product form
    it replaced (4 rows of x by 2 weight rows, 8 horizontal sums per tile; `_gemm` of commit
    a48f1c3), swapped in and out of one process in turn, the 0.5B model's 512-token prefill ran
    5% and 16% faster (medians of 8 runs each, two sessions) and down_proj (n_in 2816) up to 20%.
    One core reaches ~80 GFLOP/s where OpenBLAS does ~90 on float32 weights.

Both accumulate in float32. `fastmath` is limited to `reassoc` (LLVM may split a dot product over
SIMD lanes: the summation order differs from BLAS's, but it is fixed for given shapes, so results
are reproducible and do not depend on the thread count) and `contract` (fused multiply-add).
Neither assumes finite values, so inf and nan propagate.

Why not widen a block of rows and call NumPy's BLAS for the prefill, as the twin does? Alone, BLAS
is ahead on float32 weights, but between Numba kernels, OpenBLAS's worker threads and Numba's spin
while the other pool works: in a layer-like sequence the BLAS route fell to ~90 GFLOP/s at T = 512
and ~25 at T = 64, where a Numba GEMM kept ~140 and ~100. See tools/bench_kernels.py.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from kernels.registers import register_block
from kernels.silu import silu, silu_mul
from kernels.widen import as_kernel_dtype, widen, widen_bf16_pair

_FASTMATH = {"reassoc", "contract"}
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
        pairs = w.view(np.uint32)  # [n_out, n_in/2]
        if not pairs.flags.aligned:  # 2 bytes past a 4-byte boundary (safetensors data is 8-byte aligned)
            pairs = as_kernel_dtype(w.copy()).view(np.uint32)
        return pairs
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
def _block_4x16(x, t0, w_tile, bias_tile, y, r0, rows, cols):
    """y[t0:t0+rows, r0:r0+cols] = x[t0:t0+rows] @ w_tile[:, :cols] + bias_tile[:cols], rows <= 4, cols <= 16.

    The 4 x 16 block of y stays in registers (8 AVX2 accumulators) for the whole loop over n_in: each
    step broadcasts one element of 4 rows of x and multiplies the 16 weights of that column.
    """
    c = register_block(64)  # [4 * 16] c[t * 16 + j] accumulates y[t0 + t, r0 + j]
    last = x.shape[0] - 1
    # Past the last row of x the block reads that row again rather than branching; not stored.
    x0, x1, x2, x3 = x[t0], x[min(t0 + 1, last)], x[min(t0 + 2, last)], x[min(t0 + 3, last)]  # [n_in] each
    for k in range(w_tile.shape[0]):
        w = w_tile[k]  # [16] element k of the tile's 16 weight rows
        a0, a1, a2, a3 = x0[k], x1[k], x2[k], x3[k]
        for j in range(16):
            c[j] += a0 * w[j]
            c[16 + j] += a1 * w[j]
            c[32 + j] += a2 * w[j]
            c[48 + j] += a3 * w[j]
    for t in range(rows):
        for j in range(cols):
            y[t0 + t, r0 + j] = c[t * 16 + j] + bias_tile[j]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _gemm(x, weight, bias, y, n_threads):
    """y = x @ weight.T (+ bias) for T >= 4 (any T works), by tiles of 16 weight rows split across n_threads.

    Each tile is widened once, transposed, into a float32 scratch [n_in, 16] (64 KB at n_in 1024,
    in L2) and serves every 4-row block of x.
    """
    T, n_in = x.shape
    n_out = weight.shape[0]
    has_bias = bias.shape[0] > 0
    n_tiles = (n_out + 15) // 16
    n_parts = min(n_threads, n_tiles)  # given by the caller: get_num_threads() here would defeat caching
    for part in prange(n_parts):
        w_tile = np.zeros((n_in, 16), dtype=np.float32)  # [n_in, 16] one scratch per thread
        bias_tile = np.zeros(16, dtype=np.float32)  # [16]
        for tile in range(part * n_tiles // n_parts, (part + 1) * n_tiles // n_parts):
            r0 = tile * 16
            cols = min(16, n_out - r0)  # the last tile may be narrower; its spare columns are not stored
            for j in range(cols):
                for k in range(n_in):
                    w_tile[k, j] = widen(weight[r0 + j, k])
                bias_tile[j] = widen(bias[r0 + j]) if has_bias else np.float32(0.0)
            for t0 in range(0, T, 4):
                _block_4x16(x, t0, w_tile, bias_tile, y, r0, min(4, T - t0), cols)
