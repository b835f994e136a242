"""Where two traces of one prompt part ways: `qwen-ref compare A B` on two trace files (`qwen_ref.trace`).

A is the reference trace, B the trace under test (another backend, another engine). For each tensor
both hold, in float64: NMSE = mean((A-B)^2) / var(A) (both over the whole tensor), max |A-B| with its
full index (position first) and the cosine similarity of the flattened tensors. A constant A has no
scale to measure error against: there NMSE is 0 when B equals it and infinite otherwise.

The first culprit is the earliest tensor in forward order whose NMSE exceeds the threshold. Every
input of a tensor (`trace.input_keys`) comes before it in forward order, so the culprit's inputs
were all within the threshold: the error entered in the one operation between them and it. Inputs
a trace does not hold are replaced by their nearest held ancestors (the report says so).

Missing values: when B's metadata says `"missing_values": "nan"` (an engine that prints some values
of each tensor only), NaN in B means "not printed" and the statistics use the entries B has. Otherwise
every NaN or inf, in A or B, is a real non-finite value and makes the tensor's NMSE infinite.

Printed values: when B's metadata says `"value_decimals": "d"` (llama.cpp's eval-callback prints 4),
each of B's values is off by up to h = 0.5e-d from printing alone, so B's RMS error is at most the
float32 one plus h (the triangle inequality), and a tensor exceeds the threshold only above
(sqrt(max_nmse) + sqrt(h^2 / var(A)))^2 (`TraceDiff.limit`).

"NMSE" here is over a whole tensor; `qwen-ref compare` on logits averages a per-position NMSE instead
(`qwen_ref.verdict`), so result_output's figure differs between the two.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qwen_ref.errors import QwenRefError
from qwen_ref.trace import (
    LAYER_NAMES,
    Trace,
    forward_order,
    input_keys,
    parse_key,
    trace_key,
)

# The default --max-nmse, measured with tools/trace_nmse_floor.py (random GQA models of Qwen's activation
# scale, D 32 with 3 layers and D 256 with 6, 16 and 32 positions): correct float32 implementations summing
# in different orders differ by NMSE at most 1.9e-12 over every tensor (numpy against numba; 1.5e-12 against
# transformers 5.25; the last layer's ffn_out). The subtlest breakage, RMSNorm eps 1e-6 -> 1e-5 in one
# layer, moves that layer's attn_norm by NMSE 4.7e-5 to 6.6e-5, the other breakages by 4.8e-2 and more.
# 1e-8 (a relative RMS error of 1e-4) sits 5000x above that noise, leaving room for deeper and wider
# models, and 4700x below the eps change. That change shrinks as 1/var(x)^2: where a norm's input has
# unit variance it is NMSE ~2e-11, below any threshold the noise allows.
DEFAULT_MAX_NMSE = 1e-8
_BLOCK_ELEMENTS = 2**22  # float64 statistics are taken on blocks of rows of about this size (32 MB)

# The operation that makes each named tensor, in words (Qwen2DecoderLayer.forward, Qwen2Model.forward).
OPERATIONS = {
    "inp_embd": "the embedding lookup (embed_tokens)",
    "attn_norm": "the input RMSNorm (input_layernorm)",
    "Qcur": "q_proj with its bias",
    "Kcur": "k_proj with its bias",
    "Vcur": "v_proj with its bias",
    "Qcur_rope": "RoPE on the queries",
    "Kcur_rope": "RoPE on the keys",
    "kqv_out": "attention over the KV cache",
    "attn_out": "o_proj",
    "ffn_inp": "the first residual sum (x + attn_out)",
    "ffn_norm": "the post-attention RMSNorm (post_attention_layernorm)",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_act": "silu(gate) * up",
    "ffn_out": "down_proj",
    "l_out": "the second residual sum (ffn_inp + ffn_out)",
    "result_norm": "final RMSNorm",
    "result_output": "the LM head (lm_head)",
}
# metadata shown first in the report, in this order; any other keys follow
_METADATA_ORDER = ("source", "qwen_ref_version", "backend", "weights_dtype", "kv_dtype", "checkpoint_sha256",
                   "missing_values", "tokens")


@dataclass(frozen=True)
class TensorDiff:
    """B's tensor against A's, statistics in float64 over the `compared` entries."""

    key: str
    shape: tuple[int, ...]
    compared: int  # entries compared: all of them, unless B leaves some out (missing_values = nan)
    nonfinite: int  # compared entries where A or B is NaN or inf: any makes nmse infinite
    nmse: float  # mean((A-B)^2) / var(A); see the module docstring for var(A) = 0
    print_nmse: float  # h^2 / var(A), what B's printed decimals alone may add (0 for full float32 values)
    max_abs_diff: float
    max_abs_diff_at: tuple[int, ...]  # full index of that difference, position first
    cosine: float | None  # of the flattened tensors; None where values are non-finite


@dataclass(frozen=True)
class Culprit:
    key: str
    operation: str  # OPERATIONS of its name
    inputs: dict[str, float]  # the held tensors standing for its inputs: {key: NMSE}
    walked_back: tuple[str, ...]  # its inputs the traces do not both hold, replaced by their nearest held ancestors


@dataclass(frozen=True)
class TraceDiff:
    tensors: dict[str, TensorDiff]  # the keys both traces hold (with values), in forward order
    only_in_reference: tuple[str, ...]  # in A only, or all NaN in a B with missing values
    only_in_other: tuple[str, ...]
    max_nmse: float
    culprit: Culprit | None  # None when every tensor is within max_nmse

    def limit(self, key: str) -> float:
        """The NMSE above which `key` exceeds the threshold: max_nmse, plus room for B's printed decimals."""
        return (math.sqrt(self.max_nmse) + math.sqrt(self.tensors[key].print_nmse)) ** 2

    def exceeds(self, key: str) -> bool:
        return not self.tensors[key].nmse <= self.limit(key)


