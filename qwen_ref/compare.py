"""How close two sets of logits are: qwen-ref's verdict on itself against transformers, and on another
engine against qwen-ref (`qwen-ref compare A B`, `assert_logits_close`).

A is the reference, B the logits under test, both [T, V]; row t is the distribution of token t+1.
Files may hold the logits of some positions only (`qwen-ref logits --last N`): their `positions`
array says which, and the files are compared on the positions both hold. The pass rule, in one place:

    max |A - B| <= atol + rtol * max(1, max |A|)   and   argmax A == argmax B at every position

The tolerance scales with the largest reference logit because float32 rounding error does; the
max(1, .) keeps it meaningful for logits near zero. Every other statistic (relative difference,
top-5 overlap, KL divergence) is reported to help diagnose a failure, not to decide it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qwen_ref import trace_diff
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
class LogitReport:
    """Statistics of B against the reference A; `ok` is the pass rule of the module docstring."""

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
    first_argmax_mismatch: int | None  # earliest position where they do not
    first_mismatch_tokens: tuple[int, int] | None  # (argmax A, argmax B) there
    first_mismatch_margin: float | None  # A[argmax A] - A[argmax B] there: <= 2 * tolerance is a near-tie
    top5_overlap: float  # mean over positions of |top5(A) & top5(B)| / 5 (top-V when V < 5)
    kl_max: float  # max over positions of KL(softmax A || softmax B), nats, float64
    kl_max_at: int
    kl_mean: float
    nonfinite_ref: int  # NaN or infinite values in A
    nonfinite_other: int  # ... and in B; any of either fails the comparison

    @property
    def ok(self) -> bool:
        # `<=` is False for NaN, so a NaN difference fails too
        return (
            self.max_abs_diff <= self.tolerance
            and self.first_argmax_mismatch is None
            and self.nonfinite_ref == 0
            and self.nonfinite_other == 0
        )

    @property
    def argmax_fraction(self) -> float:
        return self.argmax_agree / self.positions

    def summary(self) -> str:
        """One line: the numbers the pass rule looks at."""
        pos, tok = self.max_abs_diff_at
        text = (
            f"max |diff| {self.max_abs_diff:.3g} at position {pos} token {tok} (tolerance {self.tolerance:.3g}), "
            f"argmax agrees at {self.argmax_agree}/{self.positions} positions"
        )
        if self.first_argmax_mismatch is not None:
            text += f", first mismatch at position {self.first_argmax_mismatch}"
        if self.nonfinite_ref or self.nonfinite_other:
            text += f", non-finite values: {self.nonfinite_ref} in reference, {self.nonfinite_other} in other"
        return text

    def describe(self) -> str:
        """Every statistic, one per line, ending with the verdict."""
        pos, tok = self.max_abs_diff_at
        lines = [
            f"positions x vocab  {self.positions} x {self.vocab_size}",
            f"max |A - B|        {self.max_abs_diff:.6g} at position {pos}, token {tok}",
            f"tolerance          {self.tolerance:.6g} = atol {self.atol:g} + rtol {self.rtol:g} "
            f"x max(1, max |A| = {self.max_abs_ref:.6g})",
            f"max relative diff  {self.max_rel_diff:.6g} (max |A - B| / max(1, max |A|))",
            f"top-1 agreement    {self.argmax_agree}/{self.positions} ({100 * self.argmax_fraction:.2f}%)",
        ]
        if self.first_argmax_mismatch is None:
            lines.append("first argmax diff  none")
        else:
            a, b = self.first_mismatch_tokens
            lines.append(
                f"first argmax diff  position {self.first_argmax_mismatch}: A picks {a}, B picks {b}; "
                f"A's margin between them {self.first_mismatch_margin:.6g}"
            )
        lines += [
            f"top-{TOP_K} overlap      {self.top5_overlap:.4f}",
            f"KL(A || B)         max {self.kl_max:.6g} nats at position {self.kl_max_at}, mean {self.kl_mean:.6g}",
        ]
        if self.nonfinite_ref or self.nonfinite_other:
            lines.append(f"non-finite values  {self.nonfinite_ref} in A, {self.nonfinite_other} in B")
        lines.append(f"verdict            {'PASS' if self.ok else 'MISMATCH'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """All fields plus `ok`, JSON-ready: NaN and infinities become null (non-finite counts say why)."""
        out = {
            key: (None if isinstance(value, float) and not np.isfinite(value) else value)
            for key, value in asdict(self).items()
        }
        return out | {"ok": self.ok, "argmax_fraction": self.argmax_fraction}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis of a float64 [n, V] block."""
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
            log_a, log_b = _log_softmax(a), _log_softmax(b)  # [n, V] each
            kl[rows] = (np.exp(log_a) * (log_a - log_b)).sum(axis=-1)

    at = np.arange(T) if row_positions is None else np.asarray(row_positions)  # [T] position of each row
    scale = max(1.0, max_ref)
    worst = int(np.argmax(row_diff))  # NaN, if any, wins: that row is reported
    agree = top1_a == top1_b  # [T]
    mismatches = np.flatnonzero(~agree)
    first = int(mismatches[0]) if len(mismatches) else None
    a_first = None if first is None else ref[first]  # [V]
    return LogitReport(
        positions=T,
        vocab_size=V,
        rtol=float(rtol),
        atol=float(atol),
        max_abs_ref=max_ref,
        tolerance=atol + rtol * scale,
        max_abs_diff=float(row_diff[worst]),
        max_abs_diff_at=(int(at[worst]), int(row_diff_at[worst])),
        max_rel_diff=float(row_diff[worst]) / scale,
        argmax_agree=int(agree.sum()),
        first_argmax_mismatch=None if first is None else int(at[first]),
        first_mismatch_tokens=None if first is None else (int(top1_a[first]), int(top1_b[first])),
        first_mismatch_margin=None if first is None else float(a_first[top1_a[first]]) - float(a_first[top1_b[first]]),
        top5_overlap=float(overlap.mean() / k),
        kl_max=float(kl.max()),
        kl_max_at=int(at[np.argmax(kl)]),
        kl_mean=float(kl.mean()),
        nonfinite_ref=nonfinite_ref,
        nonfinite_other=nonfinite_other,
    )


