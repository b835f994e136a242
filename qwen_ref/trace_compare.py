"""`qwen-ref compare A B` when A and B are trace files: the options, the checks, the report (`qwen_ref.trace_diff`).

`compare.run` hands two files here first; two traces are diffed, a trace and a logits file are refused,
two logits files go back to the logits verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from qwen_ref.errors import QwenRefError
from qwen_ref.trace import load_trace, parse_key
from qwen_ref.trace_diff import (
    DEFAULT_MAX_NMSE,
    describe,
    diff_traces,
    to_dict,
    token_ids,
)
from qwen_ref.weights import read_safetensors_header

# the trace-only metadata of an engine that prints some values only: such a trace must be B, not A
_PRINTED_ONLY = ("missing_values", "value_decimals")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `qwen-ref compare` takes for two trace files, as their own group."""
    group = parser.add_argument_group(
        "trace files", "When A and B are traces (named intermediates, `qwen-ref trace`), the diff walks the forward "
        "order: NMSE = mean((A-B)^2)/var(A), max |A-B| and cosine per tensor, the NMSE table over layers, and the "
        "first tensor whose NMSE exceeds the threshold while its inputs were within it. Exit 0 when every tensor is "
        "within the threshold, 1 when a culprit is found, 2 on unusable input.")
    group.add_argument("--max-nmse", type=float, metavar="X",
                       help=f"the NMSE threshold (default: {DEFAULT_MAX_NMSE:.0e}, far above float32 rounding "
                            "between correct implementations)")
    group.add_argument("--plot", type=Path, metavar="FILE.png",
                       help="also draw NMSE per layer and name (log scale) to this PNG; needs matplotlib "
                            "(default: no plot)")


def run_if_traces(args: argparse.Namespace, logit_options: list[str]) -> int | None:
    """The trace diff's exit code when A and B are trace files; None when they are logits files (compare.run's).

    `logit_options` are the options of the logits verdict the user set (refused with two traces).
    """
    kinds = {path: _file_kind(path) for path in (args.reference, args.other)}
    if set(kinds.values()) == {"trace", "logits"}:
        trace = next(p for p, k in kinds.items() if k == "trace")
        logits = next(p for p, k in kinds.items() if k == "logits")
        raise QwenRefError(f"{trace} is a trace and {logits} a logits file: compare two traces or two logits files")
    if "trace" not in kinds.values():
        if args.max_nmse is not None or args.plot is not None:
            raise QwenRefError("--max-nmse and --plot apply to trace files, not to logits files")
        return None
    if logit_options:
        raise QwenRefError(f"{', '.join(logit_options)} apply to logits files, not to traces (see --max-nmse)")
    return run(args)


def _file_kind(path: Path) -> str:
    """'logits' for a file with a `logits` array, 'trace' when every name is a trace key, else 'other'
    (which the loader of the other file's kind then refuses with its own message)."""
    if not path.is_file():
        raise QwenRefError(f"{path}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                names = set(npz.files) - {"__metadata__"}
        else:
            names = set(read_safetensors_header(path)) - {"__metadata__"}
    except (OSError, ValueError, EOFError, QwenRefError):
        return "other"
    if "logits" in names:
        return "logits"
    try:
        return "trace" if names and all(parse_key(n) for n in names) else "other"
    except QwenRefError:
        return "other"


def run(args: argparse.Namespace) -> int:
    """0 when every tensor is within the threshold, 1 when a culprit is found (2 comes from QwenRefError)."""
    max_nmse = DEFAULT_MAX_NMSE if args.max_nmse is None else args.max_nmse
    if not max_nmse >= 0:  # also refuses NaN
        raise QwenRefError(f"--max-nmse must be non-negative, got {max_nmse}")
    paths = (args.reference, args.other)
    reference, other = load_trace(args.reference), load_trace(args.other)
    printed_only = [k for k in _PRINTED_ONLY if k in reference.metadata]
    if printed_only:
        raise QwenRefError(f"{paths[0]} holds printed values only ({', '.join(printed_only)} in its metadata): "
                           "give it as B, the trace under test, and a full trace as A")
    tokens_a, tokens_b = token_ids(reference.metadata, paths[0]), token_ids(other.metadata, paths[1])
    if tokens_a is not None and tokens_b is not None and tokens_a != tokens_b:
        t = next((i for i, (x, y) in enumerate(zip(tokens_a, tokens_b)) if x != y), min(len(tokens_a), len(tokens_b)))
        raise QwenRefError(f"the traces are of different prompts: {len(tokens_a)} and {len(tokens_b)} tokens, "
                           f"first different at position {t}")
    hashes = reference.metadata.get("checkpoint_sha256"), other.metadata.get("checkpoint_sha256")
    if None not in hashes and hashes[0] != hashes[1]:
        print(f"note: the traces are of different checkpoints (sha256 {hashes[0][:12]} and {hashes[1][:12]})",
              file=sys.stderr)
    diff = diff_traces(reference, other, max_nmse)
    if not diff.tensors:
        raise QwenRefError(f"{paths[0]} and {paths[1]} hold no tensor in common")
    if args.plot is not None:  # first: a missing matplotlib is an error, not a report followed by one
        from qwen_ref.trace_plot import plot

        plot(diff, args.plot)
    if args.json:
        print(json.dumps(to_dict(diff, reference, other, paths)))
    else:
        print(describe(diff, reference, other, paths))
    return 0 if diff.culprit is None else 1
