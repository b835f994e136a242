"""How close two sets of logits are, judged the way qwen-ref judges itself against transformers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Allowed max |difference| relative to the largest reference logit. float32 dot products summed in a
# different order (our BLAS or kernels vs PyTorch's) differ by ~sqrt(n) ulp per projection; through
# dozens of layers that stays orders of magnitude below 1e-4 of the logit scale.
DEFAULT_RTOL = 1e-4


@dataclass(frozen=True)
class LogitReport:
    max_abs_diff: float
    max_abs_ref: float
    tolerance: float  # rtol * max(1, max |ref|)
    argmax_agree: int  # positions where both pick the same top-1 token
    positions: int
    first_argmax_mismatch: int | None

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.first_argmax_mismatch is None

    def summary(self) -> str:
        return (
            f"max |diff| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), "
            f"argmax agrees at {self.argmax_agree}/{self.positions} positions"
            + ("" if self.first_argmax_mismatch is None else f", first mismatch at position {self.first_argmax_mismatch}")
        )


def compare_logits(ref: np.ndarray, other: np.ndarray, rtol: float = DEFAULT_RTOL) -> LogitReport:
    """Compare logits [T, V] position by position against a reference."""
    if ref.shape != other.shape:
        raise ValueError(f"logit shapes differ: {ref.shape} vs {other.shape}")
    ref, other = ref.astype(np.float32), other.astype(np.float32)
    max_ref = float(np.abs(ref).max())
    agree = ref.argmax(axis=-1) == other.argmax(axis=-1)  # [T]
    mismatches = np.flatnonzero(~agree)
    return LogitReport(
        max_abs_diff=float(np.abs(ref - other).max()),
        max_abs_ref=max_ref,
        tolerance=rtol * max(1.0, max_ref),
        argmax_agree=int(agree.sum()),
        positions=len(agree),
        first_argmax_mismatch=int(mismatches[0]) if len(mismatches) else None,
    )
