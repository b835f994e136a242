"""y = x @ W.T + b over weights in their stored dtype (float32, bfloat16 or float16 words).

Two kinds of kernel, chosen by the number of rows of x:
  - `_gemv` (decode, T <= 3) streams every weight row once, widening it in registers: it is bound by
    memory bandwidth, so it is parallel over output rows and does nothing else. It takes several
    weights at once (`linears`: q, k, v; `swiglu`: gate and up, gated as each pair of rows is done),
    because every parallel region costs a thread wake-up and a wait for the slower thread.
  - `_gemm` (prefill, T >= 4) widens tiles of 16 weight rows into an L2-sized float32 scratch and runs
    every block of 4 rows of x over them with `microkernel.block_4x16`, a 4 x 16 block of y kept in
    registers; `_gemm_swiglu` puts gate and up rows in one tile and gates in its epilogue. The prefill
    has a second kernel, `gemm="blas"` (`gemm_blas`: widened blocks through OpenBLAS's sgemm, called
    inside Numba's threads); the host's choice between them is `choice.py`'s.
Both accumulate in float32 with `fastmath` limited to `reassoc` and `contract`: the summation order is
fixed for given shapes (reproducible, whatever the thread count), and inf and nan propagate.
The measurements behind these choices: benchmarks/KERNELS.md, matmul.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from jitkernels import blas
from jitkernels.cache import CACHE
from jitkernels.gemm_blas import linears_blas, swiglu_blas
from jitkernels.microkernel import block_4x16
from jitkernels.silu import silu
from jitkernels.widen import as_kernel_dtype, widen, widen_bf16_pair

_FASTMATH = {"reassoc", "contract"}
GEMMS = ("numba", "blas")  # the kernels for T >= 4: _gemm and _gemm_swiglu here, or jitkernels.gemm_blas
# Up to this many rows of x, reading each weight row once and dotting it with every row beats
# widening tiles (one thread, [2816, 1024] bf16: 0.46 ms against 0.71 ms at T = 2, even at T = 4).
_GEMV_MAX_ROWS = 3
# The GEMM widens up to this many bytes of tiles (at least one tile, at most _MAX_GROUP) and runs each
# block of 4 rows of x over all of them: the tiles stay in L2 (512 KB per core here) and x is read
# from L3 once per group rather than once per tile.
_GROUP_BYTES = 256 * 1024
_MAX_GROUP = 4
# Weight columns widened at a time by _widen_tile: 16 rows of them fill 16 KB of scratch (in L1).
_WIDEN_CHUNK = 256


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, gemm: str = "numba") -> np.ndarray:
    """y = x @ weight.T + bias in float32; NumPy twin: `qwen_ref.linear.linear`.

    x: [T, n_in] float32; weight: [n_out, n_in] float32, float16 or bfloat16 words (uint16);
    bias: [n_out] in a stored dtype, or None. Returns a new [T, n_out] float32 array. `gemm` names
    the kernel for T >= 4 (`GEMMS`: this module's `_gemm`, or `jitkernels.gemm_blas`).
    """
    (y,) = linears(x, (weight,), (bias,), gemm)
    return y


def linears(
    x: np.ndarray, weights: tuple[np.ndarray, ...], biases: tuple[np.ndarray | None, ...], gemm: str = "numba"
) -> tuple[np.ndarray, ...]:
    """(x @ W.T + b for each W, b): projections of one input; NumPy twin: `qwen_ref.linear.linears`.

    The weights share a dtype and n_in. For a few rows of x (decode) they are read in one parallel
    pass, so q, k and v cost one wake-up of the threads instead of three; so they are for T >= 4 on
    the "blas" GEMM. This wrapper runs once per projection per token, so it keeps its Python work small.
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
    elif check_gemm(gemm) == "blas":
        linears_blas(x, ws, bs, ys)
    else:
        for w, b, y in zip(ws, bs, ys):
            _gemm(x, w, b, y, numba.get_num_threads())
    return ys


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, gemm: str = "numba") -> np.ndarray:
    """silu(x @ w_gate.T) * (x @ w_up.T); NumPy twin: `qwen_ref.mlp.swiglu`.

    One parallel pass over both weights, the gate applied as each block of outputs is done
    (`_gemv_swiglu` for a few rows of x, `_gemm_swiglu` or `gemm_blas.swiglu_blas` for more, as `gemm`
    says). Returns a new [T, F] float32 array.
    """
    if w_gate.shape != w_up.shape or w_gate.dtype != w_up.dtype:
        raise ValueError(f"swiglu: gate {w_gate.shape} {w_gate.dtype} and up {w_up.shape} {w_up.dtype} differ")
    x = np.ascontiguousarray(x, dtype=np.float32)  # [T, D]
    gemv = x.shape[0] <= _GEMV_MAX_ROWS
    wg, wu = _kernel_weight(w_gate, x, gemv), _kernel_weight(w_up, x, gemv)  # [F, D] each
    y = np.empty((x.shape[0], len(wg)), dtype=np.float32)  # [T, F]
    if gemv:
        _gemv_swiglu(x, wg, wu, y)
    elif check_gemm(gemm) == "blas":
        swiglu_blas(x, wg, wu, y)
    else:
        _gemm_swiglu(x, wg, wu, y, numba.get_num_threads())
    return y


