"""Causal grouped-query attention with an online softmax, over keys and values read in place.

The keys are visited in blocks; a running maximum m, running sum l and running
weighted sum of values acc per query replace the [T, S] score matrix (FlashAttention's online
softmax), so memory is O(block), not O(T x S), per thread:

    m' = max(m, max_b s_b),  l' = l e^(m - m') + sum_b e^(s_b - m'),  acc' = acc e^(m - m') + sum_b e^(s_b - m') v_b

and the output is acc / l. The queries that read one kv head are its G heads at each of the T
positions: T * G query rows, in (position, head) order. A work item is a block of `_QUERY_ROWS`
consecutive rows of one kv head: each block of keys and values comes from L2 or memory once per
item and serves every row from L1 or L2 (FlashAttention's tiling). Without it, a 512-token prompt
chunk over a 4096-token cache re-read 2 MB of keys and values per query row and ran at half the
speed of the NumPy twin's BLAS. When there are too few items to keep every thread busy (decode,
T = 1, with few kv heads) the keys are also split into ranges whose partial (m, l, acc) are merged
at the end (flash-decoding).

An item of at least 4 query rows (prefill; decode with G >= 4) with hd a multiple of 16 is done
for all its rows at once (`_item_tiled`): keys @ queries^T and weights @ values run on the GEMM's
register-blocked micro-kernel, 256 keys at a time. A prefill of 512 tokens on Qwen1.5-0.5B shapes
ran 1.77x faster than a row at a time (dot products with horizontal sums), and a decode step with
G = 5 at 4K 1.13x. Fewer rows (decode without GQA) stay on `_item_by_rows`, which reads the
keys and values of a block once per row, with as few instructions per byte as it can: the scores
four keys per pass over the query, the weighted values summed in registers 64 columns at a time.
Its loops over hd unroll for Qwen's head sizes (64, 128).

A 16-bit cache (bfloat16 or float16 words) is read the same way, each key and value widened in
registers where it is loaded (`jitkernels.widen`): never copied into float32, so a decode step reads
half the bytes. On a float32 cache `widen` is the identity and costs nothing.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from jitkernels.cache import CACHE
from jitkernels.exp import exp32
from jitkernels.microkernel import block_4x16
from jitkernels.registers import register_block
from jitkernels.widen import kernel_words, widen

_FASTMATH = {"reassoc", "contract"}  # SIMD dot products and FMA; no nnan/ninf: the running max starts at -inf
# query rows per work item: each block of K and V is read once for all of them. Also the width of
# block_4x16, which _item_tiled fills with one query row per column: change both together.
_QUERY_ROWS = 16
# (query row, key) scores per block in _item_by_rows (1 to 3 rows: decode without GQA; or hd not a
# multiple of 16): a block of keys is 512 / rows keys, 512 in a decode step without GQA, where
# longer blocks spend less on the per-block rescaling (measured 15% faster at 4K).
_BLOCK_SCORES = 512
# keys per block in _item_tiled: longer blocks run the micro-kernel over more keys per call and rescale
# less often. 256 against 64: a 512-token prefill's attention 1.16x faster at hd 64, 1.10x at hd 128;
# a decode step with G = 5, hd 128 at 4K 1.16x.
_KEY_BLOCK = 256
_MIN_KEYS_PER_SPLIT = 256  # a key range shorter than this costs more to merge than it saves
_ITEMS_PER_THREAD = 4  # key splits are added until each thread has this many items


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, S: int) -> np.ndarray:
    """softmax(q k^T / sqrt(hd) + causal mask) v per head; NumPy twin: `qwen_ref.attention.attention`.

    q: [T, H, hd] float32, the T newest tokens; keys, values: [Hkv, capacity, hd], a layer of the
    KV cache whose first S positions are all S tokens, the newest T last (query t sits at position
    S - T + t), float32 or 16-bit (bfloat16 words as uint16, or float16), widened as they are read.
    Query head h reads kv head h // (H // Hkv). The cache is only read. Returns a new [T, H * hd]
    float32 array.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)  # [T, H, hd]
    T, H, hd = q.shape
    Hkv, capacity, _ = keys.shape
    if keys.shape != values.shape or keys.shape[2] != hd or H % Hkv or not T <= S <= capacity:
        raise ValueError(f"attention: q {q.shape}, keys {keys.shape}, values {values.shape}, S {S} do not fit")
    if keys.dtype != values.dtype:
        raise ValueError(f"attention: keys {keys.dtype} and values {values.dtype} differ")
    keys, values = kernel_words(keys, "attention: the cache"), kernel_words(values, "attention: the cache")
    # A cache layer is contiguous; for any other view, copy the S positions rather than compile
    # another layout (Numba vectorises unit-stride rows only).
    keys = keys if keys.flags.c_contiguous else np.ascontiguousarray(keys[:, :S])  # [Hkv, >= S, hd]
    values = values if values.flags.c_contiguous else np.ascontiguousarray(values[:, :S])  # [Hkv, >= S, hd]

    n_threads = numba.get_num_threads()
    n_splits = key_splits(T, H, Hkv, S, n_threads)
    m = np.empty((n_splits, T, H), dtype=np.float32)  # [splits, T, H] running max of scores
    l = np.empty((n_splits, T, H), dtype=np.float32)  # [splits, T, H] running sum of e^(s - m)
    acc = np.empty((n_splits, T, H, hd), dtype=np.float32)  # [splits, T, H, hd] running sum of e^(s - m) v
    _attend(q, keys, values, S, m, l, acc, n_threads)
    out = np.empty((T, H * hd), dtype=np.float32)  # [T, H*hd]
    _merge(m, l, acc, out)
    return out