def assert_logits_close(
    ref: np.ndarray, other: np.ndarray, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL
) -> LogitReport:
    """For other projects' test suites: raise AssertionError with the full report unless B passes.

    Returns the report when it passes, so a caller can log or check more.
    """
    try:
        report = compare_logits(ref, other, rtol=rtol, atol=atol)
    except ValueError as exc:
        raise AssertionError(str(exc)) from None
    if not report.ok:
        raise AssertionError("logits differ from the reference:\n" + report.describe())
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
# `qwen-ref compare A B`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `qwen-ref compare`."""
    parser.description = (
        "Judge logits B against reference logits A (each an .npz as `qwen-ref logits` writes, or a .safetensors "
        "file with the same names: 'logits' float [P, V] required; 'tokens' integer [T] optional and compared "
        "when both files have it; 'positions' integer [P] optional, the prompt position of each row, else rows "
        "are positions 0..P-1). The files are compared on the positions both hold, which must be all of one "
        "file's. PASS iff max|A-B| <= atol + rtol*max(1, max|A|) and argmax A == argmax B at every position. "
        "Exit 0 on pass, 1 on mismatch, 2 on unusable input."
    )
    parser.add_argument("reference", type=Path, help="A: the reference logits (.npz or .safetensors)")
    parser.add_argument("other", type=Path, help="B: the logits under test (.npz or .safetensors)")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                        help="tolerance relative to max(1, max|A|) (default: %(default)g)")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help="absolute tolerance added to it (default: %(default)g)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every statistic")
    # two trace files instead of logits: the trace diff's own options (qwen_ref.trace_diff)
    trace_diff.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """`qwen-ref compare`: 0 when B passes, 1 when it does not (2 comes from QwenRefError)."""
    # two trace files go to the trace diff (qwen_ref.trace_diff), a trace and a logits file are refused there
    if (code := trace_diff.run_if_traces(args)) is not None:
        return code
    if not (args.rtol >= 0 and args.atol >= 0):  # also refuses NaN
        raise QwenRefError(f"--rtol and --atol must be non-negative, got {args.rtol} and {args.atol}")
    a, b = load_logits_file(args.reference), load_logits_file(args.other)
    tokens_checked = check_same_input(args.reference, a.tokens, args.other, b.tokens)
    if not tokens_checked:
        missing = args.reference if a.tokens is None else args.other
        print(f"note: {missing} has no 'tokens' array; the inputs were not checked to be the same", file=sys.stderr)
    rows_a, rows_b, positions = line_up(args.reference, a, args.other, b)
    if len(positions) < max(len(a.logits), len(b.logits)):
        print(f"note: comparing the {len(positions)} positions both files hold ({_span(positions)})", file=sys.stderr)
    report = compare_logits(a.logits[rows_a], b.logits[rows_b], rtol=args.rtol, atol=args.atol,
                            row_positions=positions)
    if args.json:
        out = {"reference": str(args.reference), "other": str(args.other), "tokens_checked": tokens_checked,
               "compared_positions": positions.tolist()}
        print(json.dumps(out | report.to_dict()))
    else:
        print(f"A (reference)      {args.reference}\nB                  {args.other}")
        print(f"compared           {_span(positions)}")
        print(report.describe())
    return 0 if report.ok else 1
