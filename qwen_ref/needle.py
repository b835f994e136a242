r"""Needle in a haystack: can the model find one sentence hidden at a given depth of a long prompt?

The prompt of one cell (context C, depth d) is the checkpoint's chat template around one user message:

    head                               <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n
    haystack[:cut]                     filler text, ending a sentence
    needle                             " The access code for the blue greenhouse is 4817-2935."
    haystack[cut:n]                    " Next sentence ..."
    tail                               \n\nQUESTION<|im_end|>\n<|im_start|>assistant\n

built by joining token ids, not by tokenizing one string, so that it is exactly C tokens long and the
needle's position is known to the token: n = C - len(head) - len(needle) - len(tail) haystack tokens
(the haystack text repeated as often as needed, cut off at n, maybe mid-sentence), and `cut` is the
sentence boundary of the haystack (a token ending in . ! or ? before a token starting with a space; or
0, or n) nearest to d% of n. At cut 0 the needle is a paragraph of its own ("...4817-2935.\n\n"),
which may take a token more or fewer than " The access ... 4817-2935.", and n follows. The haystack
is `data/haystack.txt`, prose written for this project (no third-party text; MIT like the rest), or
--haystack FILE.

Two scores per cell:
- exact: the greedy answer (up to --max-new-tokens, stopped early once the answer appears) contains
  the answer string;
- answer log-likelihood: the assistant's reply is forced to be the needle sentence up to and including
  the answer ("The access code for the blue greenhouse is 4817-2935"), and the log-probabilities of the
  answer's tokens are summed: a smooth number that a random model gives too.
The answer tokens and the generated tokens sit at positions C, C+1, ...: at C = max_position_embeddings
they run past it (RoPE is defined at every position); the prompt itself never does.

KV reuse: the prompts of one context differ only from their needle on, so they are run in order of
needle position and each keeps the cache of the one before up to the shallower needle (KVCache.truncate):
the head and haystack[:cut] of the shallowest needle are computed once, and each deeper prompt adds only
what lies after the previous needle.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from qwen_ref.backends import get_backend
from qwen_ref.chat_template import ChatTemplate
from qwen_ref.config import load_config, load_generation_config
from qwen_ref.errors import QwenRefError
from qwen_ref.fingerprint import checkpoint_hash
from qwen_ref.generation import PREFILL_CHUNK, prefill
from qwen_ref.kv_cache import KVCache
from qwen_ref.model import ALL_ROWS, LAST_ROW, QwenModel, load_model
from qwen_ref.options import (
    add_kv_dtype_option,
    add_prefill_options,
    add_run_options,
    layer_major,
    positive_int,
)
from qwen_ref.perplexity import target_log_probs
from qwen_ref.progress import prefill_bar
from qwen_ref.prompt import read_text
from qwen_ref.tokenizer import Tokenizer

NEEDLE = "The access code for the blue greenhouse is 4817-2935."
QUESTION = "What is the access code for the blue greenhouse? Answer with the code from the text above."
ANSWER = "4817-2935"
CONTEXTS = "4096,8192,16384,32768"
DEPTHS = "0,25,50,75,100"
MAX_NEW_TOKENS = 32
RESULTS = "needle.json"
HEATMAP = "needle.png"
_MARKER = "\ue000"  # a private-use character: where the user message goes in the rendered template
_SENTENCE_END = re.compile(r"[.!?][\"')\]\u2019\u201d]*$")


def packaged_haystack() -> str:
    return files("qwen_ref").joinpath("data/haystack.txt").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class NeedlePrompt:
    tokens: list[int]  # [C], the whole prompt through "<|im_start|>assistant\n"
    haystack_start: int  # index of the first haystack token (= len(head))
    haystack_tokens: int  # n: haystack tokens in the prompt, needle excluded
    needle_start: int  # index of the needle's first token
    needle_tokens: int

    @property
    def depth(self) -> float:
        """Where the needle sits: haystack tokens before it, in % of all haystack tokens."""
        return 100.0 * (self.needle_start - self.haystack_start) / self.haystack_tokens


class PromptBuilder:
    """Needle prompts of any context length from one haystack text, needle, question and answer."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, haystack: str, needle: str = NEEDLE,
                 question: str = QUESTION, answer: str = ANSWER):
        if not answer or answer not in needle:
            raise QwenRefError(f"the answer {answer!r} must appear in the needle {needle!r}")
        if not question.strip():
            raise QwenRefError("the question is empty")
        rendered = template.render([{"role": "user", "content": _MARKER}])
        if rendered.count(_MARKER) != 1:
            raise QwenRefError("the chat template does not place the user message once in the prompt")
        head, tail = rendered.split(_MARKER)
        self.tokenizer = tokenizer
        self.head = tokenizer.encode(head)
        self.tail = tokenizer.encode("\n\n" + question + tail)
        self.needle = tokenizer.encode(" " + needle)  # after a sentence, before " Next sentence"
        self.needle_first = tokenizer.encode(needle + "\n\n")  # at depth 0: its own paragraph before the haystack
        self.copy = tokenizer.encode(haystack.strip() + "\n\n")  # repeated to fill the context
        if len(self.copy) < 2:
            raise QwenRefError("the haystack text is empty")
        pieces = [tokenizer.decode([t]) for t in self.copy]
        self.copy_boundaries = [i for i in range(1, len(pieces))
                                if _SENTENCE_END.search(pieces[i - 1]) and pieces[i].startswith(" ")]
        # The forced reply: the needle sentence through the answer, tokenized whole; the answer's tokens
        # are the ones past the longest prefix that decodes within the text before the answer.
        lead = needle[: needle.index(answer)]
        self.reply = tokenizer.encode(lead + answer)
        self.answer_from = max(k for k in range(len(self.reply) + 1)
                               if len(tokenizer.decode(self.reply[:k])) <= len(lead))
        if self.answer_from == len(self.reply):
            raise QwenRefError(f"the answer {answer!r} has no tokens of its own in {needle!r}")
        self.answer = answer

    def fixed_tokens(self) -> int:
        """Tokens of every prompt that are not haystack: template, needle and question (at most)."""
        return len(self.head) + max(len(self.needle), len(self.needle_first)) + len(self.tail)

    def haystack(self, n: int) -> tuple[list[int], list[int]]:
        """The first n haystack tokens, and the sentence boundaries among them (0 and n included)."""
        copies = -(-n // len(self.copy))
        tokens = (self.copy * copies)[:n]
        boundaries = [0] + [j * len(self.copy) + b for j in range(copies) for b in self.copy_boundaries]
        return tokens, sorted({b for b in boundaries if b < n} | {n})

    def build(self, context: int, depth: float) -> NeedlePrompt:
        if context - self.fixed_tokens() < 1:
            raise QwenRefError(f"context {context} leaves no room for the haystack: the template, needle and "
                               f"question take {self.fixed_tokens()} tokens")
        n = context - len(self.head) - len(self.needle) - len(self.tail)
        hay, boundaries = self.haystack(n)
        target = depth / 100 * n
        i = bisect.bisect_left(boundaries, target)
        cut = min(boundaries[max(i - 1, 0) : i + 1], key=lambda b: abs(b - target))  # nearest; ties: earlier
        needle = self.needle
        if cut == 0:
            needle = self.needle_first
            n = context - len(self.head) - len(needle) - len(self.tail)
            hay = self.haystack(n)[0]
        tokens = self.head + hay[:cut] + needle + hay[cut:] + self.tail
        return NeedlePrompt(tokens, len(self.head), n, len(self.head) + cut, len(needle))


# ---------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Cell:
    context: int
    depth: float  # asked, in %
    needle_depth: float  # where the needle sits, in % of the haystack tokens
    needle_token: int  # index of the needle's first token in the prompt
    prompt_tokens: int
    exact: bool  # the greedy answer contains the answer string
    answer_logprobs: list[float]  # log p of each answer token, nats
    generated: str
    reused_tokens: int  # prompt tokens whose keys and values came from the previous prompt
    seconds: float

    @property
    def answer_logprob(self) -> float:
        return float(sum(self.answer_logprobs))


def forced_answer_logprobs(model: QwenModel, cache: KVCache, last_logits: np.ndarray, reply: Sequence[int],
                           answer_from: int) -> np.ndarray:
    """log p(reply[i] | prompt, reply[:i]) for the answer's tokens i >= answer_from [n].

    The reply's keys and values stay in the cache after the prompt's."""
    rows = [last_logits]  # [1, V]: predicts reply[0]
    if len(reply) > 1:
        rows.append(model.forward(np.array(reply[:-1]), cache, ALL_ROWS))  # [R-1, V]: row i predicts reply[i+1]
    logits = np.concatenate(rows)  # [R, V]
    return target_log_probs(logits[answer_from:], np.array(reply[answer_from:]))  # [R - answer_from]


def greedy_answer(model: QwenModel, tokenizer: Tokenizer, cache: KVCache, last_logits: np.ndarray, answer: str,
                  max_new_tokens: int, eos_token_ids: Sequence[int]) -> str:
    """The greedy reply after the prompt in `cache`, until an eos token, `max_new_tokens`, or the answer appears."""
    ids: list[int] = []
    token = int(np.argmax(last_logits[-1]))
    while token not in eos_token_ids:
        ids.append(token)
        if len(ids) == max_new_tokens or answer in tokenizer.decode(ids):
            break
        token = int(np.argmax(model.forward(np.array([token]), cache, LAST_ROW)[-1]))
    return tokenizer.decode(ids)


def run_context(
    model: QwenModel,
    builder: PromptBuilder,
    context: int,
    depths: Sequence[float],
    eos_token_ids: Sequence[int],
    max_new_tokens: int = MAX_NEW_TOKENS,
    reuse: bool = True,
    chunk: int = PREFILL_CHUNK,
    progress: Callable[[int], Callable[[int], object] | None] = lambda n: None,
    on_cell: Callable[[Cell], object] = lambda cell: None,
) -> list[Cell]:
    """Score the needle at each depth in prompts of `context` tokens, shallowest needle first (see KV reuse
    above; reuse=False prefills every prompt from its first token). `progress(n)` gives the callback of a
    prefill of n tokens; `on_cell` gets each cell as it is done."""
    prompts = sorted(((builder.build(context, d), d) for d in depths), key=lambda pd: pd[0].needle_start)
    cache = model.new_cache(context + max(len(builder.reply), max_new_tokens))
    previous: list[int] = []
    cells = []
    for prompt, depth in prompts:
        started = time.perf_counter()
        tokens = prompt.tokens
        shared = 0
        if reuse:
            while shared < min(len(previous), len(tokens) - 1) and previous[shared] == tokens[shared]:
                shared += 1
        cache.truncate(shared)
        last = prefill(model, tokens[shared:], cache, LAST_ROW, chunk, progress(len(tokens) - shared))  # [1, V]
        logprobs = forced_answer_logprobs(model, cache, last, builder.reply, builder.answer_from)
        cache.truncate(len(tokens))
        generated = greedy_answer(model, builder.tokenizer, cache, last, builder.answer, max_new_tokens,
                                  eos_token_ids)
        previous = tokens
        cell = Cell(context, depth, prompt.depth, prompt.needle_start, len(tokens), builder.answer in generated,
                    [float(x) for x in logprobs], generated, shared, time.perf_counter() - started)
        on_cell(cell)
        cells.append(cell)
    return cells


# ---------------------------------------------------------------------------------------------------
# The grid file: settings, then one entry per finished cell, rewritten after each


_DERIVED = "answer_logprob_sum"  # written for readers of the file, not read back


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_done(path: Path, settings: dict) -> dict[tuple[int, float], Cell]:
    """The cells of an earlier run in `path`, refused unless it ran with the same settings."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        theirs = saved["settings"]
        cells = [Cell(**{k: v for k, v in c.items() if k != _DERIVED}) for c in saved["cells"]]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QwenRefError(f"--resume: {path} is not a needle grid ({exc})") from None
    for key in sorted(set(settings) | set(theirs)):
        if theirs.get(key) != settings.get(key):
            raise QwenRefError(f"--resume: {path} was made with other settings ({key}: {theirs.get(key)!r} there, "
                               f"{settings.get(key)!r} here); use another --out")
    return {(c.context, c.depth): c for c in cells}


def save_grid(path: Path, settings: dict, model_dir: Path, contexts: Sequence[int], depths: Sequence[float],
              cells: dict[tuple[int, float], Cell]) -> None:
    """Write the grid as JSON through a temporary file, so an interrupted run leaves the previous one whole."""
    data = {"model": str(model_dir), "settings": settings, "contexts": list(contexts), "depths": list(depths),
            "cells": [{**asdict(c), _DERIVED: c.answer_logprob} for _, c in sorted(cells.items())]}
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise QwenRefError(f"cannot write {path}: {exc.strerror or exc}") from None


def grid(cells: dict[tuple[int, float], Cell], contexts: Sequence[int], depths: Sequence[float],
         score: Callable[[Cell], float]) -> np.ndarray:
    """score(cell) as [depths, contexts], nan where a cell is not done."""
    return np.array([[score(cells[c, d]) if (c, d) in cells else math.nan for c in contexts] for d in depths])


def format_grid(values: np.ndarray, contexts: Sequence[int], depths: Sequence[float], fmt: str) -> str:
    width = max(9, *(len(str(c)) + 1 for c in contexts))
    lines = ["depth %".rjust(8) + "".join(str(c).rjust(width) for c in contexts)]
    for d, row in zip(depths, values):
        lines.append(f"{d:g}".rjust(8) + "".join(("-" if math.isnan(v) else format(v, fmt)).rjust(width) for v in row))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# `qwen-ref needle --model DIR --contexts ... --depths ...`


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants comma-separated token counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"wants comma-separated positive token counts, got {text!r}")
    return list(dict.fromkeys(values))


def _depth_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants comma-separated percentages, got {text!r}") from None
    if not values or not all(0 <= v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"wants percentages from 0 to 100, got {text!r}")
    return list(dict.fromkeys(int(v) if v.is_integer() else v for v in values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `qwen-ref needle`."""
    parser.description = (
        "Needle in a haystack: a needle sentence hidden at each depth of a filler text, in prompts of each context "
        "length (chat template included, exact to the token), then asked for. Each cell scores exact retrieval "
        "(the greedy answer contains --answer) and the log-likelihood of the answer's tokens. The grid goes to "
        f"stdout and, after every cell, to OUT/{RESULTS}; at the end the heat map to OUT/{HEATMAP}."
    )
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json, *.safetensors, "
                        "tokenizer.json, tokenizer_config.json with a chat template)")
    parser.add_argument("--contexts", type=_int_list, default=_int_list(CONTEXTS), metavar="N,N",
                        help=f"prompt lengths in tokens (default: {CONTEXTS})")
    parser.add_argument("--depths", type=_depth_list, default=_depth_list(DEPTHS), metavar="D,D",
                        help=f"needle depths, %% of the haystack tokens before it (default: {DEPTHS})")
    parser.add_argument("--haystack", type=Path, help="UTF-8 filler text, repeated to fill the context (default: "
                        "the packaged qwen_ref/data/haystack.txt, 13 kB of prose)")
    parser.add_argument("--needle", default=NEEDLE, help="(default: %(default)r)")
    parser.add_argument("--question", default=QUESTION, help="(default: %(default)r)")
    parser.add_argument("--answer", default=ANSWER, help="text of the needle the answer must contain (default: "
                        "%(default)r)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=MAX_NEW_TOKENS,
                        help="greedy answer length at most (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("needle-results"),
                        help=f"folder for {RESULTS} and {HEATMAP} (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help=f"keep the cells already in OUT/{RESULTS} (made with "
                        "the same model, haystack, needle, question, answer, --max-new-tokens and --kv-dtype)")
    parser.add_argument("--no-plot", action="store_true", help=f"do not write {HEATMAP} (which needs matplotlib: "
                        "pip install 'qwen-ref[plot]')")
    parser.add_argument("--no-kv-reuse", action="store_true",
                        help="prefill every prompt from its first token (slower; for checking the reuse)")
    add_run_options(parser)
    add_kv_dtype_option(parser)
    add_prefill_options(parser)


def run(args: argparse.Namespace) -> int:
    """`qwen-ref needle`: the grids on stdout; a progress bar per prefill and a line per cell on stderr."""
    config = load_config(args.model)  # settle the arguments before memory-mapping the weights
    for context in args.contexts:
        if context > config.max_position_embeddings:
            raise QwenRefError(f"--contexts {context} exceeds the model's context of "
                               f"{config.max_position_embeddings} tokens (max_position_embeddings)")
    if not args.no_plot:
        from qwen_ref.heatmap import require_matplotlib

        require_matplotlib()
    tokenizer = Tokenizer.from_model_dir(args.model)
    if tokenizer is None:
        raise QwenRefError(f"{args.model}: no tokenizer.json, which the needle prompts need")
    haystack = packaged_haystack() if args.haystack is None else read_text(args.haystack)
    builder = PromptBuilder(tokenizer, ChatTemplate.from_model_dir(args.model), haystack, args.needle,
                            args.question, args.answer)
    for context in args.contexts:
        builder.build(context, 0)  # a context too small for the template, needle and question fails here
    settings = {"checkpoint_sha256": checkpoint_hash(args.model), "haystack_sha256": _sha256(haystack),
                "needle": args.needle, "question": args.question, "answer": args.answer,
                "max_new_tokens": args.max_new_tokens, "kv_dtype": args.kv_dtype}
    path = args.out / RESULTS
    if path.exists() and not args.resume:
        raise QwenRefError(f"{path} exists: pass --resume to continue it, or choose another --out")
    done = load_done(path, settings) if args.resume else {}
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QwenRefError(f"cannot create {args.out}: {exc.strerror or exc}") from None

    model = load_model(args.model, get_backend(args.backend), kv_dtype=args.kv_dtype, layer_major=layer_major(args))
    eos = load_generation_config(args.model, model.config).eos_token_ids

    def finished(cell: Cell) -> None:
        done[cell.context, cell.depth] = cell
        save_grid(path, settings, args.model, args.contexts, args.depths, done)
        if not args.quiet:
            print(f"context {cell.context}, depth {cell.depth:g}%: needle at token {cell.needle_token} "
                  f"({cell.needle_depth:.1f}% of the haystack), exact {int(cell.exact)}, answer log p "
                  f"{cell.answer_logprob:.3f} nats, {cell.prompt_tokens - cell.reused_tokens} tokens prefilled "
                  f"({cell.reused_tokens} reused), {cell.seconds:.1f} s", file=sys.stderr, flush=True)

    for context in args.contexts:
        todo = [d for d in args.depths if (context, d) not in done]
        if todo:
            run_context(model, builder, context, todo, eos, args.max_new_tokens, not args.no_kv_reuse,
                        args.prefill_chunk, lambda n: prefill_bar(n, args.prefill_chunk, args.quiet), finished)
    save_grid(path, settings, args.model, args.contexts, args.depths, done)

    exact = grid(done, args.contexts, args.depths, lambda c: float(c.exact))
    mean_logprob = grid(done, args.contexts, args.depths, lambda c: c.answer_logprob / len(c.answer_logprobs))
    print(f"exact retrieval (the greedy answer contains {args.answer!r}), by context length (columns) and depth:")
    print(format_grid(exact, args.contexts, args.depths, ".0f"))
    print(f"\nlog-likelihood of the answer, mean nats per answer token ({len(builder.reply) - builder.answer_from} "
          "tokens):")
    print(format_grid(mean_logprob, args.contexts, args.depths, ".3f"))
    if not args.no_plot:
        from qwen_ref.heatmap import write_heatmap

        write_heatmap(args.out / HEATMAP, args.model.resolve().name, args.contexts, args.depths, exact, mean_logprob)
    if not args.quiet:
        print(f"wrote {path}" + ("" if args.no_plot else f" and {args.out / HEATMAP}"), file=sys.stderr)
    return 0
