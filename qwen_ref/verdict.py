"""The graded verdict of `qwen-ref compare`: EXACT, DRIFT or WRONG, from a LogitReport's statistics.

    EXACT  within float32 reordering: max |A - B| <= atol + rtol * max(1, max |A|) (the tolerance of
           qwen_ref.compare). An argmax flip at a near-tie is listed but cannot break it: within the
           tolerance only a margin of at most twice the tolerance can flip.
    DRIFT  the rounding of a 16-bit engine, not a bug: every value finite, and the logits close in
           scale-free terms, NMSE, KL(A || B) and top-5 overlap within the thresholds below. A
           16-bit KV cache or bf16 activations land here.
    WRONG  anything else: a bug, or a different model or prompt.

EXACT needs every criterion to pass, DRIFT every DRIFT criterion. No single statistic separates
drift from bugs on every model: a random model's logits are nearly flat (the 0.5B shape's max
|logit| is a few units over 152k tokens: benchmarks/verdict_cases.md), so its distributions are
near-uniform and even a bug gives a small KL, while on a trained, peaked model a bug moves the top tokens and KL and top-5 overlap show it.
NMSE (per position, the sum of squared differences over the reference row's sum of squared
deviations from its mean; averaged over positions) does not depend on the logit scale: 1 means B is
as far from A as A's spread itself.

`qwen-ref suite check` grades with the same Grade and the same EXACT tolerance, applied to the
log-probabilities of a suite's top-K tokens, and a looser DRIFT (qwen_ref.suite_judge; README.md,
"Verdicts", has the two side by side).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwen_ref.compare import LogitReport


class Grade(IntEnum):
    """Ordered from best to worst: `--accept drift` accepts EXACT and DRIFT."""

    EXACT = 0
    DRIFT = 1
    WRONG = 2


ACCEPT_CHOICES = ("exact", "drift")
# the rules in one sentence, for `qwen-ref compare --help`
RULES = ("Verdict: EXACT when max|A-B| <= atol + rtol*max(1, max|A|) (float32 reordering); DRIFT when every "
         "value is finite and the NMSE (mean over positions of sum (A-B)^2 / sum (A - mean A)^2), the largest "
         "KL(A||B) and the mean top-5 overlap are within the --drift-* thresholds (16-bit rounding); WRONG "
         "otherwise (a bug).")
HINT = "a bf16 engine or a 16-bit KV cache is expected to be DRIFT; accept it with --accept drift"

# The DRIFT limits, set between what 16-bit rounding and what bugs do, as measured by tools/verdict_cases.py
# (benchmarks/verdict_cases.md) on the 0.5B shape (random weights, 64 positions) and the ten fixtures
# (2 layers, 10 to 320 positions, logits spread to max |A| 7 to 41). Rounding: an f16 or bf16 KV cache,
# bf16 activations before every projection. Bugs: layer 0's k bias dropped, RoPE pairing neighbours.
# NMSE, the main discriminator (scale-free): rounding at most 1.55e-4 (bf16 activations over 320
# positions; 3.5e-5 on the 0.5B shape), bugs at least 3.9e-3 (the k bias, 0.5B shape). 5e-4 sits 3x
# above the first and 8x below the second; it also calls the k bias dropped in the *last* of two layers
# WRONG (6.3e-4 and up), but not in layer 12 of the 0.5B shape's 24 (3.1e-5: on random weights that bug
# moves the logits less than bf16 rounding does, and no statistic of the logits can tell them apart).
DRIFT_NMSE = 5e-4
# KL max: rounding at most 0.011 (bf16 activations, the most peaked fixture, max |A| 41), bugs on the
# fixtures at least 0.118; a flat model hides bugs from KL (the 0.5B shape's k-bias bug: 0.0034), which is
# why NMSE decides there. 0.03 leaves a factor of about 3 to 4 either side.
DRIFT_KL = 0.03
# top-5 overlap (mean): rounding at least 0.975, bugs at most 0.938 (k bias, 16 positions; 0.884 on
# the 0.5B shape). A safety net for errors concentrated on the top tokens, which NMSE averages away.
DRIFT_TOP5 = 0.9


@dataclass(frozen=True)
class DriftThresholds:
    """The DRIFT criteria's limits (`--drift-nmse`, `--drift-kl`, `--drift-top5`)."""

    nmse: float = DRIFT_NMSE  # mean over positions of sum (A - B)^2 / sum (A - mean A)^2
    kl: float = DRIFT_KL  # max over positions of KL(softmax A || softmax B), nats
    top5: float = DRIFT_TOP5  # min mean top-5 overlap