def check_gemm(gemm: str) -> str:
    """gemm itself if it names one of GEMMS that this process can run; else a ValueError."""
    if gemm not in GEMMS:
        raise ValueError(f"unknown GEMM {gemm!r} (choose from {', '.join(GEMMS)})")
    if gemm == "blas" and not blas.available():
        raise ValueError(f"the blas GEMM is unavailable: {blas.UNAVAILABLE}")
    return gemm


def _kernel_weight(w: np.ndarray, x: np.ndarray, gemv: bool) -> np.ndarray:
    """The weight as the kernels read it; for the GEMV, bfloat16 rows of even length as uint32 pairs."""
    w = as_kernel_dtype(w)  # [n_out, n_in]
    shape = w.shape
    if len(shape) != 2 or x.ndim != 2 or x.shape[1] != shape[1]:
        raise ValueError(f"linear: x {x.shape} and weight {shape} do not chain")
    return gemv_weight(w) if gemv else w


def gemv_weight(w: np.ndarray) -> np.ndarray:
    """A weight in kernel form (`as_kernel_dtype`) as _gemv reads it: bfloat16 rows of even length as
    uint32 pairs, a view unless it would be unaligned."""
    if w.shape[1] % 2 == 0 and w.dtype.char == "H":
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


@njit(fastmath=_FASTMATH, cache=CACHE)
def _dot(w_row, x_row):
    """sum_j widen(w_row[j]) * x_row[j] in float32."""
    acc = np.float32(0.0)
    for j in range(x_row.shape[0]):
        acc += widen(w_row[j]) * x_row[j]
    return acc


@njit(fastmath=_FASTMATH, cache=CACHE)
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


@njit(cache=CACHE)
def _locate_row(weights, r):
    """(i, row): overall row r of the weights numbered one after another is row `row` of weights[i]."""
    i, row = 0, np.int64(r)  # prange's index may be unsigned: uint64 - int64 would be float64 in Numba
    while row >= weights[i].shape[0]:
        row -= weights[i].shape[0]
        i += 1
    return i, row


@njit(cache=CACHE)
def _even_odd(x):
    """x[:, 0::2] and x[:, 1::2], contiguous: the partners of the low and high words of bfloat16 pairs."""
    return np.ascontiguousarray(x[:, 0::2]), np.ascontiguousarray(x[:, 1::2])


@njit(parallel=True, fastmath=_FASTMATH, cache=CACHE)
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


@njit(parallel=True, fastmath=_FASTMATH, cache=CACHE)
def _gemv_swiglu(x, w_gate, w_up, y):
    """y = silu(x @ w_gate.T) * (x @ w_up.T) for a few rows of x, gate and up rows read side by side."""
    x_even, x_odd = _even_odd(x)  # [T, n_in/2] each; used for uint32 pairs only
    for r in prange(w_gate.shape[0]):
        for t in range(x.shape[0]):
            g = _row_dot(w_gate[r], x[t], x_even[t], x_odd[t])
            u = _row_dot(w_up[r], x[t], x_even[t], x_odd[t])
            y[t, r] = silu(g) * u


@njit(fastmath=_FASTMATH, cache=CACHE)
def _widen_tile(weight, r0, cols, w_tile, j0, rows):
    """w_tile[:, j0:j0+cols] = weight[r0:r0+cols].T widened to float32, a chunk of columns at a time
    through `rows` [16, >= _WIDEN_CHUNK]: each chunk is widened where it lies (contiguous, so in
    SIMD registers: vcvtph2ps for float16), then transposed. Widening inside the transpose took a
    scalar conversion per element, which cost float16 weights ~10% of the GEMM."""
    K = w_tile.shape[0]
    for k0 in range(0, K, _WIDEN_CHUNK):
        n = min(_WIDEN_CHUNK, K - k0)
        for j in range(cols):
            src, dst = weight[r0 + j, k0 : k0 + n], rows[j]  # [n] stored words, [>= n] float32
            for k in range(n):
                dst[k] = widen(src[k])
        for k in range(n):
            for j in range(cols):
                w_tile[k0 + k, j0 + j] = rows[j, k]


