"""The prefill GEMM as widen-then-BLAS: blocks of weight rows widened to float32, then OpenBLAS's sgemm.

The second implementation of the T >= 4 products of `jitkernels.matmul` (chosen by
`jitkernels.choice`). Each Numba thread takes a run of blocks of weight rows, widens a block into
its own float32 scratch (small enough to stay in L2, so the BLAS packs it from there), and calls
sgemm on it with x (`jitkernels.blas.sgemm_nt`, one BLAS thread per call), writing its columns of y.
The block boundaries do not depend on the thread count, so y is the same on any number of threads.
Why: on hosts whose BLAS has wider kernels than
Numba's code (AVX-512), its sgemm runs far faster than `matmul._gemm`, and the widening is one read of
each weight per call against 2T FLOPs per element (see benchmarks/hosts/intel-xeon-avx512-amx/prefill_paths.md).

As in `matmul`, several weights go in one parallel pass: q, k and v (`linears_blas`), and gate and up
(`swiglu_blas`: a block of gate rows beside the same rows of up in one scratch and one sgemm, then
silu(gate) * up into y, so neither product is kept whole). float32 weights are not copied: sgemm
reads their rows where they lie.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from jitkernels.blas import one_blas_thread, sgemm_nt
from jitkernels.cache import CACHE
from jitkernels.silu import silu
from jitkernels.widen import widen

_FASTMATH = {"reassoc", "contract"}
# Bytes of float32 scratch per block of weight rows (a multiple of 16 rows, at least 16): the size of
# the L2 of the smaller server cores (512 KB). Larger blocks let sgemm pack x less often per weight:
# 128 KB blocks were ~1.25x slower, 512 KB to 2 MB within noise of each other (one noisy host:
# benchmarks/hosts/intel-xeon-avx512-amx/prefill_paths.md, "Block size").
_BLOCK_BYTES = 512 * 1024


def linears_blas(x: np.ndarray, weights: tuple, biases: tuple, ys: tuple) -> None:
    """ys[i] = x @ weights[i].T + biases[i]: x [T, K] float32, weights in kernel form (`as_kernel_dtype`),
    biases as stored words ([0] for none), ys [T, n_out_i] float32."""
    with one_blas_thread():
        _gemm_blas(x, weights, biases, ys, _rows_per_block(x.shape[1]), numba.get_num_threads())


def swiglu_blas(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, y: np.ndarray) -> None:
    """y = silu(x @ w_gate.T) * (x @ w_up.T): x [T, D], w_gate and w_up [F, D] in kernel form, y [T, F]."""
    with one_blas_thread():
        _swiglu_blas(x, w_gate, w_up, y, _rows_per_block(x.shape[1]) // 2, numba.get_num_threads())


def _rows_per_block(n_in: int) -> int:
    return max(16, _BLOCK_BYTES // (4 * max(n_in, 1)) // 16 * 16)


@njit(fastmath=_FASTMATH, cache=CACHE)
def block_rows_into(weight, r0, n, scratch, at):
    """scratch[at:at+n] = weight[r0:r0+n] widened to float32 (float32 rows copied)."""
    for r in range(n):
        src, dst = weight[r0 + r], scratch[at + r]  # [K] stored words, [K] float32
        for k in range(src.shape[0]):
            dst[k] = widen(src[k])


def block_rows(weight, r0, n, scratch):
    """weight[r0:r0+n] as float32 rows: widened into scratch[:n] (returned), or the rows themselves if float32."""
    if weight.dtype == np.float32:
        return weight[r0 : r0 + n]
    block_rows_into(weight, r0, n, scratch, 0)
    return scratch


@overload(block_rows)
def _block_rows_jit(weight, r0, n, scratch):
    if weight.dtype == types.float32:
        return lambda weight, r0, n, scratch: weight[r0 : r0 + n]

    def widened(weight, r0, n, scratch):
        block_rows_into(weight, r0, n, scratch, 0)
        return scratch

    return widened


@njit(cache=CACHE)
def _locate_block(weights, rows, b):
    """(i, r0): block b of all the weights' blocks of `rows` rows, numbered one weight after another,
    is rows r0 to r0 + rows of weights[i]."""
    i, b = 0, np.int64(b)
    while b >= (weights[i].shape[0] + rows - 1) // rows:
        b -= (weights[i].shape[0] + rows - 1) // rows
        i += 1
    return i, b * rows


@njit(parallel=True, fastmath=_FASTMATH, cache=CACHE)
def _gemm_blas(x, weights, biases, ys, rows, n_threads):
    """ys[i] = x @ weights[i].T (+ biases[i]), blocks of `rows` weight rows split across n_threads."""
    T, K = x.shape
    n_blocks = 0
    for w in weights:
        n_blocks += (w.shape[0] + rows - 1) // rows
    n_parts = min(n_threads, n_blocks)
    for part in prange(n_parts):
        scratch = np.empty((rows, K), dtype=np.float32)  # one per thread
        for b in range(part * n_blocks // n_parts, (part + 1) * n_blocks // n_parts):
            i, r0 = _locate_block(weights, rows, b)
            weight, bias, y = weights[i], biases[i], ys[i]
            n = min(rows, weight.shape[0] - r0)
            sgemm_nt(x, block_rows(weight, r0, n, scratch), n, y, r0)  # y[:, r0:r0+n]
            if bias.shape[0] > 0:  # added to the product, as the NumPy twin does
                for t in range(T):
                    for j in range(n):
                        y[t, r0 + j] += widen(bias[r0 + j])


@njit(parallel=True, fastmath=_FASTMATH, cache=CACHE)
def _swiglu_blas(x, w_gate, w_up, y, rows, n_threads):
    """y = silu(x @ w_gate.T) * (x @ w_up.T), blocks of `rows` gate rows beside the same up rows."""
    T, K = x.shape
    F = w_gate.shape[0]
    n_blocks = (F + rows - 1) // rows
    n_parts = min(n_threads, n_blocks)
    for part in prange(n_parts):
        scratch = np.empty((2 * rows, K), dtype=np.float32)  # gate rows, then up rows
        both = np.empty((T, 2 * rows), dtype=np.float32)  # [T, gate | up] of one block
        for b in range(part * n_blocks // n_parts, (part + 1) * n_blocks // n_parts):
            f0 = b * rows
            n = min(rows, F - f0)
            block_rows_into(w_gate, f0, n, scratch, 0)
            block_rows_into(w_up, f0, n, scratch, n)
            sgemm_nt(x, scratch, 2 * n, both, 0)
            for t in range(T):
                for j in range(n):
                    y[t, f0 + j] = silu(both[t, j]) * both[t, n + j]

