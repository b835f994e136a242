"""The innermost loop of the prefill GEMM and of attention on 4 or more query rows: x @ w, 4 x 16.

Both multiply blocks of 4 rows by 16 columns of a [K, >= 16] operand (transposed weight rows,
transposed queries, or 16 columns of the values). The 4 x 16 sums stay in 8 AVX2 registers for
the whole loop over K (via `jitkernels.registers`): each step broadcasts one element of each of the 4
rows and needs 6 loads for 8 fused multiply-adds, with no horizontal sums.
"""

from __future__ import annotations

from numba import njit

from jitkernels.cache import CACHE
from jitkernels.registers import register_block
from jitkernels.widen import widen

_FASTMATH = {"reassoc", "contract"}


@njit(fastmath=_FASTMATH, cache=CACHE)
def block_4x16(x, t0, w, j0, block):
    """block[:, :] = x[t0:t0+4, :K] @ w[:, j0:j0+16]: x [rows, >= K], w [K, >= j0 + 16], block [>= 4, 16].

    x and w are float32, or (keys and values of a 16-bit cache) words that `widen` reads exactly.

    Rows past the end of x are computed from its last row rather than branched around: the caller
    stores only the rows that exist.
    """
    c = register_block(64)  # [4 * 16] c[t * 16 + j] accumulates block[t, j]
    last = x.shape[0] - 1
    x0, x1, x2, x3 = x[t0], x[min(t0 + 1, last)], x[min(t0 + 2, last)], x[min(t0 + 3, last)]  # [>= K] each
    for k in range(w.shape[0]):
        row = w[k, j0 : j0 + 16]  # [16] (sliced: an index j0 + j would be bounds-wrapped, not vectorised)
        a0, a1, a2, a3 = widen(x0[k]), widen(x1[k]), widen(x2[k]), widen(x3[k])
        for j in range(16):
            c[j] += a0 * widen(row[j])
            c[16 + j] += a1 * widen(row[j])
            c[32 + j] += a2 * widen(row[j])
            c[48 + j] += a3 * widen(row[j])
    for t in range(4):
        for j in range(16):
            block[t, j] = c[t * 16 + j]
