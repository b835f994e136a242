"""Log-likelihood of continuations given a context: the primitive of multiple-choice benchmarks.

For a context c (n tokens) and a continuation x (m tokens), the model reads c followed by x[:-1];
the logits at the position of c[-1] predict x[0], and those at the position of x[j-1] predict x[j]
(positions are defined once: the logits at t predict token t+1). So

    log p(x | c) = sum over j of log softmax(logits at position n - 1 + j)[x[j]]

and the model reads n + m - 1 tokens: the last continuation token is predicted, never read.
x is greedy when every x[j] is the argmax of its row (lm-eval's `is_greedy`).

Text is split as lm-evaluation-harness splits it (`TemplateLM._encode_pair`): whitespace at the
end of the context moves to the front of the continuation; the context is tokenized alone, the
context and continuation together, and the continuation's tokens are whatever the whole has past
the context's token count. Byte-level BPE then sees " Paris" as a word, as in training text.

Several continuations of one context share its keys and values: `PrefixCache` holds c[:-1] and each
continuation runs [c[-1], *x[:-1]] from there, then the cache is cut back. Consecutive contexts
share the longest common prefix of their tokens too (few-shot prompts share their examples).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qwen_ref.backends import get_backend
from qwen_ref.config import load_config
from qwen_ref.errors import QwenRefError
from qwen_ref.generation import PREFILL_CHUNK, prefill
from qwen_ref.model import ALL_ROWS, NO_ROWS, QwenModel, load_model
from qwen_ref.options import (
    add_kv_dtype_option,
    add_prefill_options,
    add_run_options,
    layer_major,
)
from qwen_ref.perplexity import SCORE_CHUNK, target_log_probs
from qwen_ref.prompt import json_object, read_text
from qwen_ref.tokenizer import Tokenizer


def split_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-evaluation-harness splits them (module docstring)."""
    kept = context.rstrip()
    context, continuation = kept, context[len(kept):] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def positions_read(context: Sequence[int], continuation: Sequence[int]) -> int:
    """Tokens the model reads to score `continuation` after `context`: all but the last continuation token."""
    return len(context) + len(continuation) - 1


class PrefixCache:
    """A KV cache together with the tokens it holds, so the next prefix reuses what it shares with them."""

    def __init__(self, model: QwenModel, capacity: int, chunk: int = PREFILL_CHUNK):
        self.model = model
        self.cache = model.new_cache(capacity)
        self.tokens: list[int] = []
        self.chunk = chunk

    def hold(self, tokens: Sequence[int]) -> int:
        """Make the cache hold exactly `tokens`; return how many had to be computed."""
        tokens = list(tokens)
        shared = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            shared += 1
        self.cache.truncate(shared)
        if len(tokens) > shared:
            prefill(self.model, tokens[shared:], self.cache, NO_ROWS, self.chunk)
        self.tokens = tokens
        return len(tokens) - shared


@dataclass(frozen=True)
class Scored:
    """One continuation's score."""

    tokens: list[int]
    logprobs: np.ndarray  # [m] float64: log p(tokens[j] | context, tokens[:j])
    greedy: bool  # every token was the argmax of its row

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())


def score_continuations(
    prefix: PrefixCache, context: Sequence[int], continuations: Sequence[Sequence[int]]
) -> list[Scored]:
    """log p(x | context) per token for each continuation x, the context's keys and values computed once.

    Each continuation feeds [context[-1], *x[:-1]]: row j of its logits predicts x[j]. The logits
    come SCORE_CHUNK rows at a time, so a long continuation (a rolling window) never holds [m, V].
    """
    if not context:
        raise QwenRefError("the context is empty: the first continuation token needs a token before it")
    prefix.hold(context[:-1])
    base = len(context) - 1
    results = []
    for continuation in continuations:
        targets = np.asarray(continuation, dtype=np.int64)  # [m]
        if len(targets) == 0:
            raise QwenRefError("a continuation is empty")
        fed = np.concatenate([[context[-1]], targets[:-1]])  # [m]
        logprobs, greedy = np.empty(len(targets)), True  # [m]
        for start in range(0, len(fed), SCORE_CHUNK):
            stop = min(start + SCORE_CHUNK, len(fed))
            logits = prefill(prefix.model, fed[start:stop], prefix.cache, ALL_ROWS, prefix.chunk)  # [n, V]
            logprobs[start:stop] = target_log_probs(logits, targets[start:stop])
            greedy = greedy and bool(np.array_equal(logits.argmax(axis=-1), targets[start:stop]))
        prefix.cache.truncate(base)
        results.append(Scored(targets.tolist(), logprobs, greedy))
    return results


# ---------------------------------------------------------------------------------------------------
# `qwen-ref score --model DIR FILE.jsonl`


@dataclass(frozen=True)
class Line:
    """One JSONL line, tokenized: the texts are kept for the per-character and per-byte normalisations."""

    number: int  # 1-based, in the file
    context: list[int]
    continuations: list[list[int]]
    texts: list[str] | None  # the continuations as written; None for a line of token ids