def key_splits(T: int, H: int, Hkv: int, S: int, n_threads: int) -> int:
    """Key ranges per work item: enough to give every thread _ITEMS_PER_THREAD items, none shorter than
    _MIN_KEYS_PER_SPLIT keys."""
    row_blocks = Hkv * -(-T * (H // Hkv) // _QUERY_ROWS)  # ceil: items without key splits
    wanted = -(-_ITEMS_PER_THREAD * n_threads // row_blocks)  # ceil: splits that would fill every thread
    return max(1, min(wanted, S // _MIN_KEYS_PER_SPLIT))


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
    rows and added to out once: 64 columns of a value row cost one broadcast and 8 fused
    multiply-adds that read them, about 1.1 instructions per 32 bytes against 1.75 for four rows per
    load and store of out (below). On this 2-core machine a core streams from memory faster the fewer
    instructions it spends per byte (summing rows of 64 floats read at 0.89 of summing the same bytes
    as rows of 1024): a decode step's attention (one query row per kv head) read the cache
    1.04-1.08x faster at 16K with hd 64, and 1.02-1.13x at 2K-4K with hd 128 (the old and new
    kernels alternated in one process, medians of 16).
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
    """Keys b0 .. b0+nb-1 for query row i of _item_by_rows: scores, online softmax, then out [hd]
    rescaled and the weighted values added. Called with a literal hd, Numba compiles this and the
    functions it calls for that value: their loops over hd have a constant length, which LLVM unrolls."""
    top = _score(query, keys, b0, nb, weights, hd)
    correction = _softmax_block(weights, nb, top, scale, m_run, l_run, i)
    for d in range(hd):
        out[d] *= correction
    _add_weighted(out, weights, values, b0, nb, hd)


@njit(fastmath=_FASTMATH, cache=CACHE)
def _item_by_rows(q, keys, values, j, G, past, r0, rows, lo, hi, scale, scores, m_run, l_run, acc_run):
    """The online softmax of one work item, a query row at a time: rows r0 .. r0+rows-1 of kv head j
    against keys lo .. hi-1, into m_run, l_run, acc_run [rows, hd] (first rows of each)."""
    hd = q.shape[2]
    key_block = _BLOCK_SCORES // rows
    for b0 in range(lo, hi, key_block):
        for i in range(rows):
            t, h = divmod(r0 + i, G)
            nb = min(key_block, hi - b0, past + t + 1 - b0)  # query t sees keys 0 .. past + t
            if nb <= 0:
                continue
            query, weights, out = q[t, j * G + h], scores[i], acc_run[i]  # [hd], [block], [hd]
            # Qwen's head sizes as literals (a decode step's attention, hd 64, 128 to 16K tokens:
            # 1.02-1.10x on 2 threads, 1.04-1.06x on one)
            if hd == 64:
                _row_block(query, keys, values, b0, nb, scale, weights, out, m_run, l_run, i, 64)
            elif hd == 128:
                _row_block(query, keys, values, b0, nb, scale, weights, out, m_run, l_run, i, 128)
            else:
                _row_block(query, keys, values, b0, nb, scale, weights, out, m_run, l_run, i, hd)


@njit(fastmath=_FASTMATH, cache=CACHE)
def _item_tiled(q, keys, values, j, G, past, r0, rows, lo, hi, scale, q_t, weights, block, correction, m_run, l_run, acc_run):
    """The same as _item_by_rows for 4 to 16 rows and hd a multiple of 16, all rows at once: both
    products run on the GEMM micro-kernel, the scores as keys @ queries^T and the weighted values
    as weights @ values[:, 16 columns], so keys and values are read in place, never copied.

    Scratch: q_t [hd, 16], weights [16, _KEY_BLOCK], block [4, 16], correction [16]. Spare query
    columns (rows .. 15) repeat the item's last row: computed, never stored.
    """
    R = _QUERY_ROWS
    hd = q.shape[2]
    for i in range(R):
        t, h = divmod(r0 + min(i, rows - 1), G)
        query = q[t, j * G + h]  # [hd]
        for d in range(hd):
            q_t[d, i] = query[d]
    for b0 in range(lo, hi, _KEY_BLOCK):
        nb = min(_KEY_BLOCK, hi - b0)
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
            correction[i] = _softmax_block(row, n_seen, row[:n_seen].max(), scale, m_run, l_run, i)
            row[n_seen:nb] = 0.0  # keys after the query's own position
        for d0 in range(0, hd, 16):
            for i0 in range(0, rows, 4):
                block_4x16(weights, i0, vs, d0, block)  # block[i, c] = weights[i0 + i] . values[:, d0 + c]
                for i in range(min(4, rows - i0)):
                    out = acc_run[i0 + i]  # [hd]
                    for c in range(16):
                        out[d0 + c] = out[d0 + c] * correction[i0 + i] + block[i, c]


@njit(parallel=True, fastmath=_FASTMATH, cache=CACHE)
def _attend(q, k, v, S, m, l, acc, n_threads):
    """Fill the partial (m, l, acc) of every (key split, query row, head) from the first S positions of k, v."""
    n_splits, T, H, hd = acc.shape
    Hkv = k.shape[0]
    G = H // Hkv
    past = S - T
    split_len = -(-S // n_splits)
    scale = np.float32(hd**-0.5)
    n_rows = T * G  # query rows per kv head, row r = (position r // G, head r % G of the group)
    n_blocks = -(-n_rows // _QUERY_ROWS)
    n_items = Hkv * n_blocks * n_splits
    n_parts = min(n_threads, n_items)  # given by the caller: get_num_threads() here would defeat caching
    for part in prange(n_parts):
        # one scratch per thread: running m, l [rows] and acc [rows, hd]; for _item_by_rows the scores,
        # then weights [rows, block]; for _item_tiled the same as [rows, keys] and its other scratch
        scores = np.empty((_QUERY_ROWS, _BLOCK_SCORES), dtype=np.float32)
        q_t = np.zeros((hd, _QUERY_ROWS), dtype=np.float32)
        weights = np.zeros((_QUERY_ROWS, _KEY_BLOCK), dtype=np.float32)
        block = np.empty((4, 16), dtype=np.float32)
        correction = np.empty(_QUERY_ROWS, dtype=np.float32)
        m_run = np.empty(_QUERY_ROWS, dtype=np.float32)
        l_run = np.empty(_QUERY_ROWS, dtype=np.float32)
        acc_run = np.empty((_QUERY_ROWS, hd), dtype=np.float32)
        for item in range(part * n_items // n_parts, (part + 1) * n_items // n_parts):
            row_block, rest = divmod(item, Hkv * n_splits)
            j, split = divmod(rest, n_splits)
            # Row blocks in the order 0, last, 1, last-1, ...: each thread's contiguous run of items
            # then mixes short (early) and long (late) causal rows, which balances the threads.
            row_block = row_block // 2 if row_block % 2 == 0 else n_blocks - 1 - row_block // 2
            r0 = row_block * _QUERY_ROWS
            rows = min(_QUERY_ROWS, n_rows - r0)
            lo = split * split_len
            hi = min(lo + split_len, past + (r0 + rows - 1) // G + 1)  # the last row sees the most keys
            keys, values = k[j], v[j]  # [capacity, hd] each, contiguous rows
            m_run[:] = -np.inf
            l_run[:] = 0.0
            acc_run[:] = 0.0
            if rows >= 4 and hd % 16 == 0:
                _item_tiled(q, keys, values, j, G, past, r0, rows, lo, hi, scale, q_t, weights, block, correction,
                            m_run, l_run, acc_run)
            else:
                _item_by_rows(q, keys, values, j, G, past, r0, rows, lo, hi, scale, scores, m_run, l_run, acc_run)
            for i in range(rows):
                t, h = divmod(r0 + i, G)
                m[split, t, j * G + h] = m_run[i]
                l[split, t, j * G + h] = l_run[i]
                acc[split, t, j * G + h, :] = acc_run[i]


# Serial: merging is O(T H hd) against the O(T S H hd) of _attend, less than a parallel launch costs.
@njit(fastmath=_FASTMATH, cache=CACHE)
def _merge(m, l, acc, out):
    """out[t, h*hd:(h+1)*hd] = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), M = max_s m_s."""
    n_splits, T, H, hd = acc.shape
    for t in range(T):
        for h in range(H):
            m_max = m[0, t, h]  # split 0 holds key 0, which every query sees: m_max is finite
            for s in range(1, n_splits):
                m_max = max(m_max, m[s, t, h])
            total = np.float32(0.0)
            for s in range(n_splits):
                total += l[s, t, h] * exp32(m[s, t, h] - m_max)
            row = out[t, h * hd : (h + 1) * hd]  # [hd]
            row[:] = 0.0
            for s in range(n_splits):
                weight = exp32(m[s, t, h] - m_max) / total
                part = acc[s, t, h]  # [hd]
                for d in range(hd):
                    row[d] += part[d] * weight
