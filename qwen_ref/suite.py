"""`qwen-ref suite make` and `qwen-ref suite check`: a reference suite of many prompts, and another
engine's log-probabilities judged against it case by case (EXACT / DRIFT / WRONG, qwen_ref.verdict.Grade;
the rules in suite_judge).

make:  prompts.jsonl -> DIR/manifest.json, DIR/cases.jsonl, DIR/case-NNNNN.npz (suite_make, suite_reference)
check: DIR + the engine's JSONL (suite_engine) -> a table, a summary, exit 0 when every case is accepted
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from qwen_ref.errors import QwenRefError
from qwen_ref.options import (
    add_kv_dtype_option,
    add_prefill_options,
    add_run_options,
    layer_major,
    positive_int,
)
from qwen_ref.suite_engine import check_same_cases, check_tokenizer, read_engine_outputs
from qwen_ref.suite_judge import DEFAULT_THRESHOLDS, CaseReport, Thresholds, judge_case
from qwen_ref.suite_make import ModelSpec, make_suite
from qwen_ref.suite_manifest import read_manifest
from qwen_ref.suite_reference import DEFAULT_TOP_K, load_case
from qwen_ref.verdict import ACCEPT_CHOICES, Grade

# Suites judge other engines, which mostly run bf16 weights, 16-bit caches or quantized weights and so
# can never be exact; what a suite exists to catch is a wrong case (a bug). --accept exact asks more
# of a float32 engine.
DEFAULT_ACCEPT = "drift"
_CHECK_DESCRIPTION = (
    "Judges OTHER (JSONL: one {'id', 'tokens', 'top_logprobs': [{token id: logprob}, ...]} line per case, after an "
    "optional {'tokenizer': {...}} line; see qwen_ref/suite_engine.py) against the suite in DIR. A tokenizer or "
    "token-id mismatch is refused (exit 2); without a tokenizer line only the token ids are compared (a warning "
    "says so). Per case: EXACT if max |dlogprob| over the reference's top-K <= atol + rtol * max(1, max |logit|) "
    "(compare's EXACT rule) and top-1 agrees (but near-ties); DRIFT if KL(ref||other) over top-K + tail has mean "
    "and max within --drift-kl-mean and --drift-kl-max nats, top-1 agreement >= --drift-top1 and mean top-K "
    "overlap >= --drift-overlap (looser than compare's DRIFT: quantized engines); WRONG otherwise "
    "(qwen_ref/suite_judge.py). Exit 0 if every case is at least as good as --accept, 1 otherwise."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `make` and `check` subcommands of `qwen-ref suite`."""
    commands = parser.add_subparsers(dest="suite_command", required=True, parser_class=type(parser))
    make = commands.add_parser(
        "make", help="teacher-forced reference log-probabilities of every prompt of a JSONL file",
        description="Each line of PROMPTS is a case: {\"id\": optional, \"text\": ..., \"chat\": true|false} "
                    "(chat: the checkpoint's chat template, one user message, generation prompt added) or "
                    "{\"id\": optional, \"tokens\": [...]}. Writes OUT/manifest.json, OUT/cases.jsonl (the token "
                    "ids) and one OUT/case-NNNNN.npz per case; rerun the same command to resume a killed run.")
    make.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json, *.safetensors)")
    add_run_options(make)
    add_kv_dtype_option(make)
    add_prefill_options(make)
    make.add_argument("prompts", type=Path, help="the cases, one JSON object per line")
    make.add_argument("--out", required=True, type=Path, help="the suite folder (created, or resumed)")
    make.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K,
                      help="tokens kept per position, with the probability mass outside them (default: %(default)s)")
    make.add_argument("--full-logits", action="store_true", help="also keep every logit, float32 [T, V] per case")
    where = make.add_mutually_exclusive_group()
    where.add_argument("--workers", type=positive_int, metavar="N",
                       help="start a local dask cluster of N worker processes, each loading the model once "
                            "(needs the `cluster` extra) (default: run here, no cluster)")
    where.add_argument("--cluster", metavar="ADDRESS",
                       help="run on the dask scheduler at ADDRESS (tcp://host:8786); the workers must see the "
                            "checkpoint and --out at the same paths; start them with --memory-limit 0, as dask counts the mapped "
                            "checkpoint as their memory (default: run here, no cluster)")

    check = commands.add_parser(
        "check", help="judge another engine's log-probabilities against a suite",
        description=_CHECK_DESCRIPTION)
    check.add_argument("suite", type=Path, help="the folder `suite make` wrote")
    check.add_argument("other", type=Path, help="the engine's outputs (JSONL)")
    check.add_argument("--accept", choices=ACCEPT_CHOICES, default=DEFAULT_ACCEPT,
                       help="the worst verdict that passes (default: %(default)s: suites judge engines that run "
                            "16-bit or quantized arithmetic and exist to catch wrong ones)")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    limits = check.add_argument_group("the verdict")
    d = DEFAULT_THRESHOLDS
    limits.add_argument("--rtol", type=float, default=d.rtol,
                        help="EXACT: tolerance relative to max(1, max |logit|), as in compare (default: %(default)g)")
    limits.add_argument("--atol", type=float, default=d.atol,
                        help="EXACT: absolute tolerance added to it (default: %(default)g)")
    limits.add_argument("--drift-kl-mean", type=float, default=d.kl_mean, metavar="NATS",
                        help="DRIFT: largest mean KL(ref || other) of a case (default: %(default)g)")
    limits.add_argument("--drift-kl-max", type=float, default=d.kl_max, metavar="NATS",
                        help="DRIFT: largest KL(ref || other) at any position (default: %(default)g)")
    limits.add_argument("--drift-top1", type=float, default=d.top1, metavar="F",
                        help="DRIFT: smallest fraction of positions whose top-1 agrees (default: %(default)g)")
    limits.add_argument("--drift-overlap", type=float, default=d.overlap, metavar="F",
                        help="DRIFT: smallest mean top-K overlap (default: %(default)g)")