def _token_list(value: object, where: str, vocab: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise QwenRefError(f"{where} must be a list of token ids")
    bad = [t for t in value if not 0 <= t < vocab]
    if bad:
        raise QwenRefError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return value


def parse_line(number: int, text: str, tokenizer: Tokenizer | None, vocab: int, context_size: int) -> Line:
    """One line of the input file as token ids, or one error naming the line."""
    where = f"line {number}"
    item = json_object(text, where)
    if "context" in item or "continuations" in item:
        context, continuations = item.get("context"), item.get("continuations")
        if not isinstance(context, str) or not isinstance(continuations, list) or not continuations \
                or not all(isinstance(c, str) for c in continuations):
            raise QwenRefError(f'{where}: want {{"context": text, "continuations": [text, ...]}} (a non-empty list)')
        if tokenizer is None:
            raise QwenRefError(f"{where}: text needs the checkpoint's tokenizer.json, which it does not have "
                               "(give context_tokens and continuations_tokens)")
        if not context:
            raise QwenRefError(f"{where}: the context is empty (the first continuation token needs a token before "
                               "it; lm-eval puts the end-of-text token there: write it as the context)")
        for i, c in enumerate(continuations):
            if not c:
                raise QwenRefError(f"{where}: continuation {i} is empty")
        pairs = [split_pair(tokenizer, context, c) for c in continuations]
        context_ids, ids, texts = pairs[0][0], [p[1] for p in pairs], continuations
    elif "context_tokens" in item or "continuations_tokens" in item:
        context_ids = _token_list(item.get("context_tokens"), f"{where}: context_tokens", vocab)
        conts = item.get("continuations_tokens")
        if not isinstance(conts, list) or not conts:
            raise QwenRefError(f"{where}: continuations_tokens must be a non-empty list of lists of token ids")
        ids = [_token_list(c, f"{where}: continuations_tokens[{i}]", vocab) for i, c in enumerate(conts)]
        texts = None
        if not context_ids:
            raise QwenRefError(f"{where}: context_tokens is empty (the first continuation token needs a token "
                               "before it)")
    else:
        raise QwenRefError(f'{where}: want "context" and "continuations", or "context_tokens" and '
                           '"continuations_tokens"')
    for i, c in enumerate(ids):
        if not c:
            raise QwenRefError(f"{where}: continuation {i} is empty")
        if positions_read(context_ids, c) > context_size:
            raise QwenRefError(f"{where}: context ({len(context_ids)} tokens) + continuation {i} ({len(c)} tokens) "
                               f"makes the model read {positions_read(context_ids, c)} tokens, more than its context "
                               f"of {context_size}")
    return Line(number, context_ids, ids, texts)


def _best(values: list[float | None]) -> int | None:
    """Index of the highest value (the first on ties, as np.argmax); None when any is missing."""
    return None if any(v is None for v in values) else int(np.argmax(values))


def line_result(line: Line, scores: list[Scored]) -> dict:
    """What `score` reports for one line: per continuation, then the choices each ranking picks."""
    continuations = []
    for i, s in enumerate(scores):
        text = None if line.texts is None else line.texts[i]
        continuations.append({
            "tokens": s.tokens, "logprobs": s.logprobs.tolist(), "sum": s.total, "greedy": s.greedy,
            "per_token": s.total / len(s.tokens),
            "per_char": None if text is None else s.total / len(text),
            "per_byte": None if text is None else s.total / len(text.encode("utf-8")),
        })
    return {
        "line": line.number, "context_tokens": len(line.context), "continuations": continuations,
        **{f"best{suffix}": _best([c[key] for c in continuations])
           for key, suffix in (("sum", ""), ("per_token", "_per_token"), ("per_char", "_per_char"),
                               ("per_byte", "_per_byte"))},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `qwen-ref score`."""
    parser.description = (
        'Log-likelihood of continuations given a context, one JSONL line each: {"context": text, "continuations": '
        '[text, ...]} or {"context_tokens": [ids], "continuations_tokens": [[ids], ...]}. Text is split as '
        "lm-evaluation-harness splits it (trailing whitespace of the context moves to the continuation). Reports "
        "each continuation's summed and per-token log-probabilities and whether it is the greedy one, and the "
        "choice with the highest sum, sum per token, per character (lm-eval's acc_norm) and per UTF-8 byte "
        "(lm-eval's acc_bytes). The context is computed once per line, shared prefixes once across lines."
    )
    parser.add_argument("file", type=Path, help="JSONL file, one object per line (blank lines are skipped); - reads "
                        "standard input")
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json, *.safetensors; "
                        "tokenizer.json for text lines)")
    add_run_options(parser)
    add_kv_dtype_option(parser)
    add_prefill_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per line (JSONL) with every "
                        "per-token log-probability")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    lines = [(i + 1, text) for i, text in enumerate(read_text(path).splitlines()) if text.strip()]
    if not lines:
        raise QwenRefError(f"{path} has no lines")
    return lines


def _summary(result: dict) -> str:
    """A human-readable block for one line."""
    def best(key: str) -> str:
        return "-" if result[key] is None else str(result[key])

    head = (f"line {result['line']}: best {best('best')} by sum, {best('best_per_token')} per token, "
            f"{best('best_per_char')} per char, {best('best_per_byte')} per byte")
    out = [head]
    for i, c in enumerate(result["continuations"]):
        out.append(f"  {i}: sum {c['sum']:.6f}  tokens {len(c['tokens'])}  per token {c['per_token']:.6f}  "
                   f"greedy {'yes' if c['greedy'] else 'no'}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """`qwen-ref score`: every line is checked before the model loads; results on stdout line by line."""
    config = load_config(args.model)
    tokenizer = Tokenizer.from_model_dir(args.model)
    lines = [parse_line(n, text, tokenizer, config.vocab_size, config.max_position_embeddings)
             for n, text in _read_lines(args.file)]
    model = load_model(args.model, get_backend(args.backend), kv_dtype=args.kv_dtype, layer_major=layer_major(args))
    capacity = max(positions_read(line.context, c) for line in lines for c in line.continuations)
    prefix = PrefixCache(model, capacity, args.prefill_chunk)
    for line in tqdm(lines, desc="score", unit="line", file=sys.stderr, leave=False,
                     disable=args.quiet or len(lines) < 2):
        result = line_result(line, score_continuations(prefix, line.context, line.continuations))
        print(json.dumps(result) if args.json else _summary(result), flush=True)
    return 0
