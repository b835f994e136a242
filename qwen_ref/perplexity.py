"""Perplexity of a token sequence with a strided sliding window, as transformers documents it.

The recipe (https://huggingface.co/docs/transformers/perplexity): windows begin at 0, stride,
2*stride, ...; each holds up to `ctx` tokens, ids[begin:end]. Its labels are the tokens not scored
by an earlier window, ids[prev_end:end]; the rest are -100 (ignored). The model shifts the labels
(the logits at position t are scored against token t+1), so a window's first token is never a
target: every window scores tokens max(begin + 1, prev_end) .. end - 1, each against the logits of
the token before it. The loop stops at the first window that reaches the end of the sequence.

    perplexity = exp(sum of -log p(target) / number of targets scored)

With stride < ctx every token but the very first is scored exactly once, each seeing at least
ctx - stride tokens of context; with stride == ctx the windows are disjoint and the first token of
each window goes unscored.

Token counting. `outputs.loss` is the mean over the labels left after the shift, so the exact total
is loss x (number of labels != -100 among positions 1..L-1). The documented loop (docs/source/en/
perplexity.md, as of transformers 5) weights each loss by `num_valid_tokens - batch_size`, i.e. it
always subtracts one label for the shift. That is exact when the whole window is labelled (the first
window, or stride == ctx); in a later window of an overlapping run (stride < ctx) the shift drops only
an ignored label, the loss averages over all trg_len targets, and the documented weight trg_len - 1 is
one short. A one-token last window (stride == ctx) has no target at all; its transformers loss is NaN.
We sum the log-probabilities of exactly the scored targets, which is the exact form
(tests/test_perplexity.py computes the transformers side both ways).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    positive_int,
)
from qwen_ref.progress import prefill_bar
from qwen_ref.prompt import read_text
from qwen_ref.tokenizer import Tokenizer

DEFAULT_CTX = 512  # capped at the model's max_position_embeddings
# Scored positions per forward call: bounds the logits at [SCORE_CHUNK, V] (40 MB for Qwen's 152k vocab).
SCORE_CHUNK = 64


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens[begin:end] go in, tokens[first_target:end] are scored."""

    begin: int
    end: int
    first_target: int  # > begin: the window's first token has no logits before it

    @property
    def targets(self) -> int:
        return self.end - self.first_target


