"""How close two sets of logits are, and the verdict on them: qwen-ref's on itself against transformers, and on
another engine against qwen-ref (`qwen-ref compare A B`, `assert_logits_close`).

A is the reference, B the logits under test, both [T, V]; positions are 0-based and row t is the
distribution of token t+1. Files may hold the logits of some positions only (`qwen-ref logits --last N`):
their `positions` array says which, and the files are compared on the positions both hold. The
exactness rule, in one place (`LogitReport.ok`, the EXACT verdict):

    max |A - B| <= atol + rtol * max(1, max |A|)   and every value finite

The tolerance scales with the largest reference logit because float32 rounding error does; the
max(1, .) keeps it meaningful for logits near zero. Every argmax flip is listed with A's margin between
the two tokens; within the tolerance only a near-tie (margin <= 2 x tolerance) can flip, and such a flip
does not break exactness. Engines that round to 16 bits are not exact but not wrong either: the graded
verdict (EXACT, DRIFT, WRONG) and its thresholds are in `qwen_ref.verdict`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qwen_ref import incremental, trace_compare, verdict
from qwen_ref.errors import QwenRefError
from qwen_ref.weights import read_safetensors, to_float32

# Allowed max |difference| relative to the largest reference logit. float32 dot products summed in a
# different order (our BLAS or kernels vs PyTorch's) differ by ~sqrt(n) ulp per projection; through
# dozens of layers that stays orders of magnitude below 1e-4 of the logit scale.
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 0.0
TOP_K = 5  # the k of the top-k overlap statistic
# The statistics are computed in float64 on blocks of rows of about this many elements (32 MB), never
# on whole [T, V] copies: with Qwen's 152k vocabulary each float64 copy costs 1.2 MB per position.
_BLOCK_ELEMENTS = 2**22


@dataclass(frozen=True)
class Flip:
    """A position where A and B pick different top-1 tokens."""

    position: int  # the prompt position, 0-based: the row predicts token position + 1
    ref_token: int  # argmax A
    other_token: int  # argmax B
    margin: float  # A[ref_token] - A[other_token] >= 0: how far apart the reference holds the two
    near_tie: bool  # margin <= 2 * tolerance: differences within the tolerance can cause this flip


@dataclass(frozen=True)
class LogitReport:
    """Statistics of B against the reference A; `ok` is the exactness rule of the module docstring.

    The graded verdict (EXACT, DRIFT, WRONG) is `qwen_ref.verdict.judge(report)`.
    """

    positions: int  # T
    vocab_size: int  # V
    rtol: float
    atol: float
    max_abs_ref: float  # max |A|
    tolerance: float  # atol + rtol * max(1, max |A|)
    max_abs_diff: float  # max |A - B|
    max_abs_diff_at: tuple[int, int]  # (position, token id) of that difference
    max_rel_diff: float  # max |A - B| / max(1, max |A|): the number rtol bounds when atol is 0
    argmax_agree: int  # positions where both pick the same top-1 token
    flips: tuple[Flip, ...]  # every position where they do not, in order
    top5_overlap: float  # mean over positions of |top5(A) & top5(B)| / 5 (top-V when V < 5)
    kl_max: float  # max over positions of KL(softmax A || softmax B), nats, float64
    kl_max_at: int
    kl_mean: float
    nmse_max: float  # max over positions of sum (A - B)^2 / sum (A - mean A)^2: scale-free, 1 = as far as noise
    nmse_max_at: int
    nmse_mean: float
    nonfinite_ref: int  # NaN or infinite values in A
    nonfinite_other: int  # ... and in B; any of either fails the comparison

    @property
    def ok(self) -> bool:
        """EXACT: within float32 reordering. A flip at a near-tie does not break it (it cannot happen otherwise
        within the tolerance)."""
        # `<=` is False for NaN, so a NaN difference fails too
        return self.max_abs_diff <= self.tolerance and self.nonfinite_ref == 0 and self.nonfinite_other == 0

    @property
    def argmax_fraction(self) -> float:
        return self.argmax_agree / self.positions

    @property
    def first_argmax_mismatch(self) -> int | None:
        """The earliest position whose argmax differs."""
        return self.flips[0].position if self.flips else None

    def summary(self) -> str:
        """One line: the numbers the exactness rule looks at, and the flips."""
        pos, tok = self.max_abs_diff_at
        text = (
            f"max |diff| {self.max_abs_diff:.3g} at position {pos} token {tok} (tolerance {self.tolerance:.3g}), "
            f"argmax agrees at {self.argmax_agree}/{self.positions} positions"
        )
        if self.flips:
            near = sum(f.near_tie for f in self.flips)
            text += f", first mismatch at position {self.flips[0].position} ({near} of {len(self.flips)} at near-ties)"
        if self.nonfinite_ref or self.nonfinite_other:
            text += f", non-finite values: {self.nonfinite_ref} in reference, {self.nonfinite_other} in other"
        return text

    def describe(self) -> str:
        """Every statistic, one per line (positions are 0-based; row t predicts token t+1)."""
        pos, tok = self.max_abs_diff_at
        lines = [
            f"positions x vocab  {self.positions} x {self.vocab_size} (positions 0-based; row t predicts token t+1)",
            f"max |A - B|        {self.max_abs_diff:.6g} at position {pos}, token {tok}",
            (f"tolerance          {self.tolerance:.6g} = atol {self.atol:g} + rtol {self.rtol:g} "
             f"x max(1, max |A| = {self.max_abs_ref:.6g})"),
            f"max relative diff  {self.max_rel_diff:.6g} (max |A - B| / max(1, max |A|))",
            f"top-1 agreement    {self.argmax_agree}/{self.positions} ({100 * self.argmax_fraction:.2f}%)",
            f"top-{TOP_K} overlap      {self.top5_overlap:.4f}",
            f"KL(A || B)         max {self.kl_max:.6g} nats at position {self.kl_max_at}, mean {self.kl_mean:.6g}",
            (f"NMSE               mean {self.nmse_mean:.6g}, max {self.nmse_max:.6g} at position "
             f"{self.nmse_max_at} (per row: sum (A - B)^2 / sum (A - mean A)^2)"),
        ]
        if self.nonfinite_ref or self.nonfinite_other:
            lines.append(f"non-finite values  {self.nonfinite_ref} in A, {self.nonfinite_other} in B")
        if not self.flips:
            lines.append("argmax flips       none")
        else:
            near = sum(f.near_tie for f in self.flips)
            lines.append(f"argmax flips       {len(self.flips)}, {near} at near-ties (A's margin <= 2 x tolerance "
                         f"= {2 * self.tolerance:.3g}: differences within the tolerance can cause them)")
            lines += [f"  position {f.position}: A picks {f.ref_token}, B picks {f.other_token}; A's margin "
                      f"{f.margin:.6g}{'  near-tie' if f.near_tie else ''}" for f in self.flips]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """All fields plus `ok`, JSON-ready: NaN and infinities become null (non-finite counts say why)."""
        out = {
            key: (None if isinstance(value, float) and not np.isfinite(value) else value)
            for key, value in asdict(self).items()
        }
        out["flips"] = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in f.items()}
                        for f in out["flips"]]
        return out | {"ok": self.ok, "argmax_fraction": self.argmax_fraction,
                      "first_argmax_mismatch": self.first_argmax_mismatch}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of logits [n, V] (log softmax over the last axis)."""
    x = np.asarray(logits, dtype=np.float64)  # [n, V]
    m = x.max(axis=-1, keepdims=True)  # [n, 1]
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))  # [n, V]


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Token ids of the k largest values of each row, unordered (ties broken arbitrarily)."""
    return np.argpartition(x, x.shape[-1] - k, axis=-1)[:, -k:]  # [n, k]


def compare_logits(
    ref: np.ndarray,
    other: np.ndarray,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    row_positions: np.ndarray | None = None,
) -> LogitReport:
    """Compare logits [T, V] (or one row [V]) position by position against a reference.

    `row_positions` [T] are the prompt positions of the rows, for the report (default: 0..T-1).
    """
    ref, other = np.atleast_2d(ref), np.atleast_2d(other)
    if ref.shape != other.shape:
        raise ValueError(f"logit shapes differ: {ref.shape} vs {other.shape}")
    if ref.ndim != 2 or ref.size == 0:
        raise ValueError(f"logits must be a non-empty [positions, vocab] array, got shape {ref.shape}")
    T, V = ref.shape
    k = min(TOP_K, V)
    block = max(1, _BLOCK_ELEMENTS // V)

    row_diff = np.empty(T)  # max |A - B| of each row
    row_diff_at = np.empty(T, dtype=np.int64)  # its token id
    top1_a = np.empty(T, dtype=np.int64)
    top1_b = np.empty(T, dtype=np.int64)
    overlap = np.empty(T)  # |topk(A) & topk(B)| per row
    kl = np.empty(T)  # KL(softmax A || softmax B) per row
    nmse = np.empty(T)  # sum (A - B)^2 / sum (A - mean A)^2 per row
    max_ref = 0.0
    nonfinite_ref = nonfinite_other = 0
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf inputs propagate and fail the report
        for r0 in range(0, T, block):
            a = np.asarray(ref[r0 : r0 + block], dtype=np.float64)  # [n, V]
            b = np.asarray(other[r0 : r0 + block], dtype=np.float64)  # [n, V]
            rows = slice(r0, r0 + len(a))
            nonfinite_ref += int((~np.isfinite(a)).sum())
            nonfinite_other += int((~np.isfinite(b)).sum())
            max_ref = max(max_ref, float(np.abs(a).max()))
            diff = np.abs(a - b)  # [n, V]
            row_diff_at[rows] = diff.argmax(axis=-1)
            row_diff[rows] = diff.max(axis=-1)
            top1_a[rows], top1_b[rows] = a.argmax(axis=-1), b.argmax(axis=-1)
            ta, tb = _top_k(a, k), _top_k(b, k)  # [n, k] each
            overlap[rows] = (ta[:, :, None] == tb[:, None, :]).sum(axis=(1, 2))
            log_a, log_b = log_softmax(a), log_softmax(b)  # [n, V] each
            kl[rows] = (np.exp(log_a) * (log_a - log_b)).sum(axis=-1)
            spread = ((a - a.mean(axis=-1, keepdims=True)) ** 2).sum(axis=-1)  # [n]
            with np.errstate(divide="ignore"):  # a constant row of A: 0 when B equals it, else inf
                nmse[rows] = np.where(spread > 0, (diff**2).sum(axis=-1) / np.where(spread > 0, spread, 1),
                                      np.where(diff.max(axis=-1) > 0, np.inf, 0.0))

    at = np.arange(T) if row_positions is None else np.asarray(row_positions)  # [T] position of each row
    scale = max(1.0, max_ref)
    tolerance = atol + rtol * scale
    worst = int(np.argmax(row_diff))  # NaN, if any, wins: that row is reported
    agree = top1_a == top1_b  # [T]
    flips = []
    for row in np.flatnonzero(~agree):
        ta, tb = int(top1_a[row]), int(top1_b[row])
        margin = float(ref[row, ta]) - float(ref[row, tb])
        # each of the two logits may move by the tolerance, so a flip within it needs a margin of at most twice that
        flips.append(Flip(int(at[row]), ta, tb, margin, bool(margin <= 2 * tolerance)))
    return LogitReport(
        positions=T,
        vocab_size=V,
        rtol=float(rtol),
        atol=float(atol),
        max_abs_ref=max_ref,
        tolerance=tolerance,
        max_abs_diff=float(row_diff[worst]),
        max_abs_diff_at=(int(at[worst]), int(row_diff_at[worst])),
        max_rel_diff=float(row_diff[worst]) / scale,
        argmax_agree=int(agree.sum()),
        flips=tuple(flips),
        top5_overlap=float(overlap.mean() / k),
        kl_max=float(kl.max()),
        kl_max_at=int(at[np.argmax(kl)]),
        kl_mean=float(kl.mean()),
        nmse_max=float(nmse.max()),
        nmse_max_at=int(at[np.argmax(nmse)]),
        nmse_mean=float(nmse.mean()),
        nonfinite_ref=nonfinite_ref,
        nonfinite_other=nonfinite_other,
    )


def assert_logits_close(
    ref: np.ndarray, other: np.ndarray, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
    accept: str = "exact", drift: verdict.DriftThresholds = verdict.DEFAULT_DRIFT,
) -> LogitReport:
    """For other projects' test suites: raise AssertionError with the full report unless the verdict on B is
    at least as good as `accept` ("exact", or "drift" for a bf16 engine or a 16-bit KV cache).

    Returns the report when it passes, so a caller can log or check more.
    """
    if accept not in verdict.ACCEPT_CHOICES:
        raise ValueError(f"accept must be one of {verdict.ACCEPT_CHOICES}, got {accept!r}")
    try:
        report = compare_logits(ref, other, rtol=rtol, atol=atol)
    except ValueError as exc:
        raise AssertionError(str(exc)) from None
    judged = verdict.judge(report, drift)
    if not judged.accepted(verdict.Grade[accept.upper()]):
        raise AssertionError("logits differ from the reference:\n" + report.describe() + "\n" + judged.describe())
    return report


# ---------------------------------------------------------------------------------------------------
# Logit files: the .npz that `qwen-ref logits` writes, or a .safetensors file with the same names.

# safetensors dtypes a logits file may use; BF16 is read as raw 16-bit words (see weights.py).
_FILE_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a logits .safetensors file, bf16 widened to float32.

    A `tokens` tensor saved by PyTorch is I64, so logit files get a wider dtype table than checkpoints.
    """
    tensors = read_safetensors(path, _FILE_DTYPES)
    return {name: to_float32(t) if t.dtype == np.uint16 else t for name, t in tensors.items()}