@njit(cache=CACHE)
def _widen_scratch():
    """_widen_tile's scratch. The transpose reads all 16 rows at each column: rows 16 floats longer
    than a chunk (1088 bytes apart, not 1 KB) put those 16 reads in 16 sets of the L1 cache, not 4."""
    return np.empty((16, _WIDEN_CHUNK + 16), dtype=np.float32)


@njit(cache=CACHE)
def _tiles_per_group(n_in, n_tiles, n_threads):
    """Tiles widened together: up to _GROUP_BYTES of [n_in, 16] float32 tiles, at most _MAX_GROUP,
    and no more than leaves every thread a group."""
    tile_bytes = 16 * 4 * max(n_in, 1)
    return max(1, min(_MAX_GROUP, _GROUP_BYTES // tile_bytes, n_tiles // n_threads))


@njit(parallel=True, fastmath=_FASTMATH, cache=CACHE)
def _gemm(x, weight, bias, y, n_threads):
    """y = x @ weight.T (+ bias) for T >= 4 (any T works): groups of tiles of 16 weight rows, split
    across n_threads (given by the caller: get_num_threads() here would defeat caching)."""
    T, n_in = x.shape
    n_out = weight.shape[0]
    has_bias = bias.shape[0] > 0
    n_tiles = (n_out + 15) // 16
    per_group = _tiles_per_group(n_in, n_tiles, n_threads)
    n_groups = (n_tiles + per_group - 1) // per_group
    n_parts = min(n_threads, n_groups)
    for part in prange(n_parts):
        w_tiles = np.zeros((per_group, n_in, 16), dtype=np.float32)  # one scratch per thread
        bias_tiles = np.zeros((per_group, 16), dtype=np.float32)
        rows = _widen_scratch()  # [16, _WIDEN_CHUNK + 16]
        block = np.empty((4, 16), dtype=np.float32)
        for group in range(part * n_groups // n_parts, (part + 1) * n_groups // n_parts):
            in_group = min(per_group, n_tiles - group * per_group)  # the last group may be smaller
            for g in range(in_group):
                r0 = (group * per_group + g) * 16
                cols = min(16, n_out - r0)  # the last tile may be narrower; its spare columns are not stored
                _widen_tile(weight, r0, cols, w_tiles[g], 0, rows)
                for j in range(cols):
                    bias_tiles[g, j] = widen(bias[r0 + j]) if has_bias else np.float32(0.0)
            for t0 in range(0, T, 4):
                for g in range(in_group):
                    r0 = (group * per_group + g) * 16
                    block_4x16(x, t0, w_tiles[g], 0, block)
                    for t in range(min(4, T - t0)):
                        for j in range(min(16, n_out - r0)):
                            y[t0 + t, r0 + j] = block[t, j] + bias_tiles[g, j]


@njit(parallel=True, fastmath=_FASTMATH, cache=CACHE)
def _gemm_swiglu(x, w_gate, w_up, y, n_threads):
    """y = silu(x @ w_gate.T) * (x @ w_up.T) for T >= 4, as _gemm with tiles of 8 gate rows beside the
    same 8 up rows: each block of products ends as 8 outputs, and neither product is stored whole."""
    T, n_in = x.shape
    n_out = w_gate.shape[0]
    n_tiles = (n_out + 7) // 8
    per_group = _tiles_per_group(n_in, n_tiles, n_threads)
    n_groups = (n_tiles + per_group - 1) // per_group
    n_parts = min(n_threads, n_groups)
    for part in prange(n_parts):
        w_tiles = np.zeros((per_group, n_in, 16), dtype=np.float32)  # 8 gate rows, then 8 up rows, per tile
        rows = _widen_scratch()  # [16, _WIDEN_CHUNK + 16]
        block = np.empty((4, 16), dtype=np.float32)
        for group in range(part * n_groups // n_parts, (part + 1) * n_groups // n_parts):
            in_group = min(per_group, n_tiles - group * per_group)
            for g in range(in_group):
                f0 = (group * per_group + g) * 8
                cols = min(8, n_out - f0)
                _widen_tile(w_gate, f0, cols, w_tiles[g], 0, rows)
                _widen_tile(w_up, f0, cols, w_tiles[g], 8, rows)
            for t0 in range(0, T, 4):
                for g in range(in_group):
                    f0 = (group * per_group + g) * 8
                    block_4x16(x, t0, w_tiles[g], 0, block)
                    for t in range(min(4, T - t0)):
                        for j in range(min(8, n_out - f0)):
                            y[t0 + t, f0 + j] = silu(block[t, j]) * block[t, 8 + j]
