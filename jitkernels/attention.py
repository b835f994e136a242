"""Causal grouped-query attention over keys and values read in place: the driver.

The queries that read one kv head are its G heads at each of the T positions: T * G query rows,
position-major (row t * G + g, as in `qwen_ref.attention`). A work item is a block of QUERY_ROWS
consecutive rows of one kv head against a range of keys; `_attend` deals the items out to the
threads and `jitkernels.attention_items` computes each with an online softmax, so no [T, S] score
matrix is ever made. Each block of keys and values is read once per item and serves all its rows
from cache (FlashAttention's tiling); a row at a time, a prefill chunk re-read the whole cache per
query row and ran behind the NumPy twin's BLAS (benchmarks/KERNELS.md, attention). When there are
too few items to keep every thread busy (decode, T = 1, with few kv heads) the keys are also split
into ranges whose partial results are merged at the end (`_merge`, flash-decoding). With gemm="blas"
(`choice.py`: wherever OpenBLAS is callable), prefill chunks take items of GEMM_ROWS rows whose two
products per key block are OpenBLAS sgemm calls (`_attend_gemm`): a long prompt's attention then runs
closer to the BLAS's speed than on the micro-kernel (benchmarks/KERNELS.md, item_gemm).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from jitkernels.attention_items import (
    BLOCK_SCORES,
    GEMM_KEYS,
    GEMM_ROWS,
    KEY_BLOCK,
    QUERY_ROWS,
    item_by_rows,
    item_gemm,
    item_tiled,
)
from jitkernels.blas import one_blas_thread
from jitkernels.cache import CACHE
from jitkernels.exp import exp32
from jitkernels.matmul import check_gemm
from jitkernels.widen import kernel_words

_FASTMATH = {"reassoc", "contract"}  # as in attention_items; no nnan/ninf: _merge meets -inf
_MIN_KEYS_PER_SPLIT = 256  # a key range shorter than this costs more to merge than it saves
_ITEMS_PER_THREAD = 4  # key splits are added until each thread has this many items


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, S: int, gemm: str = "numba") -> np.ndarray:
    """softmax(q k^T / sqrt(hd) + causal mask) v per head; NumPy twin: `qwen_ref.attention.attention`.

    q: [T, H, hd] float32, the T newest tokens; keys, values: [Hkv, capacity, hd], a layer of the
    KV cache whose first S positions are all S tokens, the newest T last (query t sits at position
    S - T + t), float32 or 16-bit (bfloat16 words as uint16, or float16), widened as they are read.
    Query head h reads kv head h // (H // Hkv). The cache is only read. Returns a new [T, H * hd]
    float32 array. gemm="blas" (`matmul.GEMMS`) computes items of at least GEMM_ROWS query rows per
    kv head (prefill) with OpenBLAS's sgemm (`item_gemm`); fewer rows, or "numba", on this package's kernels.
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
    by_gemm = check_gemm(gemm) == "blas" and T * (H // Hkv) >= GEMM_ROWS
    n_splits = key_splits(T, H, Hkv, S, n_threads, GEMM_ROWS if by_gemm else QUERY_ROWS)
    m = np.empty((n_splits, T, H), dtype=np.float32)  # [splits, T, H] running max of scores
    l = np.empty((n_splits, T, H), dtype=np.float32)  # [splits, T, H] running sum of e^(s - m)
    acc = np.empty((n_splits, T, H, hd), dtype=np.float32)  # [splits, T, H, hd] running sum of e^(s - m) v
    if by_gemm:
        with one_blas_thread():
            _attend_gemm(q, keys, values, S, m, l, acc, n_threads)
    else:
        _attend(q, keys, values, S, m, l, acc, n_threads)
    out = np.empty((T, H * hd), dtype=np.float32)  # [T, H*hd]
    _merge(m, l, acc, out)
    return out


def key_splits(T: int, H: int, Hkv: int, S: int, n_threads: int, item_rows: int = QUERY_ROWS) -> int:
    """Key ranges per work item of item_rows query rows: enough to give every thread _ITEMS_PER_THREAD
    items, none shorter than _MIN_KEYS_PER_SPLIT keys."""
    row_blocks = Hkv * -(-T * (H // Hkv) // item_rows)  # ceil: items without key splits
    wanted = -(-_ITEMS_PER_THREAD * n_threads // row_blocks)  # ceil: splits that would fill every thread
    return max(1, min(wanted, S // _MIN_KEYS_PER_SPLIT))


@njit(parallel=True, fastmath=_FASTMATH, cache=CACHE)
def _attend(q, k, v, S, m, l, acc, n_threads):
    """Fill the partial (m, l, acc) of every (key split, query row, head) from the first S positions of k, v."""
    n_splits, T, H, hd = acc.shape
    G = H // k.shape[0]
    scale = np.float32(hd**-0.5)
    n_items = _n_items(T, G, k.shape[0], n_splits, QUERY_ROWS)
    n_parts = min(n_threads, n_items)  # given by the caller: get_num_threads() here would defeat caching
    for part in prange(n_parts):
        # one scratch per thread: running m, l [rows] and acc [rows, hd]; for item_by_rows the scores,
        # then weights [rows, block]; for item_tiled the same as [rows, keys] and its other scratch
        scores = np.empty((QUERY_ROWS, BLOCK_SCORES), dtype=np.float32)
        q_t = np.zeros((hd, QUERY_ROWS), dtype=np.float32)
        weights = np.zeros((QUERY_ROWS, KEY_BLOCK), dtype=np.float32)
        block = np.empty((4, 16), dtype=np.float32)
        correction = np.empty(QUERY_ROWS, dtype=np.float32)
        m_run = np.empty(QUERY_ROWS, dtype=np.float32)
        l_run = np.empty(QUERY_ROWS, dtype=np.float32)
        acc_run = np.empty((QUERY_ROWS, hd), dtype=np.float32)
        for item in range(part * n_items // n_parts, (part + 1) * n_items // n_parts):
            j, split, r0, rows, lo, hi = _item(item, T, G, S, k.shape[0], n_splits, QUERY_ROWS)
            keys, values = k[j], v[j]  # [capacity, hd] each, contiguous rows
            _reset(m_run, l_run, acc_run)
            if rows >= 4 and hd % 16 == 0:  # the micro-kernel's 4 x 16 blocks fit: all rows at once
                item_tiled(q, keys, values, j, G, S - T, r0, rows, lo, hi, scale, q_t, weights, block, correction,
                           m_run, l_run, acc_run)
            else:
                item_by_rows(q, keys, values, j, G, S - T, r0, rows, lo, hi, scale, scores, m_run, l_run, acc_run)
            _store(m, l, acc, split, j, G, r0, rows, m_run, l_run, acc_run)


@njit(parallel=True, fastmath=_FASTMATH, cache=CACHE)
def _attend_gemm(q, k, v, S, m, l, acc, n_threads):
    """_attend with items of GEMM_ROWS rows, each computed by `item_gemm` (OpenBLAS's sgemm)."""
    n_splits, T, H, hd = acc.shape
    G = H // k.shape[0]
    n_items = _n_items(T, G, k.shape[0], n_splits, GEMM_ROWS)
    n_parts = min(n_threads, n_items)  # given by the caller: get_num_threads() here would defeat caching
    for part in prange(n_parts):
        # one scratch per thread: queries [rows, hd], keys and values widened [keys, hd] (16-bit caches),
        # scores then weights [rows, keys], running m, l [rows] and acc [rows, hd]
        q_rows = np.empty((GEMM_ROWS, hd), dtype=np.float32)
        k_block = np.empty((GEMM_KEYS, hd), dtype=np.float32)
        v_block = np.empty((GEMM_KEYS, hd), dtype=np.float32)
        weights = np.empty((GEMM_ROWS, GEMM_KEYS), dtype=np.float32)
        m_run = np.empty(GEMM_ROWS, dtype=np.float32)
        l_run = np.empty(GEMM_ROWS, dtype=np.float32)
        acc_run = np.empty((GEMM_ROWS, hd), dtype=np.float32)
        for item in range(part * n_items // n_parts, (part + 1) * n_items // n_parts):
            j, split, r0, rows, lo, hi = _item(item, T, G, S, k.shape[0], n_splits, GEMM_ROWS)
            _reset(m_run, l_run, acc_run)
            item_gemm(q, k[j], v[j], j, G, S - T, r0, rows, lo, hi, q_rows, k_block, v_block, weights,
                      m_run, l_run, acc_run)
            _store(m, l, acc, split, j, G, r0, rows, m_run, l_run, acc_run)


@njit(cache=CACHE)
def _n_items(T, G, Hkv, n_splits, item_rows):
    """Work items: blocks of item_rows of the T * G query rows of each kv head, times the key splits."""
    return Hkv * -(-T * G // item_rows) * n_splits


@njit(cache=CACHE)
def _item(item, T, G, S, Hkv, n_splits, item_rows):
    """Work item `item` of `_n_items` as (kv head j, key split, first query row r0, rows, keys lo .. hi-1)."""
    n_rows, past = T * G, S - T
    n_blocks = -(-n_rows // item_rows)
    split_len = -(-S // n_splits)
    row_block, rest = divmod(item, Hkv * n_splits)
    j, split = divmod(rest, n_splits)
    # Row blocks in the order 0, last, 1, last-1, ...: each thread's contiguous run of items then
    # mixes short (early) and long (late) causal rows, which balances the threads.
    row_block = row_block // 2 if row_block % 2 == 0 else n_blocks - 1 - row_block // 2
    r0 = row_block * item_rows
    rows = min(item_rows, n_rows - r0)
    lo = split * split_len
    hi = min(lo + split_len, past + (r0 + rows - 1) // G + 1)  # the last row sees the most keys
    return j, split, r0, rows, lo, hi


@njit(cache=CACHE)
def _reset(m_run, l_run, acc_run):
    """An item's running state before its first key: m = -inf, l = 0, acc = 0."""
    m_run[:] = -np.inf
    l_run[:] = 0.0
    acc_run[:] = 0.0


@njit(cache=CACHE)
def _store(m, l, acc, split, j, G, r0, rows, m_run, l_run, acc_run):
    """The item's rows of (m, l, acc) for key split `split`: row r0 + i is head j * G + (r0 + i) % G."""
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
