"""One work item of `jitkernels.attention`: a block of query rows of one kv head over a range of keys.

Each query row keeps a running maximum m, a running sum l and a running weighted sum of values acc
in place of its row of scores (FlashAttention's online softmax). Over a block of keys with scores s_b:

    m' = max(m, max_b s_b),  l' = l e^(m - m') + sum_b e^(s_b - m'),  acc' = acc e^(m - m') + sum_b e^(s_b - m') v_b

and the row's output is acc / l. The driver picks one of three strategies per item:
  - `item_gemm`, up to GEMM_ROWS rows of a prefill chunk with the blas GEMM: both products of a key
    block as OpenBLAS sgemm calls, faster than the micro-kernel (benchmarks/KERNELS.md, item_gemm).
  - `item_tiled`, 4 to 16 rows with hd a multiple of 16 (prefill; decode with G >= 4): all rows at once
    on the GEMM's register-blocked micro-kernel (benchmarks/KERNELS.md, item_tiled).
  - `item_by_rows`, 1 to 3 rows (decode without GQA) or another hd: a row at a time, with as few
    instructions per byte of the cache as it can, since a decode step streams the cache from memory.
Keys and values are float32 or 16-bit words (`jitkernels.widen`), widened where they are loaded.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from jitkernels.cache import CACHE
from jitkernels.blas import sgemm_nn_add, sgemm_nt
from jitkernels.exp import exp32
from jitkernels.gemm_blas import block_rows
from jitkernels.microkernel import block_4x16
from jitkernels.registers import register_block
from jitkernels.widen import widen

_FASTMATH = {"reassoc", "contract"}  # SIMD dot products and FMA; no nnan/ninf: the running max starts at -inf
# Query rows per work item: each block of K and V is read once for all of them. Also the width of
# block_4x16, which item_tiled fills with one query row per column: change both together.
QUERY_ROWS = 16
# (query row, key) scores per block in item_by_rows: a block is BLOCK_SCORES / rows keys, 512 in a
# decode step without GQA, where longer blocks spend less on the per-block rescaling
# (benchmarks/KERNELS.md, BLOCK_SCORES).
BLOCK_SCORES = 512
# Keys per block in item_tiled: longer blocks run the micro-kernel over more keys per call and
# rescale less often (benchmarks/KERNELS.md, KEY_BLOCK).
KEY_BLOCK = 256
# Query rows and keys per block of item_gemm: GEMM_ROWS x hd queries against GEMM_KEYS x hd keys
# and values, sized for the L2 of a core (benchmarks/KERNELS.md, item_gemm).
GEMM_ROWS = 128
GEMM_KEYS = 256

# The hot loops below read rows through 1-D slices (keys[s], acc[split, t, h]) rather than through
# computed flat indices: Numba cannot prove a computed index non-negative, and its negative-index
# wraparound then keeps LLVM from emitting contiguous SIMD loads. The cache layer arrives whole and
# C-contiguous for the same reason: a [:, :S] view of it would be a strided array to Numba.


@njit(fastmath=_FASTMATH, cache=CACHE)
def _score(query, keys, b0, nb, weights, hd):
    """weights[b] = query . keys[b0 + b] over b < nb, four keys per pass over the query; returns the
    largest of them (-inf if nb = 0)."""
    top = np.float32(-np.inf)
    for b in range(0, nb - 3, 4):
        k0, k1, k2, k3 = keys[b0 + b], keys[b0 + b + 1], keys[b0 + b + 2], keys[b0 + b + 3]  # [hd] each
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for d in range(hd):
            s0 += query[d] * widen(k0[d])
            s1 += query[d] * widen(k1[d])
            s2 += query[d] * widen(k2[d])
            s3 += query[d] * widen(k3[d])
        weights[b], weights[b + 1], weights[b + 2], weights[b + 3] = s0, s1, s2, s3
        top = max(top, max(s0, s1), max(s2, s3))
    for b in range(nb - nb % 4, nb):
        key, s0 = keys[b0 + b], np.float32(0.0)
        for d in range(hd):
            s0 += query[d] * widen(key[d])
        weights[b] = s0
        top = max(top, s0)
    return top


@njit(fastmath=_FASTMATH, cache=CACHE)
def _add_weighted(out, weights, values, b0, nb, hd):
    """out += sum_b weights[b] values[b0 + b] over b < nb.

    For hd a multiple of 64, 64 columns at a time are summed in 8 AVX2 registers over all nb value
    rows and added to out once: a value row's 64 columns cost one broadcast and 8 fused multiply-adds,
    about 1.1 instructions per 32 bytes against 1.75 for four rows per load and store of out (below).
    A core streams the cache from memory faster the fewer instructions it spends per byte
    (benchmarks/KERNELS.md, _add_weighted).
    """
    if hd % 64 == 0:
        for d0 in range(0, hd, 64):
            c = register_block(64)  # [64] sum of weights[b] values[b0 + b, d0:d0+64]
            for b in range(nb):
                p, v = weights[b], values[b0 + b, d0 : d0 + 64]  # v [64]
                for d in range(64):
                    c[d] += p * widen(v[d])
            for d in range(64):
                out[d0 + d] += c[d]
        return
    for b in range(0, nb - 3, 4):
        p0, p1, p2, p3 = weights[b], weights[b + 1], weights[b + 2], weights[b + 3]
        v0, v1, v2, v3 = values[b0 + b], values[b0 + b + 1], values[b0 + b + 2], values[b0 + b + 3]  # [hd] each
        for d in range(hd):
            out[d] += p0 * widen(v0[d]) + p1 * widen(v1[d]) + p2 * widen(v2[d]) + p3 * widen(v3[d])
    for b in range(nb - nb % 4, nb):
        p, v = weights[b], values[b0 + b]
        for d in range(hd):
            out[d] += p * widen(v[d])


@njit(fastmath=_FASTMATH, cache=CACHE)
def _row_max(row, n):
    """max(row[:n]) for n >= 1 in eight running maxima: a single one (np.max) is a chain of dependent
    compares, since without nnan LLVM will not vectorise a max (benchmarks/KERNELS.md, item_gemm)."""
    t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = row[0]
    for b in range(0, n - 7, 8):
        t0, t1, t2, t3 = max(t0, row[b]), max(t1, row[b + 1]), max(t2, row[b + 2]), max(t3, row[b + 3])
        t4, t5, t6, t7 = max(t4, row[b + 4]), max(t5, row[b + 5]), max(t6, row[b + 6]), max(t7, row[b + 7])
    for b in range(n - n % 8, n):
        t0 = max(t0, row[b])
    return max(max(max(t0, t1), max(t2, t3)), max(max(t4, t5), max(t6, t7)))


@njit(fastmath=_FASTMATH, cache=CACHE)
def _softmax_block(scores, n, top, scale, m_run, l_run, i):
    """One block of the online softmax of query row i: the raw scores[:n], whose largest is `top`,
    become e^(s * scale - m'); the running max m_run[i] and sum l_run[i] are updated. Returns
    e^(m - m') for the row's running weighted sum of values. One pass over the scores: scale > 0, so
    the largest scaled score is top * scale, exactly."""
    m_new = max(m_run[i], top * scale)
    correction = exp32(m_run[i] - m_new)  # e^-inf = 0 on the first block
    row_sum = l_run[i] * correction
    for b in range(n):
        scores[b] = exp32(scores[b] * scale - m_new)
        row_sum += scores[b]
    m_run[i], l_run[i] = m_new, row_sum
    return correction


@njit(fastmath=_FASTMATH, cache=CACHE)
def _row_block(query, keys, values, b0, nb, scale, weights, out, m_run, l_run, i, hd):
    """Keys b0 .. b0+nb-1 for query row i of item_by_rows: scores, online softmax, then out [hd]
    rescaled and the weighted values added. Called with a literal hd, Numba compiles this and the
    functions it calls for that value: their loops over hd have a constant length, which LLVM unrolls."""
    top = _score(query, keys, b0, nb, weights, hd)
    correction = _softmax_block(weights, nb, top, scale, m_run, l_run, i)
    for d in range(hd):
        out[d] *= correction
    _add_weighted(out, weights, values, b0, nb, hd)


@njit(fastmath=_FASTMATH, cache=CACHE)
def item_by_rows(q, keys, values, j, G, past, r0, rows, lo, hi, scale, scores, m_run, l_run, acc_run):
    """The online softmax of one work item, a query row at a time: rows r0 .. r0+rows-1 of kv head j
    against keys lo .. hi-1, into m_run, l_run, acc_run [rows, hd] (first rows of each).

    Query row r is head r % G of the group at position r // G (q [T, H, hd], head j * G + r % G).
    """
    hd = q.shape[2]
    key_block = BLOCK_SCORES // rows
    for b0 in range(lo, hi, key_block):
        for i in range(rows):
            t, h = divmod(r0 + i, G)
            nb = min(key_block, hi - b0, past + t + 1 - b0)  # query t sees keys 0 .. past + t
            if nb <= 0:
                continue
            query, weights, out = q[t, j * G + h], scores[i], acc_run[i]  # [hd], [block], [hd]
            # Qwen's head sizes as literals, so the loops over hd unroll (benchmarks/KERNELS.md, item_by_rows)
            if hd == 64:
                _row_block(query, keys, values, b0, nb, scale, weights, out, m_run, l_run, i, 64)
            elif hd == 128:
                _row_block(query, keys, values, b0, nb, scale, weights, out, m_run, l_run, i, 128)
            else:
                _row_block(query, keys, values, b0, nb, scale, weights, out, m_run, l_run, i, hd)


@njit(fastmath=_FASTMATH, cache=CACHE)
def item_tiled(q, keys, values, j, G, past, r0, rows, lo, hi, scale, q_t, weights, block, correction, m_run, l_run, acc_run):
    """The same as item_by_rows for 4 to 16 rows and hd a multiple of 16, all rows at once: both
    products run on the GEMM micro-kernel, the scores as keys @ queries^T and the weighted values
    as weights @ values[:, 16 columns], so keys and values are read in place, never copied.

    Scratch: q_t [hd, 16], weights [16, KEY_BLOCK], block [4, 16], correction [16]. Spare query
    columns (rows .. 15) repeat the item's last row: computed, never stored.
    """
    R = QUERY_ROWS
    hd = q.shape[2]
    for i in range(R):
        t, h = divmod(r0 + min(i, rows - 1), G)
        query = q[t, j * G + h]  # [hd]
        for d in range(hd):
            q_t[d, i] = query[d]
    for b0 in range(lo, hi, KEY_BLOCK):
        nb = min(KEY_BLOCK, hi - b0)
        ks, vs = keys[b0 : b0 + nb], values[b0 : b0 + nb]  # [nb, hd] each
        for k0 in range(0, nb, 4):
            block_4x16(ks, k0, q_t, 0, block)  # block[b, i] = keys[k0 + b] . query i
            for b in range(min(4, nb - k0)):
                for i in range(R):
                    weights[i, k0 + b] = block[b, i]
        for i in range(rows):
            # one row at a time: loops over keys of runtime length, which LLVM vectorises
            row = weights[i]  # [keys] scores, then e^(s - m)
            n_seen = min(nb, past + (r0 + i) // G + 1 - b0)  # query t sees keys 0 .. past + t
            if n_seen <= 0:
                correction[i] = 1.0
                row[:nb] = 0.0
                continue
            correction[i] = _softmax_block(row, n_seen, _row_max(row, n_seen), scale, m_run, l_run, i)
            row[n_seen:nb] = 0.0  # keys after the query's own position
        for d0 in range(0, hd, 16):
            for i0 in range(0, rows, 4):
                block_4x16(weights, i0, vs, d0, block)  # block[i, c] = weights[i0 + i] . values[:, d0 + c]
                for i in range(min(4, rows - i0)):
                    out = acc_run[i0 + i]  # [hd]
                    for c in range(16):
                        out[d0 + c] = out[d0 + c] * correction[i0 + i] + block[i, c]


@njit(fastmath=_FASTMATH, cache=CACHE)
def item_gemm(q, keys, values, j, G, past, r0, rows, lo, hi, q_rows, k_block, v_block, weights, m_run, l_run, acc_run):
    """The same as item_by_rows for up to GEMM_ROWS rows, each block of keys as two OpenBLAS sgemm
    calls (inside `blas.one_blas_thread`): scores = queries @ keys^T, then acc += weights @ values.

    Scratch: q_rows [GEMM_ROWS, hd], k_block and v_block [GEMM_KEYS, hd] (16-bit keys and values
    widened there; float32 ones are read in place), weights [GEMM_ROWS, GEMM_KEYS]. Rows that see no
    key of a block (the first rows of an item on the diagonal) are left out of both products.
    """
    scale = np.float32(q.shape[2] ** -0.5)
    for i in range(rows):
        t, h = divmod(r0 + i, G)
        q_rows[i, :] = q[t, j * G + h]
    for b0 in range(lo, hi, GEMM_KEYS):
        nb = min(GEMM_KEYS, hi - b0)
        first = max(0, (b0 - past) * G - r0)  # row i sees key b0 from position past + (r0 + i) // G = b0 on
        ks = block_rows(keys, b0, nb, k_block)  # [>= nb, hd] float32
        sgemm_nt(q_rows[first:rows], ks, nb, weights[first:rows], 0)  # [rows - first, nb] scores
        for i in range(first, rows):
            row = weights[i]  # [keys] scores, then e^(s - m)
            n_seen = min(nb, past + (r0 + i) // G + 1 - b0)  # query t sees keys 0 .. past + t
            correction = _softmax_block(row, n_seen, _row_max(row, n_seen), scale, m_run, l_run, i)
            row[n_seen:nb] = 0.0  # keys after the query's own position
            out = acc_run[i]  # [hd]
            out *= correction
        vs = block_rows(values, b0, nb, v_block)  # [>= nb, hd] float32
        sgemm_nn_add(weights[first:rows, :nb], vs[:nb], acc_run[first:rows])