@dataclass(frozen=True)
class LogitsFile:
    tokens: np.ndarray | None  # int64 [T], the prompt; None when the file has none
    positions: np.ndarray | None  # int64 [P], strictly increasing; None when absent: the rows are positions 0..P-1
    logits: np.ndarray  # [P, V] as stored, bf16 widened to float32

    def held_positions(self) -> np.ndarray:
        """int64 [P]: the prompt position of each row."""
        return np.arange(len(self.logits)) if self.positions is None else self.positions


def load_logits_file(path: Path) -> LogitsFile:
    """The arrays `tokens` (optional), `positions` (optional) and `logits` of an .npz or .safetensors file, checked."""
    path = Path(path)
    if not path.is_file():
        raise QwenRefError(f"{path}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        elif path.suffix == ".safetensors":
            arrays = _read_safetensors(path)
        else:
            raise QwenRefError(f"{path}: want a .npz or .safetensors file of logits")
    except (OSError, ValueError, EOFError) as exc:  # a corrupt zip or an array stored as a pickle
        raise QwenRefError(f"{path}: not a readable {path.suffix} file ({exc})") from None

    if "logits" not in arrays:
        raise QwenRefError(f"{path}: no 'logits' array (it has: {', '.join(sorted(arrays)) or 'nothing'})")
    logits = arrays["logits"]
    if logits.ndim != 2 or logits.size == 0:
        raise QwenRefError(f"{path}: 'logits' must be a non-empty [positions, vocab] array, not {list(logits.shape)}")
    if logits.dtype.kind != "f":
        raise QwenRefError(f"{path}: 'logits' has dtype {logits.dtype}, want a float type")

    positions = arrays.get("positions")
    if positions is not None:
        if positions.dtype.kind not in "iu" or positions.shape != (len(logits),):
            raise QwenRefError(
                f"{path}: 'positions' must be integers of shape [{len(logits)}] to match 'logits', "
                f"got {positions.dtype} {list(positions.shape)}"
            )
        positions = positions.astype(np.int64)
        if positions[0] < 0 or np.any(np.diff(positions) <= 0):
            raise QwenRefError(f"{path}: 'positions' must be non-negative and strictly increasing")

    tokens = arrays.get("tokens")
    if tokens is not None:
        if positions is None and (tokens.dtype.kind not in "iu" or tokens.shape != (len(logits),)):
            raise QwenRefError(
                f"{path}: 'tokens' must be integers of shape [{len(logits)}] to match 'logits', "
                f"got {tokens.dtype} {list(tokens.shape)}"
            )
        if positions is not None and (tokens.dtype.kind not in "iu" or tokens.ndim != 1
                                      or positions[-1] >= len(tokens)):
            raise QwenRefError(
                f"{path}: 'tokens' must be integers [T] with T > {positions[-1]}, the last of 'positions', "
                f"got {tokens.dtype} {list(tokens.shape)}"
            )
        tokens = tokens.astype(np.int64)
    return LogitsFile(tokens, positions, logits)


def check_same_input(path_a: Path, tokens_a: np.ndarray | None, path_b: Path, tokens_b: np.ndarray | None) -> bool:
    """Raise if the two files were computed from different tokens; False when it cannot be checked."""
    if tokens_a is None or tokens_b is None:
        return False
    if len(tokens_a) != len(tokens_b):
        raise QwenRefError(f"{path_a} has {len(tokens_a)} tokens, {path_b} has {len(tokens_b)}")
    differ = np.flatnonzero(tokens_a != tokens_b)
    if len(differ):
        t = int(differ[0])
        raise QwenRefError(f"tokens differ at position {t}: {path_a} has {tokens_a[t]}, {path_b} has {tokens_b[t]}")
    return True


def line_up(path_a: Path, a: LogitsFile, path_b: Path, b: LogitsFile) -> tuple[slice | np.ndarray, slice | np.ndarray,
                                                                               np.ndarray]:
    """(rows of A, rows of B, their positions [n]): the positions both files hold, when one holds all of the
    other's; raise otherwise. Two files without `positions` must have the same shape, as before positions existed."""
    if a.logits.shape[1] != b.logits.shape[1] or (a.positions is None and b.positions is None
                                                   and a.logits.shape != b.logits.shape):
        raise QwenRefError(
            f"logit shapes differ: {path_a} has {list(a.logits.shape)}, {path_b} has {list(b.logits.shape)}"
        )
    held_a, held_b = a.held_positions(), b.held_positions()
    common = np.intersect1d(held_a, held_b)  # [n] sorted
    if len(common) < min(len(held_a), len(held_b)):
        raise QwenRefError(f"{path_a} holds the logits of {_span(held_a)}, {path_b} of {_span(held_b)}: "
                           "neither holds every position of the other")
    return _rows(held_a, common), _rows(held_b, common), common


def _rows(held: np.ndarray, wanted: np.ndarray) -> slice | np.ndarray:
    """Indices of `wanted` positions among `held` (both sorted); a slice when they are consecutive rows,
    so that comparing whole files never copies their logits."""
    rows = np.searchsorted(held, wanted)  # [n]
    return slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] + 1 == len(rows) else rows


