"""The verdict on one case of another engine's log-probabilities against a suite's reference.

Both sides are teacher-forced on the same token ids (checked before this runs), so position t of
each is the distribution of the token after tokens[t] given the same prefix. Per position:

- KL(ref || other), nats, over K + 1 buckets: the reference's top-K tokens, then everything else
  (the reference's stored tail; the engine's 1 minus its probabilities of those K tokens). The
  direction weighs errors by the reference's probabilities: what the true model would say most.
- top-1: the engine's most likely listed token against the reference's; a disagreement where the
  reference's margin between the two is at most twice the EXACT tolerance is a near-tie and not
  counted (compare's rule: within the tolerance only such a margin can flip). When the engine's pick
  is outside the reference's top-K its margin is unknown (only bounded below) and it is no near-tie.
- top-K overlap: |reference's top-K & engine's K most likely| / K.
- |Δlogprob| over the reference's top-K tokens.

Tokens the engine did not list. The engine lists its top-N per position (N >= K). A reference top-K
token missing from that list has an engine log-probability no larger than the smallest one listed,
so it is given that value: an upper bound, the closest the engine can be consistent with its list.
Its |Δ| and KL term are then lower bounds of the truth; where the engine's top-N holds every
reference top-K token (any engine close to the reference, with N >= K) nothing is estimated.

The engine's tail is 1 - exp(logsumexp of its K log-probabilities), computed as -expm1 so that a
peaked row keeps its digits, and never less than the mass it listed outside the K tokens. Below
TAIL_RESOLUTION (float64 epsilon times K, what summing K values can resolve) the engine's tail is
not known, only that it is that small (an engine listing exactly the K tokens, whose probabilities
sum to 1 or more by rounding): it is then given the reference's tail when that is as small, else
TAIL_RESOLUTION, again the closest value consistent with what the engine wrote.

Verdicts (qwen_ref.verdict.Grade, as `qwen-ref compare` gives them), from each case's worst position:

    EXACT  max |Δlogprob| <= atol + rtol * max(1, max |logit|) and every top-1 agrees (but near-ties)
    DRIFT  KL mean <= kl_mean, KL max <= kl_max, top-1 agreement >= top1, mean top-K overlap >= overlap
    WRONG  anything else

EXACT is compare's rule (qwen_ref.compare, qwen_ref.verdict) moved from logits to log-probabilities:
the same tolerance, from the same rtol and atol and the largest reference |logit| over the positions
judged (stored per position in the case file). Δlogprob_i = Δlogit_i - Δlse, where Δlse is, to first
order, the softmax-weighted mean of the Δlogit; so |Δlogprob| <= 2 max |Δlogit|, and for errors that do
not follow the logits (float32 summation order) the mean is small and |Δlogprob| is the size of
|Δlogit| (numba against numpy on the fixtures: 3e-6 against 8e-6). The suite sees K tokens, not V: it
can call EXACT an engine whose error sits outside the top-K only, which compare would not.
DRIFT is looser than compare's on purpose: suites judge quantized engines (4-8 bit weights), which
compare's limits (tuned on 16-bit rounding) would call WRONG; what a suite exists to catch is a bug.
README.md, "Verdicts", has both side by side.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from qwen_ref.compare import DEFAULT_ATOL, DEFAULT_RTOL
from qwen_ref.verdict import Grade

# drift: the same model computed with less precision. The 16-bit KV caches of kv_dtype_error.md give
# KL means of 1e-4..1e-2 on the fixtures (tests/test_suite.py measures the bfloat16 one) and change the
# argmax at under 2% of positions; weight quantization at 4-8 bits is reported in the same range by
# llama.cpp's KL-divergence statistics. A bug (RoPE pairing, a lost bias, a wrong template, an
# off-by-one position) moves whole distributions: KL of nats, top-1 mostly lost. The bounds sit between.
DRIFT_KL_MEAN = 0.05  # nats
DRIFT_KL_MAX = 0.5  # nats, one position
DRIFT_TOP1 = 0.8  # fraction of positions, near-ties counted as agreeing
DRIFT_OVERLAP = 0.7  # mean over positions
TAIL_EPS = float(np.finfo(np.float64).eps)  # times K: TAIL_RESOLUTION of a row


@dataclass(frozen=True)
class Thresholds:
    """The limits of the verdicts (`suite check --rtol --atol --drift-*`)."""

    rtol: float = DEFAULT_RTOL  # EXACT: of max(1, max |logit|), as in compare
    atol: float = DEFAULT_ATOL  # EXACT: added to it
    kl_mean: float = DRIFT_KL_MEAN  # DRIFT: nats
    kl_max: float = DRIFT_KL_MAX  # DRIFT: nats, one position
    top1: float = DRIFT_TOP1  # DRIFT: fraction of positions
    overlap: float = DRIFT_OVERLAP  # DRIFT: mean top-K overlap


DEFAULT_THRESHOLDS = Thresholds()


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
    tolerance: float  # EXACT's bound on it: atol + rtol * max(1, max |logit| over the P positions)
    missing: int  # reference top-K tokens the engine did not list (valued at its smallest listed logprob)
    verdict: Grade

    def to_dict(self) -> dict:
        out = asdict(self) | {"verdict": self.verdict.name}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def engine_tail(o_lp: np.ndarray, outside: float, ref_tail: float) -> float:
    """The engine's probability outside the reference's K tokens, given its log-probabilities of them o_lp [K],
    the mass it listed outside them and the reference's tail probability (module docstring)."""
    tail = max(-math.expm1(float(np.logaddexp.reduce(o_lp))), outside)
    resolution = TAIL_EPS * len(o_lp)
    return tail if tail >= resolution else max(min(ref_tail, resolution), outside)