def run(args: argparse.Namespace) -> int:
    return _run_make(args) if args.suite_command == "make" else _run_check(args)


def _run_make(args: argparse.Namespace) -> int:
    spec = ModelSpec(args.model.resolve(), args.backend, args.kv_dtype, layer_major(args), args.threads)
    make_suite(spec, args.prompts, args.out, args.top_k, args.full_logits, args.prefill_chunk,
               workers=args.workers, cluster=args.cluster, quiet=args.quiet)
    return 0


def judge_suite(suite_dir: Path, other: Path, limits: Thresholds = DEFAULT_THRESHOLDS) -> list[CaseReport]:
    """Every case's report, in suite order, after the tokenizer and the token ids were found the same."""
    manifest = read_manifest(suite_dir)
    header, engine = read_engine_outputs(other, manifest["vocab_size"])
    if header is None and manifest["tokenizer"] is not None:
        print(f"warning: {other} states no tokenizer (no first {{\"tokenizer\": ...}} line): the tokenizer metadata "
              "check is skipped, only the token ids are compared", file=sys.stderr)
    check_tokenizer(header, manifest["tokenizer"])
    references = [load_case(suite_dir / case["file"]) for case in manifest["cases"]]
    check_same_cases([(case["id"], tuple(ref["tokens"].tolist())) for case, ref in zip(manifest["cases"], references)],
                     engine, manifest["top_k"])
    return [judge_case(case["id"], ref["top_ids"], ref["top_logprobs"], ref["tail_logprob"], ref["max_abs_logit"],
                       engine[case["id"]].top, limits)
            for case, ref in zip(manifest["cases"], references)]


def _run_check(args: argparse.Namespace) -> int:
    limits = Thresholds(args.rtol, args.atol, args.drift_kl_mean, args.drift_kl_max, args.drift_top1,
                        args.drift_overlap)
    if not all(value >= 0 for value in asdict(limits).values()):  # also refuses NaN
        raise QwenRefError("--rtol, --atol and the --drift-* thresholds must be non-negative")
    reports = judge_suite(args.suite, args.other, limits)
    accept = Grade[args.accept.upper()]
    counts = {g.name: sum(r.verdict == g for r in reports) for g in Grade}
    ok = all(r.verdict <= accept for r in reports)
    if args.json:
        print(json.dumps({"suite": str(args.suite), "other": str(args.other), "accept": accept.name,
                          "thresholds": asdict(limits), "kl_direction": "KL(reference || other), nats",
                          "cases": [r.to_dict() for r in reports], "counts": counts, "ok": ok}))
    else:
        print(_table(reports))
        print(f"{len(reports)} cases: {counts['EXACT']} EXACT, {counts['DRIFT']} DRIFT, {counts['WRONG']} WRONG; "
              f"accept {accept.name}: {'PASS' if ok else 'FAIL'}")
    if not ok and not args.json:
        first = next(r for r in reports if r.verdict > accept)
        print(f"first case worse than {accept.name}: {first.id!r} ({first.verdict.name})", file=sys.stderr)
    return 0 if ok else 1


def _table(reports: list[CaseReport]) -> str:
    width = max(4, *(len(r.id) for r in reports))
    head = (f"{'case':<{width}}  {'verdict':<7}  {'pos':>4}  {'KL max':>9}  {'KL mean':>9}  {'top-1':>9}  "
            f"{'top-K ovl':>9}  {'max|dlogp|':>10}  {'tolerance':>9}")
    lines = [head, "-" * len(head)]
    for r in reports:
        lines.append(f"{r.id:<{width}}  {r.verdict.name:<7}  {r.positions:>4}  {r.kl_max:>9.2e}  {r.kl_mean:>9.2e}  "
                     f"{f'{r.top1_agree}/{r.positions}':>9}  {r.overlap_mean:>9.3f}  {r.max_abs_delta:>10.2e}  {r.tolerance:>9.2e}")
    lines.append("KL is KL(reference || other) in nats over the reference's top-K tokens and one tail bucket")
    return "\n".join(lines)