def _span(positions: np.ndarray) -> str:
    first, last = int(positions[0]), int(positions[-1])
    if last - first + 1 == len(positions):
        return f"positions {first}..{last}"
    return f"{len(positions)} positions from {first} to {last}"


# ---------------------------------------------------------------------------------------------------
# `qwen-ref compare A B` and `qwen-ref compare --incremental`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `qwen-ref compare`."""
    parser.description = (
        "Judge logits B against reference logits A, given as two files (A B: each an .npz as `qwen-ref logits` "
        "writes, or a .safetensors file with the same names: 'logits' float [P, V] required; 'tokens' integer "
        "[T] optional and compared when both files have it; 'positions' integer [P] optional, the 0-based "
        "prompt position of each row, else rows are positions 0..P-1; row t predicts token t+1), compared on "
        "the positions both hold, which must be all of one file's; or with --incremental, a checkpoint's "
        "prompt run in one batched forward (A) and one token at a time through the KV cache (B). "
        + verdict.RULES + " Every argmax flip is listed with A's margin between the two tokens; a near-tie "
        "(margin <= 2 x tolerance) is one that differences within the tolerance can cause. "
        "Exit 0 when the verdict is at least as good as --accept, 1 otherwise, 2 on unusable input."
    )
    parser.add_argument("reference", type=Path, nargs="?", help="A: the reference logits (.npz or .safetensors)")
    parser.add_argument("other", type=Path, nargs="?", help="B: the logits under test (.npz or .safetensors)")
    incremental.add_arguments(parser.add_argument_group("--incremental: batched against token-by-token"))
    judging = parser.add_argument_group("the verdict")
    judging.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                         help="EXACT: tolerance relative to max(1, max|A|) (default: %(default)g)")
    judging.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                         help="EXACT: absolute tolerance added to it (default: %(default)g)")
    judging.add_argument("--drift-nmse", type=float, default=verdict.DRIFT_NMSE, metavar="X",
                         help="DRIFT: largest mean over positions of sum (A-B)^2 / sum (A - mean A)^2 "
                              "(default: %(default)g)")
    judging.add_argument("--drift-kl", type=float, default=verdict.DRIFT_KL, metavar="NATS",
                         help="DRIFT: largest KL(A || B) at any position (default: %(default)g)")
    judging.add_argument("--drift-top5", type=float, default=verdict.DRIFT_TOP5, metavar="F",
                         help="DRIFT: smallest mean top-5 overlap (default: %(default)g)")
    judging.add_argument("--accept", choices=verdict.ACCEPT_CHOICES, default="exact",
                         help="the worst verdict that exits 0; " + verdict.HINT + " (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: the verdict, every criterion (value, threshold, passed), "
                             "every statistic and every flip")
    # two trace files instead of logits: the trace diff's own options (qwen_ref.trace_compare)
    trace_compare.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """`qwen-ref compare`: 0 when the verdict is accepted, 1 when not (2 comes from QwenRefError)."""
    # two trace files go to the trace diff (qwen_ref.trace_compare), a trace and a logits file are refused there
    if args.reference is not None and args.other is not None and not args.incremental:
        if (code := trace_compare.run_if_traces(args, _logit_options(args))) is not None:
            return code
    elif args.max_nmse is not None or args.plot is not None:
        raise QwenRefError("--max-nmse and --plot apply to two trace files")
    thresholds = (args.rtol, args.atol, args.drift_nmse, args.drift_kl, args.drift_top5)
    if not all(value >= 0 for value in thresholds):  # also refuses NaN
        raise QwenRefError("--rtol, --atol and the --drift-* thresholds must be non-negative")
    if ((args.reference is not None) == args.incremental or (args.other is None) != (args.reference is None)
            or (not args.incremental and incremental.given(args))):
        raise QwenRefError("give exactly one of: two logit files A B, or --incremental --model DIR with a prompt")
    if args.incremental:
        out, positions, ref, other = incremental.run(args)
    else:
        out, positions, ref, other = _files(args)
    report = compare_logits(ref, other, rtol=args.rtol, atol=args.atol, row_positions=positions)
    judged = verdict.judge(report, verdict.DriftThresholds(args.drift_nmse, args.drift_kl, args.drift_top5))
    accept = verdict.Grade[args.accept.upper()]
    if args.json:
        print(json.dumps(out | {"compared_positions": positions.tolist()} | report.to_dict() | judged.to_dict()
                         | {"accept": accept.name, "accepted": judged.accepted(accept)}))
    else:
        print(f"A (reference)      {out['reference']}\nB                  {out['other']}")
        print(f"compared           {_span(positions)}")
        print(report.describe())
        print(judged.describe())
    return 0 if judged.accepted(accept) else 1


