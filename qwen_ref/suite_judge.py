"""The verdict on one case of another engine's log-probabilities against a suite's reference.

Both sides are teacher-forced on the same token ids (checked before this runs), so position t of
each is the distribution of the token after tokens[t] given the same prefix. Per position:

- KL(ref || other), nats, over K + 1 buckets: the reference's top-K tokens, then everything else
  (the reference's stored tail; the engine's 1 minus its probabilities of those K tokens). The
  direction weighs errors by the reference's probabilities: what the true model would say most.
- top-1: the engine's most likely listed token against the reference's; a disagreement where the
  reference's own margin between the two is within EXACT_MAX_DELTA is a near-tie and not counted.
- top-K overlap: |reference's top-K & engine's K most likely| / K.
- |Δlogprob| over the reference's top-K tokens.

Tokens the engine did not list. The engine lists its top-N per position (N >= K). A reference top-K
token missing from that list has an engine log-probability no larger than the smallest one listed,
so it is given that value: an upper bound, the closest the engine can be consistent with its list.
Its |Δ| and KL term are then lower bounds of the truth: a missing token can make the verdict no
better than its bound shows, and where the engine's top-N already holds every reference top-K token
(any engine close to the reference, with N >= K) nothing is estimated. The engine's tail bucket is
1 minus its mass on the K tokens, and never less than the mass it listed outside them.

Verdicts, from each case's worst position up:

    exact  max |Δlogprob| <= EXACT_MAX_DELTA and every top-1 agrees (but near-ties)
    drift  KL mean <= DRIFT_KL_MEAN, KL max <= DRIFT_KL_MAX, top-1 agreement >= DRIFT_TOP1,
           mean top-K overlap >= DRIFT_OVERLAP
    wrong  anything else
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass

import numpy as np

# exact: float32 engines that sum in another order differ from qwen-ref by ~1e-4 in logprob on the
# 0.5B shape (compare.py's rtol of 1e-4 of the largest logit, met with 5-60x to spare); any 16-bit
# rounding on the way moves logits by 1e-2 or more (benchmarks/kv_dtype_error.md: a float16 KV cache
# 0.006-0.04, bfloat16 0.05-0.26), so 1e-3 nats separates the two.
EXACT_MAX_DELTA = 1e-3
# drift: the same model computed with less precision. The 16-bit KV caches of kv_dtype_error.md give
# KL means of 1e-4..1e-2 on the fixtures (tests/test_suite.py measures the bfloat16 one) and change the
# argmax at under 2% of positions; weight quantization at 4-8 bits is reported in the same range by
# llama.cpp's KL-divergence statistics. A bug (RoPE pairing, a lost bias, a wrong template, an
# off-by-one position) moves whole distributions: KL of nats, top-1 mostly lost. The bounds sit between.
DRIFT_KL_MEAN = 0.05  # nats
DRIFT_KL_MAX = 0.5  # nats, one position
DRIFT_TOP1 = 0.8  # fraction of positions, near-ties counted as agreeing
DRIFT_OVERLAP = 0.7  # mean over positions


class Verdict(enum.IntEnum):
    """Ordered: a case is acceptable when its verdict is at least as good (no greater) than --accept."""

    EXACT = 0
    DRIFT = 1
    WRONG = 2

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class CaseReport:
    id: str
    positions: int  # P compared (T, or T - 1 when the engine gave no distribution after the last token)
    kl_max: float  # KL(ref || other), nats, K + 1 buckets
    kl_max_at: int
    kl_mean: float
    top1_agree: int  # positions whose top-1 agrees, near-ties counted as agreeing
    top1_exact_agree: int  # ... without that allowance
    overlap_mean: float  # top-K overlap
    overlap_min: float
    max_abs_delta: float  # max |Δlogprob| over the reference's top-K tokens
    max_abs_delta_at: tuple[int, int]  # (position, token id)
    missing: int  # reference top-K tokens the engine did not list (valued at its smallest listed logprob)
    verdict: Verdict

    def to_dict(self) -> dict:
        out = asdict(self) | {"verdict": str(self.verdict)}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def judge_case(case_id: str, ref_ids: np.ndarray, ref_logprobs: np.ndarray, ref_tail: np.ndarray,
               other: list[tuple[np.ndarray, np.ndarray]]) -> CaseReport:
    """The report of one case: reference top_ids [T, K], top_logprobs [T, K], tail_logprob [T]; `other`
    holds the engine's listed (ids [N], logprobs [N]) of its first P <= T positions, N >= K."""
    P, K = len(other), ref_ids.shape[1]
    kl, delta, overlap = np.empty(P), np.empty(P), np.empty(P)
    delta_token = np.empty(P, dtype=np.int64)
    agree = exact_agree = missing = 0
    with np.errstate(divide="ignore"):  # log(0) of an empty engine tail: an infinite KL, as it should be
        for t, (ids, logprobs) in enumerate(other):
            listed = dict(zip(ids.tolist(), logprobs.tolist()))
            floor = float(logprobs.min())
            r_ids, r_lp = ref_ids[t], ref_logprobs[t]  # [K] each
            r_set = set(r_ids.tolist())
            o_lp = np.array([listed.get(i, floor) for i in r_ids.tolist()])  # [K]
            missing += len(r_set - listed.keys())
            d = np.abs(o_lp - r_lp)  # [K]
            delta[t], delta_token[t] = d.max(), r_ids[d.argmax()]

            outside = sum(math.exp(lp) for i, lp in listed.items() if i not in r_set)
            o_tail = max(1.0 - float(np.exp(o_lp).sum()), outside)
            p_tail = math.exp(ref_tail[t])
            tail_term = p_tail * (ref_tail[t] - math.log(o_tail)) if p_tail > 0 else 0.0
            kl[t] = float((np.exp(r_lp) * (r_lp - o_lp)).sum()) + tail_term

            order = np.lexsort((ids, -logprobs))  # the engine's list by decreasing logprob, ties by id
            o_top1 = int(ids[order[0]])
            r_top1 = int(r_ids[0])
            # the reference's logprob of the engine's pick: known within its top-K, else at most its K-th
            pick = r_lp[r_ids == o_top1]
            margin = r_lp[0] - (pick[0] if len(pick) else r_lp[-1])
            exact_agree += o_top1 == r_top1
            agree += o_top1 == r_top1 or margin <= EXACT_MAX_DELTA
            overlap[t] = len(r_set & set(ids[order[:K]].tolist())) / K

    worst = int(np.argmax(delta))
    report = {"id": case_id, "positions": P, "kl_max": float(kl.max()), "kl_max_at": int(np.argmax(kl)),
              "kl_mean": float(kl.mean()), "top1_agree": int(agree), "top1_exact_agree": int(exact_agree),
              "overlap_mean": float(overlap.mean()), "overlap_min": float(overlap.min()),
              "max_abs_delta": float(delta[worst]), "max_abs_delta_at": (worst, int(delta_token[worst])),
              "missing": int(missing)}
    return CaseReport(**report, verdict=_verdict(report))


def _verdict(r: dict) -> Verdict:
    # written as "<=" on each bound so that a NaN anywhere fails to the worse verdict
    if r["max_abs_delta"] <= EXACT_MAX_DELTA and r["top1_agree"] == r["positions"]:
        return Verdict.EXACT
    if (r["kl_mean"] <= DRIFT_KL_MEAN and r["kl_max"] <= DRIFT_KL_MAX
            and r["top1_agree"] >= DRIFT_TOP1 * r["positions"] and r["overlap_mean"] >= DRIFT_OVERLAP):
        return Verdict.DRIFT
    return Verdict.WRONG


THRESHOLDS = {"exact_max_delta": EXACT_MAX_DELTA, "drift_kl_mean": DRIFT_KL_MEAN, "drift_kl_max": DRIFT_KL_MAX,
              "drift_top1": DRIFT_TOP1, "drift_overlap": DRIFT_OVERLAP}
