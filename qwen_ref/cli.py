"""The `qwen-ref` command line: results on stdout, errors as one line on stderr."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from qwen_ref.backends import BACKEND_NAMES, get_backend
from qwen_ref.config import load_generation_config
from qwen_ref.errors import QwenRefError
from qwen_ref.generation import generate_greedy, prefill, check_context
from qwen_ref.model import QwenModel, load_model
from qwen_ref.tokenizer import Tokenizer

DEFAULT_BACKEND = "numpy"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise QwenRefError(f"{self.prog}: {message} (see --help)")


def _token_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens wants comma-separated integers, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"wants a positive integer, got {text!r}")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json, *.safetensors)")
    parser.add_argument("--backend", choices=BACKEND_NAMES, default=DEFAULT_BACKEND, help="(default: %(default)s)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text, tokenized with the checkpoint's tokenizer.json")
    source.add_argument("--tokens", type=_token_list, help="prompt as comma-separated token ids, e.g. 1,2,3")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qwen-ref", description="CPU reference implementation of Qwen1.5 (Qwen2ForCausalLM).")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    selfcheck = commands.add_parser("selfcheck", help="run the built-in tiny checkpoint against transformers' logits")
    selfcheck.add_argument("--backend", choices=BACKEND_NAMES, default=DEFAULT_BACKEND, help="(default: %(default)s)")

    logits = commands.add_parser("logits", help="write the logits at every prompt position to an .npz file")
    _add_model_args(logits)
    logits.add_argument("--out", required=True, type=Path, help="output .npz (arrays: tokens [T], logits [T, V])")

    generate = commands.add_parser("generate", help="continue a prompt with greedy decoding")
    _add_model_args(generate)
    generate.add_argument("--max-new-tokens", type=_positive_int, default=64, help="(default: %(default)s)")
    generate.add_argument(
        "--temperature", type=float, default=0.0, help="only 0 (greedy) is supported for now (default: %(default)s)"
    )
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    return parser


def _prompt_tokens(args: argparse.Namespace, model: QwenModel, tokenizer: Tokenizer | None) -> list[int]:
    if args.tokens is not None:
        tokens = args.tokens
    elif tokenizer is None:
        raise QwenRefError(f"{args.model}: no tokenizer.json, so --prompt cannot be used (pass --tokens)")
    else:
        tokens = tokenizer.encode(args.prompt)
    if not tokens:
        raise QwenRefError("the prompt is empty")
    vocab = model.config.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise QwenRefError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return tokens


def _run_logits(args: argparse.Namespace) -> int:
    model = load_model(args.model, get_backend(args.backend))
    tokens = _prompt_tokens(args, model, Tokenizer.from_model_dir(args.model))
    check_context(model, len(tokens), 0)
    logits = prefill(model, tokens, model.new_cache(len(tokens)), last_only=False)  # [T, V]
    try:
        with open(args.out, "wb") as f:
            np.savez(f, tokens=np.array(tokens, dtype=np.int64), logits=logits)
    except OSError as exc:
        raise QwenRefError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"wrote logits [{len(tokens)}, {model.config.vocab_size}] to {args.out}", file=sys.stderr)
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    if args.temperature != 0:
        raise QwenRefError("--temperature: only 0 (greedy decoding) is supported for now")
    model = load_model(args.model, get_backend(args.backend))
    tokenizer = Tokenizer.from_model_dir(args.model)
    prompt = _prompt_tokens(args, model, tokenizer)
    eos = load_generation_config(args.model, model.config).eos_token_ids
    tokens = list(generate_greedy(model, prompt, args.max_new_tokens, eos))
    text = tokenizer.decode(tokens) if tokenizer else None
    if args.json:
        print(json.dumps({"prompt_tokens": prompt, "tokens": tokens, "text": text}, ensure_ascii=False))
    else:
        print(text if text is not None else " ".join(map(str, tokens)))
    return 0


def _run_selfcheck(args: argparse.Namespace) -> int:
    from qwen_ref.selfcheck import run_selfcheck

    return 0 if run_selfcheck(get_backend(args.backend)) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        run = {"selfcheck": _run_selfcheck, "logits": _run_logits, "generate": _run_generate}[args.command]
        return run(args)
    except QwenRefError as exc:
        if debug:
            raise
        print(f"qwen-ref: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            raise
        print("qwen-ref: error: out of memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