def judge_case(case_id: str, ref_ids: np.ndarray, ref_logprobs: np.ndarray, ref_tail: np.ndarray,
               ref_max_abs_logit: np.ndarray, other: list[tuple[np.ndarray, np.ndarray]],
               limits: Thresholds = DEFAULT_THRESHOLDS) -> CaseReport:
    """The report of one case: reference top_ids [T, K], top_logprobs [T, K], tail_logprob [T], max_abs_logit [T];
    `other` holds the engine's listed (ids [N], logprobs [N]) of its first P <= T positions, N >= K."""
    P, K = len(other), ref_ids.shape[1]
    tolerance = limits.atol + limits.rtol * max(1.0, float(ref_max_abs_logit[:P].max()))
    kl, delta, overlap = np.empty(P), np.empty(P), np.empty(P)
    delta_token = np.empty(P, dtype=np.int64)
    agree = exact_agree = missing = 0
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
        p_tail = math.exp(ref_tail[t])
        # engine_tail > 0 whenever p_tail > 0, so the log is defined
        tail_term = p_tail * (ref_tail[t] - math.log(engine_tail(o_lp, outside, p_tail))) if p_tail > 0 else 0.0
        kl[t] = float((np.exp(r_lp) * (r_lp - o_lp)).sum()) + tail_term

        order = np.lexsort((ids, -logprobs))  # the engine's list by decreasing logprob, ties by id
        o_top1 = int(ids[order[0]])
        r_top1 = int(r_ids[0])
        pick = r_lp[r_ids == o_top1]  # the reference's logprob of the engine's pick, if in its top-K
        # a logprob margin is a logit margin; outside the top-K it is only bounded below: no near-tie
        near_tie = len(pick) > 0 and r_lp[0] - pick[0] <= 2 * tolerance
        exact_agree += o_top1 == r_top1
        agree += o_top1 == r_top1 or near_tie
        overlap[t] = len(r_set & set(ids[order[:K]].tolist())) / K

    worst = int(np.argmax(delta))
    report = {"id": case_id, "positions": P, "kl_max": float(kl.max()), "kl_max_at": int(np.argmax(kl)),
              "kl_mean": float(kl.mean()), "top1_agree": int(agree), "top1_exact_agree": int(exact_agree),
              "overlap_mean": float(overlap.mean()), "overlap_min": float(overlap.min()),
              "max_abs_delta": float(delta[worst]), "max_abs_delta_at": (worst, int(delta_token[worst])),
              "tolerance": tolerance, "missing": int(missing)}
    return CaseReport(**report, verdict=_verdict(report, limits))


def _verdict(r: dict, limits: Thresholds) -> Grade:
    # written as "<=" on each bound so that a NaN anywhere fails to the worse verdict
    if r["max_abs_delta"] <= r["tolerance"] and r["top1_agree"] == r["positions"]:
        return Grade.EXACT
    if (r["kl_mean"] <= limits.kl_mean and r["kl_max"] <= limits.kl_max
            and r["top1_agree"] >= limits.top1 * r["positions"] and r["overlap_mean"] >= limits.overlap):
        return Grade.DRIFT
    return Grade.WRONG
