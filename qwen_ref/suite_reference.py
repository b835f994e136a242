"""One case of a reference suite: teacher-forced logits on the case's tokens, kept compact, in one file.

Row t of every array is the distribution of the token after tokens[t] (positions as everywhere in
qwen-ref). Per position the file keeps the K most likely tokens with their log-probabilities and the
log of the probability left outside them (the tail), so a judge can compute a KL divergence over
K + 1 buckets without the [T, V] logits (1.2 MB per position at Qwen's 152k vocabulary; K = 20
keeps 0.3 kB). Log-probabilities are log_softmax of the float32 logits taken in float64 and kept in
float64, so the file adds no rounding of its own.

A case file (`case-00000.npz`, written by `npz.save_npz`, so the same values give the same bytes):

    id             0-d str         the case id
    tokens         int64 [T]       the prompt, as the model saw it
    top_ids        int32 [T, K]    token ids by decreasing log-probability (ties: lower id first)
    top_logprobs   float64 [T, K]  their log-probabilities
    tail_logprob   float64 [T]     log(1 - sum of the top-K probabilities), from the other V - K logits
                                   (-inf when K = V)
    next_logprob   float64 [T-1]   log-probability of the token that actually follows, tokens[t+1]
    max_abs_logit  float64 [T]     max |logit| of the row (float32 values, exact): the scale of the EXACT
                                   tolerance of `suite check`, as `qwen-ref compare` takes it
    logits         float32 [T, V]  only with --full-logits

It is written to a temporary name and renamed, so a case file exists whole or not at all: a killed
run resumes at the first case without a file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from qwen_ref.errors import QwenRefError
from qwen_ref.generation import prefill
from qwen_ref.model import ALL_ROWS, QwenModel
from qwen_ref.npz import save_npz
from qwen_ref.suite_cases import Case

DEFAULT_TOP_K = 20


def top_ids(row: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries of row [V], by decreasing value then increasing id, so ties at the k-th value
    always keep the same tokens (argpartition alone would keep an arbitrary one of them)."""
    kth = np.partition(row, len(row) - k)[len(row) - k]  # the k-th largest value
    candidates = np.flatnonzero(row >= kth)  # [>= k], more only where values tie
    return candidates[np.lexsort((candidates, -row[candidates]))[:k]]  # [k]


def compact_reference(logits: np.ndarray, tokens: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    """The arrays of a case file (but id and logits) from the logits [T, V] of `tokens` [T]."""
    T, V = logits.shape
    k = min(top_k, V)
    best_ids = np.empty((T, k), dtype=np.int32)  # [T, K]
    best_logprobs = np.empty((T, k))  # [T, K]
    tail = np.empty(T)  # [T]
    max_abs_logit = np.empty(T)  # [T]
    next_logprob = np.empty(T - 1)  # [T-1]
    for t in range(T):  # row by row: one float64 [V] row at a time, never a [T, V] copy
        x = logits[t].astype(np.float64)  # [V]
        max_abs_logit[t] = np.abs(x).max()
        ids = top_ids(x, k)  # [K]: log_softmax keeps the order
        m = x[ids[0]]  # the row's max
        e = np.exp(x - m)  # [V]
        lse = m + np.log(e.sum())  # log-sum-exp of the row, as log_softmax computes it
        best_ids[t], best_logprobs[t] = ids, x[ids] - lse
        e[ids] = 0.0
        rest = e.sum()  # the tail summed on its own, not 1 minus the top-K: exact for a tail of 1e-30 too
        tail[t] = m + np.log(rest) - lse if rest > 0 else -np.inf
        if t + 1 < T:
            next_logprob[t] = x[tokens[t + 1]] - lse
    return {"tokens": np.asarray(tokens, dtype=np.int64), "top_ids": best_ids, "top_logprobs": best_logprobs,
            "tail_logprob": tail, "next_logprob": next_logprob, "max_abs_logit": max_abs_logit}


def make_case(model: QwenModel, case: Case, path: Path, top_k: int, full_logits: bool, chunk: int) -> float:
    """Run one case teacher-forced from an empty cache and write its file atomically; the seconds it took."""
    started = time.perf_counter()
    tokens = np.array(case.tokens, dtype=np.int64)  # [T]
    logits = prefill(model, tokens, model.new_cache(len(tokens)), ALL_ROWS, chunk)  # [T, V]
    arrays = {"id": np.array(case.id), **compact_reference(logits, tokens, top_k)}
    if full_logits:
        arrays["logits"] = logits
    # the temporary name is fixed per case: a killed run's leftover is simply overwritten
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_npz(tmp, arrays)
        os.replace(tmp, path)
    except OSError as exc:
        raise QwenRefError(f"cannot write {path}: {exc.strerror or exc}") from None
    return time.perf_counter() - started


def load_case(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a case file; a one-line error when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise QwenRefError(f"{path}: no such case file (was `qwen-ref suite make` run to the end?)") from None
    except (OSError, ValueError, EOFError) as exc:
        raise QwenRefError(f"{path}: not a readable case file ({exc})") from None


def is_case_done(path: Path, case: Case) -> bool:
    """Whether `path` already holds this case (same id, same tokens): a resumed run skips it.

    A file of another case under this name means the folder holds another suite: refused, not overwritten.
    """
    if not path.is_file():
        return False
    arrays = load_case(path)
    if str(arrays.get("id")) != case.id or tuple(arrays.get("tokens", ()).tolist()) != case.tokens:
        raise QwenRefError(f"{path} holds case {str(arrays.get('id'))!r}, not {case.id!r} with these tokens: "
                           "the folder belongs to another suite (use another --out)")
    return True