DEFAULT_DRIFT = DriftThresholds()


@dataclass(frozen=True)
class Criterion:
    name: str  # the LogitReport field it reads
    label: str  # for people
    grade: Grade  # EXACT: needed for EXACT only; DRIFT: needed for DRIFT (and so for EXACT)
    value: float
    threshold: float
    at_least: bool  # value >= threshold passes; otherwise value <= threshold

    @property
    def passed(self) -> bool:
        # comparisons with NaN are False: a NaN statistic fails
        return self.value >= self.threshold if self.at_least else self.value <= self.threshold

    def to_dict(self) -> dict:
        finite = self.value == self.value and abs(self.value) != float("inf")
        return {"name": self.name, "for": self.grade.name, "value": self.value if finite else None,
                "threshold": self.threshold, "relation": ">=" if self.at_least else "<=", "passed": self.passed}


@dataclass(frozen=True)
class Verdict:
    grade: Grade
    criteria: tuple[Criterion, ...]

    def failed(self) -> list[Criterion]:
        return [c for c in self.criteria if not c.passed]

    def accepted(self, accept: Grade) -> bool:
        """Whether the verdict is at least as good as `accept`."""
        return self.grade <= accept

    def describe(self) -> str:
        """The criteria, one per line, then the verdict with the criteria that failed."""
        lines = ["criteria           (EXACT needs all; DRIFT the drift ones)"]
        for c in self.criteria:
            relation = ">=" if c.at_least else "<="
            lines.append(f"  {c.grade.name.lower():5}  {c.label:22} {c.value:<12.6g} {relation} {c.threshold:<10.6g} "
                         f"{'pass' if c.passed else 'FAIL'}")
        failed = self.failed()
        why = f" (failed: {', '.join(c.label for c in failed)})" if failed else ""
        lines.append(f"verdict            {self.grade.name}{why}")
        if self.grade != Grade.EXACT:
            lines.append(f"note               {HINT}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"verdict": self.grade.name, "criteria": [c.to_dict() for c in self.criteria],
                "failed": [c.name for c in self.failed()]}


def judge(report: LogitReport, drift: DriftThresholds = DEFAULT_DRIFT) -> Verdict:
    """Grade a report (module docstring)."""
    nonfinite = report.nonfinite_ref + report.nonfinite_other
    criteria = (
        Criterion("max_abs_diff", "max |A - B|", Grade.EXACT, report.max_abs_diff, report.tolerance, False),
        Criterion("nonfinite", "non-finite values", Grade.DRIFT, nonfinite, 0, False),
        Criterion("nmse_mean", "NMSE mean", Grade.DRIFT, report.nmse_mean, drift.nmse, False),
        Criterion("kl_max", "KL(A || B) max", Grade.DRIFT, report.kl_max, drift.kl, False),
        Criterion("top5_overlap", "top-5 overlap", Grade.DRIFT, report.top5_overlap, drift.top5, True),
    )
    if all(c.passed for c in criteria):
        grade = Grade.EXACT
    elif all(c.passed for c in criteria if c.grade == Grade.DRIFT):
        grade = Grade.DRIFT
    else:
        grade = Grade.WRONG
    return Verdict(grade, criteria)