# ---------------------------------------------------------------------------------------------------
# Statistics


def tensor_diff(key: str, a: np.ndarray, b: np.ndarray, missing_is_nan: bool = False,
                decimals: int | None = None) -> TensorDiff:
    """The statistics of B's tensor against A's (same shape, [T, ...]); NaN in B is skipped when `missing_is_nan`;
    B's values printed with `decimals` decimals, if given."""
    a, b = np.atleast_1d(a), np.atleast_1d(b)
    rows = max(1, _BLOCK_ELEMENTS // max(1, math.prod(a.shape[1:])))

    def blocks():  # (row offset, A block, B block, mask of compared entries) in float64
        for r0 in range(0, len(a), rows):
            x = np.asarray(a[r0 : r0 + rows], dtype=np.float64)
            y = np.asarray(b[r0 : r0 + rows], dtype=np.float64)
            yield r0, x, y, ~np.isnan(y) if missing_is_nan else np.ones(x.shape, dtype=bool)

    def index(r0: int, flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        at = np.unravel_index(flat, shape)
        return tuple(int(i) + (r0 if axis == 0 else 0) for axis, i in enumerate(at))

    compared, nonfinite, total_a, first_bad = 0, 0, 0.0, None
    for r0, x, y, mask in blocks():
        bad = mask & ~(np.isfinite(x) & np.isfinite(y))
        compared += int(mask.sum())
        nonfinite += int(bad.sum())
        if first_bad is None and bad.any():
            first_bad = index(r0, int(np.argmax(bad)), bad.shape)
        total_a += float(x[mask & ~bad].sum())
    if nonfinite:
        return TensorDiff(key, a.shape, compared, nonfinite, math.inf, 0.0, math.inf, first_bad, None)
    if compared == 0:
        return TensorDiff(key, a.shape, 0, 0, 0.0, 0.0, 0.0, (), None)

    mean_a = total_a / compared
    sse = spread = dot = aa = bb = 0.0  # sums of (A-B)^2, (A-mean A)^2, A*B, A^2, B^2
    worst, worst_at = -1.0, ()
    for r0, x, y, mask in blocks():
        x, y = np.where(mask, x, 0.0), np.where(mask, y, 0.0)  # skipped entries add nothing to any sum
        diff = np.abs(x - y)
        sse += float((diff * diff).sum())
        spread += float((np.where(mask, x - mean_a, 0.0) ** 2).sum())
        dot, aa, bb = dot + float((x * y).sum()), aa + float((x * x).sum()), bb + float((y * y).sum())
        flat = int(np.argmax(diff))
        if diff.flat[flat] > worst:
            worst, worst_at = float(diff.flat[flat]), index(r0, flat, diff.shape)
    h = 0.0 if decimals is None else 0.5 * 10.0**-decimals  # B's print rounding, at most
    if spread > 0:
        nmse = sse / spread  # the two means' 1/n cancel
        print_nmse = h * h * compared / spread
    else:
        nmse = 0.0 if sse == 0 else math.inf
        print_nmse = 0.0
    if aa > 0 and bb > 0:
        cosine = dot / math.sqrt(aa * bb)
    else:
        cosine = 1.0 if aa == bb else 0.0  # both zero: the same vector; one zero: no direction in common
    return TensorDiff(key, a.shape, compared, 0, nmse, print_nmse, worst, worst_at, cosine)


def diff_traces(reference: Trace, other: Trace, max_nmse: float = DEFAULT_MAX_NMSE) -> TraceDiff:
    """Every tensor both traces hold compared, and the first culprit; QwenRefError when shapes differ."""
    missing_is_nan = other.metadata.get("missing_values") == "nan"
    decimals = other.metadata.get("value_decimals")
    if decimals is not None and not decimals.isdigit():
        raise QwenRefError(f"the other trace's value_decimals is {decimals!r}, not a number of decimals")
    decimals = None if decimals is None else int(decimals)
    tensors: dict[str, TensorDiff] = {}
    only_a = [k for k in reference.tensors if k not in other.tensors]
    for key in forward_order(set(reference.tensors) & set(other.tensors)):
        a, b = reference.tensors[key], other.tensors[key]
        if a.shape != b.shape:
            raise QwenRefError(f"tensor {key!r} has shape {list(a.shape)} in the reference, {list(b.shape)} in "
                               "the other trace")
        diff = tensor_diff(key, a, b, missing_is_nan, decimals)
        if diff.compared == 0 and a.size:
            only_a.append(key)  # B printed none of its values
        else:
            tensors[key] = diff
    result = TraceDiff(tensors, tuple(forward_order(only_a)),
                       tuple(forward_order(k for k in other.tensors if k not in reference.tensors)), max_nmse, None)
    culprit = next((key for key in tensors if result.exceeds(key)), None)
    if culprit is None:
        return result
    last_layer = max((layer for key in (*reference.tensors, *other.tensors)
                      if (layer := parse_key(key)[1]) is not None), default=None)
    held, walked = traced_inputs(culprit, set(tensors), last_layer)
    found = Culprit(culprit, OPERATIONS[parse_key(culprit)[0]], {k: tensors[k].nmse for k in held}, walked)
    return TraceDiff(result.tensors, result.only_in_reference, result.only_in_other, max_nmse, found)


def traced_inputs(key: str, held: set[str], last_layer: int | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(held tensors standing for `key`'s inputs, its inputs that are not held): absent inputs are replaced
    by their nearest held ancestors. result_norm's input is the l_out of `last_layer`, the highest layer seen."""
    direct = input_keys(key)
    if key == "result_norm" and last_layer is not None:
        direct = (trace_key("l_out", last_layer),)
    found: list[str] = []
    todo, seen = list(direct), set()
    while todo:
        k = todo.pop(0)
        if k in seen:
            continue
        seen.add(k)
        if k in held:
            found.append(k)
        else:
            todo.extend(input_keys(k))
    return tuple(forward_order(found)), tuple(k for k in direct if k not in held)


# ---------------------------------------------------------------------------------------------------
# Reports


def growth_table(diff: TraceDiff) -> str:
    """NMSE per layer (rows) and name (columns), then the tensors outside the layers; '-' where not compared."""
    layers = sorted({layer for key in diff.tensors if (layer := parse_key(key)[1]) is not None})
    names = [n for n in LAYER_NAMES if any(trace_key(n, i) in diff.tensors for i in layers)]
    widths = [max(len(n), 7) for n in names]
    lines = ["layer " + " ".join(n.rjust(w) for n, w in zip(names, widths))] if names else []
    for i in layers:
        cells = (_nmse_text(diff, trace_key(n, i)).rjust(w) for n, w in zip(names, widths))
        lines.append(f"{i:>5} " + " ".join(cells))
    outside = [f"{key} {_nmse_text(diff, key)}" for key in diff.tensors if parse_key(key)[1] is None]
    if outside:
        lines.append("outside the layers: " + ", ".join(outside))
    return "\n".join(lines)


def _nmse_text(diff: TraceDiff, key: str) -> str:
    if key not in diff.tensors:
        return "-"
    text = f"{diff.tensors[key].nmse:.1e}"
    return text + "*" if key == getattr(diff.culprit, "key", None) else text


def _metadata_text(metadata: dict[str, str]) -> str:
    keys = [k for k in _METADATA_ORDER if k in metadata] + sorted(k for k in metadata if k not in _METADATA_ORDER)
    parts = []
    for k in keys:
        value = metadata[k]
        if k == "tokens":
            ids = token_ids(metadata, "")
            value = f"{len(ids)} ids [{', '.join(map(str, ids[:8]))}{', ...' if len(ids) > 8 else ''}]"
        elif k == "checkpoint_sha256":
            value = value[:12]
        parts.append(f"{k} {value if len(value) <= 60 else value[:57] + '...'}")
    return ", ".join(parts) or "no metadata"


def describe(diff: TraceDiff, reference: Trace, other: Trace, paths: tuple[Path, Path]) -> str:
    """The text report: both traces' metadata, the error-growth table, the first culprit and the verdict."""
    lines = [f"A (reference)  {paths[0]}: {_metadata_text(reference.metadata)}",
             f"B              {paths[1]}: {_metadata_text(other.metadata)}",
             f"compared       {len(diff.tensors)} tensors in both traces"]
    for label, keys in (("only in A", diff.only_in_reference), ("only in B", diff.only_in_other)):
        if keys:
            lines.append(f"{label:<15}{', '.join(keys)}")
    partial = [d for d in diff.tensors.values() if d.compared < math.prod(d.shape)]
    if partial:
        used, size = sum(d.compared for d in partial), sum(math.prod(d.shape) for d in partial)
        lines.append(f"missing values B printed {used} of the {size} values of {len(partial)} tensors; "
                     "their statistics use those only")
    threshold = f"threshold      NMSE <= {diff.max_nmse:.1e} (--max-nmse)"
    if any(d.print_nmse for d in diff.tensors.values()):
        threshold += (", widened to (sqrt(max_nmse) + h/sd(A))^2 for B's values printed with "
                      f"{other.metadata['value_decimals']} decimals (h half a unit in the last one)")
    lines += [threshold, "",
              "NMSE = mean((A-B)^2) / var(A) per tensor (* the first culprit):", growth_table(diff), ""]
    if diff.culprit is None:
        worst = max(diff.tensors.values(), key=lambda d: d.nmse)
        lines += [f"worst tensor   {_tensor_text(worst)}", "verdict        PASS: every tensor within the threshold"]
        return "\n".join(lines)
    c = diff.culprit
    lines.append(f"first culprit  {c.key}: {c.operation}")
    lines.append(f"               {_tensor_text(diff.tensors[c.key])}")
    if c.inputs:
        held = ", ".join(f"{k} {nmse:.1e}" for k, nmse in c.inputs.items())
        lines.append(f"its inputs     {held} (NMSE, all within the threshold)")
    if c.walked_back:
        lines.append(f"               not in both traces: {', '.join(c.walked_back)}; "
                     + ("their nearest traced ancestors stand in" if c.inputs else "no traced ancestor: the error "
                        "may have entered before"))
    if c.walked_back:  # the layers between are not traced: the error may have entered anywhere there
        since = ", ".join(c.inputs) or "the start"
        lines.append(f"verdict        MISMATCH: the error enters after {since} and by {c.key}; trace the "
                     f"missing {', '.join(c.walked_back)} to find the operation")
    else:
        lines.append(f"verdict        MISMATCH: the error enters at {c.key}")
    return "\n".join(lines)


def _tensor_text(d: TensorDiff) -> str:
    text = f"{d.key}: NMSE {d.nmse:.3g}, max |A-B| {d.max_abs_diff:.3g} at {list(d.max_abs_diff_at)}"
    text += f", cosine {d.cosine:.9f}" if d.cosine is not None else f", {d.nonfinite} non-finite values"
    if d.compared < math.prod(d.shape):
        text += f", over the {d.compared} of {math.prod(d.shape)} values B printed"
    return text


def to_dict(diff: TraceDiff, reference: Trace, other: Trace, paths: tuple[Path, Path]) -> dict:
    """Everything of the report as JSON-ready values; non-finite numbers become None (see `nonfinite`)."""

    def finite(x: object) -> object:
        return None if isinstance(x, float) and not math.isfinite(x) else x

    tensors = [{k: finite(v) for k, v in asdict(d).items()} | {"size": math.prod(d.shape)}
               for d in diff.tensors.values()]
    culprit = None if diff.culprit is None else asdict(diff.culprit) | {
        "layer": parse_key(diff.culprit.key)[1], "nmse": finite(diff.tensors[diff.culprit.key].nmse),
        "inputs": {k: finite(v) for k, v in diff.culprit.inputs.items()}}
    return {"reference": str(paths[0]), "other": str(paths[1]),
            "metadata": {"reference": reference.metadata, "other": other.metadata},
            "max_nmse": diff.max_nmse, "ok": diff.culprit is None, "culprit": culprit,
            "only_in_reference": list(diff.only_in_reference), "only_in_other": list(diff.only_in_other),
            "tensors": tensors}


def token_ids(metadata: dict[str, str], path: Path | str) -> list[int] | None:
    """The `tokens` of a trace's metadata (a JSON list of ids), None when absent."""
    if "tokens" not in metadata:
        return None
    try:
        ids = json.loads(metadata["tokens"])
    except ValueError:
        ids = None
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise QwenRefError(f"{path}: metadata 'tokens' is not a JSON list of token ids")
    return ids