def _logit_options(args: argparse.Namespace) -> list[str]:
    """The options of the logits verdict that the user set to other than their defaults."""
    defaults = {"--rtol": DEFAULT_RTOL, "--atol": DEFAULT_ATOL, "--drift-nmse": verdict.DRIFT_NMSE,
                "--drift-kl": verdict.DRIFT_KL, "--drift-top5": verdict.DRIFT_TOP5, "--accept": "exact"}
    given = [flag for flag, default in defaults.items() if getattr(args, flag[2:].replace("-", "_")) != default]
    return given + (["--model and a prompt"] if incremental.given(args) else [])


def _files(args: argparse.Namespace) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """A B mode: what the output names, the positions compared [n], and A's and B's logits there [n, V]."""
    a, b = load_logits_file(args.reference), load_logits_file(args.other)
    tokens_checked = check_same_input(args.reference, a.tokens, args.other, b.tokens)
    if not tokens_checked:
        missing = args.reference if a.tokens is None else args.other
        print(f"note: {missing} has no 'tokens' array; the inputs were not checked to be the same", file=sys.stderr)
    rows_a, rows_b, positions = line_up(args.reference, a, args.other, b)
    if len(positions) < max(len(a.logits), len(b.logits)):
        print(f"note: comparing the {len(positions)} positions both files hold ({_span(positions)})", file=sys.stderr)
    out = {"reference": str(args.reference), "other": str(args.other), "tokens_checked": tokens_checked}
    return out, positions, a.logits[rows_a], b.logits[rows_b]