def sliding_windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    """The windows of transformers' recipe for a sequence of n_tokens."""
    if ctx < 2:
        raise QwenRefError(f"--ctx {ctx}: a window needs at least 2 tokens (the first is never scored)")
    if not 1 <= stride <= ctx:
        raise QwenRefError(f"--stride {stride} must be between 1 and --ctx {ctx} (else tokens are skipped)")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        windows.append(Window(begin, end, first_target=max(begin + 1, prev_end)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def target_log_probs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits[i])[targets[i]] for each row, in float64: [n, V], [n] -> [n]."""
    x = logits.astype(np.float64)  # [n, V]
    m = x.max(axis=-1)  # [n]
    picked = x[np.arange(len(x)), targets]  # [n]
    x -= m[:, None]  # in place: with a 152k vocabulary every [n, V] temporary costs time
    np.exp(x, out=x)
    return picked - (m + np.log(x.sum(axis=-1)))  # [n]


def window_nll(
    model: QwenModel,
    tokens: np.ndarray,
    window: Window,
    chunk: int = PREFILL_CHUNK,
    on_chunk: Callable[[int], object] | None = None,
) -> float:
    """Sum of -log p(token t | tokens[begin:t]) over the window's targets t.

    The window's tokens go through the model `chunk` at a time; `on_chunk(n)` follows them (progress).
    """
    if window.targets == 0:  # a one-token last window (stride == ctx): nothing to predict
        return 0.0
    ids = tokens[window.begin : window.end]  # [L]
    scored_from = window.first_target - 1 - window.begin  # index in ids of the first row of logits we need
    cache = model.new_cache(len(ids) - 1)  # the last token predicts past the window: it never goes in
    if scored_from > 0:  # context only: no LM head on rows nobody scores
        prefill(model, ids[:scored_from], cache, NO_ROWS, chunk, on_chunk)
    nll = 0.0
    for start in range(scored_from, len(ids) - 1, SCORE_CHUNK):
        stop = min(start + SCORE_CHUNK, len(ids) - 1)
        # [n, V]: row i predicts ids[start+i+1]
        logits = prefill(model, ids[start:stop], cache, ALL_ROWS, chunk, on_chunk)
        nll -= float(target_log_probs(logits, ids[start + 1 : stop + 1]).sum())
    return nll


@dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float  # nats, summed over the scored tokens
    scored_tokens: int
    tokens: int
    windows: int
    ctx: int
    stride: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.scored_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def perplexity(
    model: QwenModel,
    tokens: Sequence[int],
    ctx: int,
    stride: int,
    on_window: Callable[[int, int, float], object] | None = None,
    chunk: int = PREFILL_CHUNK,
    progress: Callable[[int], Callable[[int], object]] | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of `tokens`; `on_window(i, n_windows, running_ppl)` reports progress.

    Each window runs through the model `chunk` tokens at a time; `progress(n)`, called before a window's
    n tokens go in, returns the callback that follows its chunks (a progress bar).
    """
    tokens = np.asarray(tokens, dtype=np.int64)  # [N]
    if len(tokens) < 2:
        raise QwenRefError(f"perplexity needs at least 2 tokens (the first is never predicted), got {len(tokens)}")
    if ctx > model.config.max_position_embeddings:
        raise QwenRefError(f"--ctx {ctx} exceeds the model's context of {model.config.max_position_embeddings}")
    windows = sliding_windows(len(tokens), ctx, stride)
    nll, scored = 0.0, 0
    for i, window in enumerate(windows):
        on_chunk = None if progress is None else progress(window.end - window.begin - 1)
        nll += window_nll(model, tokens, window, chunk, on_chunk)
        scored += window.targets
        if on_window is not None:
            on_window(i, len(windows), math.exp(nll / scored))
    return PerplexityResult(nll, scored, len(tokens), len(windows), ctx, stride)


# ---------------------------------------------------------------------------------------------------
# `qwen-ref perplexity --model DIR FILE`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `qwen-ref perplexity`."""
    parser.description = (
        "Perplexity of a UTF-8 text file under the model, with transformers' strided sliding window: windows of "
        "--ctx tokens start every --stride tokens and each scores only the tokens no earlier window scored."
    )
    parser.add_argument("file", type=Path, help="UTF-8 text, tokenized with the checkpoint's tokenizer.json; - reads "
                        "standard input")
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json, *.safetensors, "
                        "tokenizer.json)")
    parser.add_argument("--ctx", type=positive_int,
                        help=f"tokens per window (default: {DEFAULT_CTX}, or the model's context if smaller)")
    parser.add_argument("--stride", type=positive_int, help="tokens between window starts (default: ctx // 2)")
    add_run_options(parser)
    add_kv_dtype_option(parser)
    add_prefill_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """`qwen-ref perplexity`: the result on stdout, one progress line per window on stderr."""
    config = load_config(args.model)  # cheap: settle the arguments before memory-mapping the weights
    ctx = args.ctx or min(DEFAULT_CTX, config.max_position_embeddings)
    stride = args.stride or max(1, ctx // 2)
    tokenizer = Tokenizer.from_model_dir(args.model)
    if tokenizer is None:
        raise QwenRefError(f"{args.model}: no tokenizer.json, so {args.file} cannot be tokenized")
    text = read_text(args.file)
    if not text:
        raise QwenRefError(f"{args.file} is empty")
    tokens = tokenizer.encode(text)
    if len(tokens) < 2:
        raise QwenRefError(f"{args.file} is {len(tokens)} token(s); perplexity needs 2 (the first is never predicted)")
    sliding_windows(len(tokens), ctx, stride)  # reject a bad --ctx/--stride before loading the model
    model = load_model(args.model, get_backend(args.backend, args.kernels), kv_dtype=args.kv_dtype, layer_major=layer_major(args))

    def report(i: int, n: int, running: float) -> None:
        if not args.quiet:
            print(f"window {i + 1}/{n}: running perplexity {running:.4f}", file=sys.stderr, flush=True)

    result = perplexity(model, tokens, ctx, stride, on_window=report, chunk=args.prefill_chunk,
                        progress=lambda n: prefill_bar(n, args.prefill_chunk, args.quiet))
    if args.json:
        print(json.dumps({
            "file": str(args.file), "model": str(args.model), "backend": args.backend, "kv_dtype": args.kv_dtype,
            "perplexity": result.perplexity, "mean_nll": result.mean_nll, "nll_sum": result.nll_sum,
            "scored_tokens": result.scored_tokens, "tokens": result.tokens, "windows": result.windows,
            "ctx": result.ctx, "stride": result.stride,
        }))
    else:
        print(
            f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.6f} nats over {result.scored_tokens} "
            f"scored of {result.tokens} tokens; {result.windows} windows, ctx {ctx}, stride {stride})"
        )
    return 0
