"""`qwen-ref compare --incremental`: a checkpoint's prompt run as one batched forward and one token at a time.

Both runs compute the same function, but not the same float32 sums: the batched run multiplies [T, D]
matrices (GEMM) and attends with all queries at once, the incremental one multiplies one row at a time
(GEMV, on numba the fused one-call decode step), so each dot product is summed in another order. The
two agree to float32 reordering (EXACT; benchmarks/verdict_cases.md has the 0.5B shape's figures),
never bit for bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from qwen_ref.backends import get_backend
from qwen_ref.errors import QwenRefError
from qwen_ref.generation import check_context, incremental_logits, prefill
from qwen_ref.model import ALL_ROWS, load_model
from qwen_ref.options import (
    add_kv_dtype_option,
    add_prefill_options,
    add_run_options,
    layer_major,
)
from qwen_ref.progress import prefill_bar
from qwen_ref.prompt import add_prompt_arguments, prompt_text, prompt_token_ids
from qwen_ref.tokenizer import Tokenizer


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """--incremental, --model, the prompt and the run options, in `compare`'s group for this mode."""
    group.add_argument("--incremental", action="store_true",
                       help="compare the prompt's logits from one batched forward (A) with those from one token "
                            "at a time through the KV cache (B), instead of two files")
    group.add_argument("--model", type=Path, help="checkpoint folder, for --incremental")
    add_prompt_arguments(group, required=False)
    add_run_options(group)
    add_kv_dtype_option(group)
    add_prefill_options(group)


def given(args: argparse.Namespace) -> bool:
    """Whether any option of this mode besides --incremental was given (they mean nothing with two files)."""
    prompt = (args.prompt, args.prompt_file, args.tokens, args.tokens_file)
    return args.model is not None or any(source is not None for source in prompt)


def run(args: argparse.Namespace) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """What the output names, the positions [T], and the batched and incremental logits [T, V]."""
    if args.model is None:
        raise QwenRefError("--incremental needs --model DIR")
    tokens = _prompt_tokens(args)
    model = load_model(args.model, get_backend(args.backend), kv_dtype=args.kv_dtype, layer_major=layer_major(args))
    check_context(model, len(tokens), 0)
    bar = prefill_bar(len(tokens), args.prefill_chunk, args.quiet)
    batched = prefill(model, tokens, model.new_cache(len(tokens)), ALL_ROWS, args.prefill_chunk, bar)  # [T, V]
    if not args.quiet:
        print(f"batched forward done; now {len(tokens)} one-token steps", file=sys.stderr)
    stepped = incremental_logits(model, tokens)  # [T, V]
    chunks = "one forward" if len(tokens) <= args.prefill_chunk else f"forwards of {args.prefill_chunk} tokens"
    out = {"reference": f"{args.model}: {len(tokens)} tokens in {chunks} (batched)",
           "other": f"{args.model}: the same tokens one at a time through the KV cache (incremental)",
           "mode": "incremental", "model": str(args.model), "backend": args.backend, "kv_dtype": args.kv_dtype}
    return out, np.arange(len(tokens)), batched, stepped


def _prompt_tokens(args: argparse.Namespace) -> list[int]:
    """The prompt's token ids: given, or the text tokenized with the checkpoint's tokenizer."""
    tokens = prompt_token_ids(args)
    if tokens is not None:
        return tokens
    text = prompt_text(args)
    if text is None:
        raise QwenRefError("--incremental needs a prompt: --prompt, --prompt-file, --tokens or --tokens-file")
    tokenizer = Tokenizer.from_model_dir(args.model)
    if tokenizer is None:
        raise QwenRefError(f"{args.model}: no tokenizer.json, so a text prompt cannot be tokenized "
                           "(pass --tokens or --tokens-file)")
    return tokenizer.encode(text)
