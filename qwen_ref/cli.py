"""The `qwen-ref` command line: results on stdout; progress, timings and one-line errors on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_ref import __version__, compare, info, needle, perplexity, score, suite
from qwen_ref.backends import get_backend
from qwen_ref.chat import ChatSession
from qwen_ref.chat_template import ChatTemplate
from qwen_ref.config import load_generation_config
from qwen_ref.errors import QwenRefError
from qwen_ref.generation import GenerationStats, check_context, generate, prefill
from qwen_ref.model import ALL_ROWS, QwenModel, load_model
from qwen_ref.npz import save_npz
from qwen_ref.options import (
    add_kv_dtype_option,
    add_prefill_options,
    add_run_options,
    layer_major,
    positive_int,
)
from qwen_ref.fingerprint import checkpoint_hash
from qwen_ref.paging import fits_in_memory, page_cache_fraction
from qwen_ref.profile import Profile
from qwen_ref.trace import (
    FIRST_NAMES,
    LAST_NAMES,
    LAYER_NAMES,
    Recorder,
    Trace,
    parse_layers,
    parse_names,
    save_trace,
    values_per_position,
)
from qwen_ref.weights import weight_files, weights_dtype
from qwen_ref.progress import prefill_bar
from qwen_ref.prompt import add_prompt_arguments, prompt_text, prompt_token_ids
from qwen_ref.sampling import Sampler, SamplingParams
from qwen_ref.threads import set_threads
from qwen_ref.tokenizer import TextStream, Tokenizer

FROM_CHECKPOINT = "from generation_config.json, else transformers' default:"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise QwenRefError(f"{self.prog}: {message} (see --help)")


def _position_slice(text: str) -> slice:
    """An argparse type: A:B, 0-based and half-open as a Python slice (either end may be left out or negative)."""
    match = re.fullmatch(r"(-?[0-9]+)?:(-?[0-9]+)?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"wants A:B as a Python slice of the prompt positions (e.g. 0:10, or "
                                         f"--positions=-4: for the last 4), got {text!r}")
    return slice(*(None if end is None else int(end) for end in match.groups()))


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json, *.safetensors)")
    add_run_options(parser)
    add_kv_dtype_option(parser)
    add_prefill_options(parser)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="(default: %(default)s)")
    parser.add_argument(
        "--temperature", type=float,
        help="0 is greedy decoding (default: 0 unless generation_config.json sets do_sample, then its temperature or 1.0)",
    )
    parser.add_argument("--top-k", type=int, help=f"0 keeps all tokens (default: {FROM_CHECKPOINT} 50)")
    parser.add_argument("--top-p", type=float, help=f"(default: {FROM_CHECKPOINT} 1.0)")
    parser.add_argument("--min-p", type=float, help=f"(default: {FROM_CHECKPOINT} off)")
    parser.add_argument("--repetition-penalty", type=float, help=f"(default: {FROM_CHECKPOINT} 1.0)")
    parser.add_argument("--seed", type=int, help="random seed for sampling (default: a fresh one each run)")
    parser.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    parser.add_argument("--system", help="system message for the chat template (default: the template's own)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qwen-ref", description="CPU reference implementation of Qwen1.5 (Qwen2ForCausalLM).")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    selfcheck = commands.add_parser("selfcheck", help="run the built-in tiny checkpoint against transformers' logits")
    add_run_options(selfcheck)

    logits = commands.add_parser("logits", help="write the logits at the prompt positions to an .npz file")
    _add_model_args(logits)
    add_prompt_arguments(logits)
    logits.add_argument("--out", required=True, type=Path,
                        help="output .npz: tokens [T] (the prompt), positions [P], logits [P, V]; row i is the "
                             "distribution of the token after position positions[i]")
    rows = logits.add_mutually_exclusive_group()
    rows.add_argument("--last", type=positive_int, metavar="N",
                      help="keep the logits of the last N positions only (default: every position)")
    rows.add_argument("--positions", type=_position_slice, metavar="A:B",
                      help="keep the logits of positions A to B-1 only: 0-based, the Python slice [A:B], either "
                           "end may be left out or negative (write --positions=-8: for a negative A) "
                           "(default: every position)")

    trace = commands.add_parser(
        "trace", help="write the named intermediates of a prompt's forward pass (llama.cpp's Qwen2 names)",
        description="Run the prompt through the model and write every selected intermediate, keyed inp_embd, "
                    "blk.N.NAME (N the layer; NAME one of " + ", ".join(LAYER_NAMES) + "), result_norm and "
                    "result_output, each float32 with the prompt's positions first, plus metadata (qwen-ref "
                    "version, backend, weights dtype, checkpoint sha256, token ids). `qwen-ref compare` "
                    "takes two traces and names the first operation where they part.")
    _add_model_args(trace)
    add_prompt_arguments(trace)
    trace.add_argument("--out", required=True, type=Path, help="output trace, .safetensors or .npz")
    trace.add_argument("--layers", metavar="A-B,C", help="layers to record, 0-based, ranges inclusive (default: all)")
    trace.add_argument("--names", metavar="PATTERNS",
                       help="comma-separated fnmatch patterns of names to record, e.g. 'Qcur*,l_out' (default: all)")

    gen = commands.add_parser("generate", help="continue a prompt, streaming the text")
    _add_model_args(gen)
    add_prompt_arguments(gen)
    _add_sampling_args(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming the text")
    gen.add_argument("--profile", action="store_const", const=Profile(), help="print time per operation on stderr")

    chat = commands.add_parser("chat", help="talk with the model; /reset, /system TEXT, /exit")
    _add_model_args(chat)
    _add_sampling_args(chat)

    compare.add_arguments(commands.add_parser("compare", help="judge logits B against reference logits A"))
    perplexity.add_arguments(commands.add_parser("perplexity", help="perplexity of a text file, sliding window"))
    score.add_arguments(commands.add_parser("score", help="log-likelihood of continuations given contexts (JSONL)"))
    info.add_arguments(commands.add_parser("info", help="architecture, parameter count and memory a checkpoint needs"))
    needle.add_arguments(commands.add_parser("needle", help="needle in a haystack: retrieval by context length and depth"))
    suite.add_arguments(commands.add_parser("suite", help="make a reference suite of many prompts, or judge an "
                                                          "engine's log-probabilities against one"))
    return parser


def _sampling_params(args: argparse.Namespace, model_dir: Path, model: QwenModel) -> tuple[SamplingParams, tuple]:
    """The checkpoint's decoding settings, overridden by the flags the user gave."""
    gen = load_generation_config(model_dir, model.config)
    base = SamplingParams.from_generation_config(gen)
    params = SamplingParams(
        temperature=base.temperature if args.temperature is None else args.temperature,
        top_k=base.top_k if args.top_k is None else args.top_k,
        top_p=base.top_p if args.top_p is None else args.top_p,
        min_p=base.min_p if args.min_p is None else args.min_p,
        repetition_penalty=base.repetition_penalty if args.repetition_penalty is None else args.repetition_penalty,
    )
    return params, gen.eos_token_ids


@dataclass(frozen=True)
class LoadStats:
    """How a model was loaded, for the timings on stderr."""

    seconds: float  # config, weight mappings, tokenizer: the weights' pages are read later, on first touch
    page_cache: float | None  # fraction of the checkpoint in the page cache before loading (None: unknown)


def _load(args: argparse.Namespace) -> tuple[QwenModel, Tokenizer | None, float]:
    started = time.perf_counter()
    model = load_model(args.model, get_backend(args.backend, args.kernels), kv_dtype=args.kv_dtype, layer_major=layer_major(args))
    if model.pager is not None and args.layer_major == "auto" and not args.quiet:
        print(f"weights of {model.weight_bytes() / 1e9:.1f} GB do not fit in available memory: "
              "prompts run layer-major, each layer read once per prompt", file=sys.stderr)
    if getattr(args, "profile", None) is not None:
        model.recorder = args.profile
    tokenizer = Tokenizer.from_model_dir(args.model)
    return model, tokenizer, time.perf_counter() - started


def _prompt_tokens(args: argparse.Namespace, model: QwenModel, tokenizer: Tokenizer | None) -> list[int]:
    text, tokens = prompt_text(args), prompt_token_ids(args)
    if tokens is not None:
        if getattr(args, "chat", False):
            raise QwenRefError("--chat needs a text prompt (--prompt or --prompt-file), not token ids")
    elif tokenizer is None:
        raise QwenRefError(f"{args.model}: no tokenizer.json, so a text prompt cannot be tokenized "
                           "(pass --tokens or --tokens-file)")
    elif getattr(args, "chat", False):
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        rendered = ChatTemplate.from_model_dir(args.model).render(system + [{"role": "user", "content": text}])
        tokens = tokenizer.encode(rendered)
    else:
        tokens = tokenizer.encode(text)
    if not tokens:
        raise QwenRefError("the prompt is empty")
    vocab = model.config.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise QwenRefError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return tokens


def _timings(stats: GenerationStats, generated: int, load: LoadStats | None = None,
             first_token: float | None = None) -> str:
    """One line: the prompt's and the generated tokens' rates; with `load`, its time and, as users feel it,
    the time to the first token since the process started (`first_token`), checkpoint reads included."""

    def rate(n: int, seconds: float) -> str:
        return f"{n / seconds:.2f} tok/s" if seconds > 0 else "-"

    line = (f"prompt: {stats.prefill_tokens} tokens, {rate(stats.prefill_tokens, stats.prefill_seconds)} | "
            f"generated: {generated} tokens, {rate(stats.decode_tokens, stats.decode_seconds)}")
    if load is None:
        return line
    line += f" | load: {load.seconds:.2f} s"
    if first_token is not None:
        line += f" | first token: {first_token:.2f} s after start"
    if load.page_cache is not None:
        # mapped weights are read on first touch: a cold checkpoint's reads from disk fall in the prompt's time
        line += f" | checkpoint {100 * load.page_cache:.0f}% in page cache at load" + (
            " (the prompt's time includes reading from disk the pages it touches)" if load.page_cache < 0.99 else "")
    return line


def _process_age() -> float | None:
    """Seconds since this process started, interpreter start-up and imports included (Linux), else None."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    return age if age >= 0 else None  # a container's own uptime (lxcfs) against the host's start ticks: unknown


def _run_logits(args: argparse.Namespace) -> int:
    model, tokenizer, _ = _load(args)
    tokens = _prompt_tokens(args, model, tokenizer)
    check_context(model, len(tokens), 0)  # before the progress bar starts
    rows = slice(-args.last, None) if args.last else args.positions or ALL_ROWS
    kept = range(len(tokens))[rows]
    if not kept:
        asked = ":".join("" if end is None else str(end) for end in (rows.start, rows.stop))
        raise QwenRefError(f"--positions {asked} selects no position of the {len(tokens)}-token prompt")
    bar = prefill_bar(len(tokens), args.prefill_chunk, args.quiet)
    logits = prefill(model, tokens, model.new_cache(len(tokens)), rows, args.prefill_chunk, bar)  # [P, V]
    positions = np.arange(kept.start, kept.stop, dtype=np.int64)  # [P]
    try:
        save_npz(args.out, {"tokens": np.array(tokens, dtype=np.int64), "positions": positions, "logits": logits})
    except OSError as exc:
        raise QwenRefError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    if not args.quiet:
        print(f"wrote logits [{len(kept)}, {model.config.vocab_size}] of positions {kept.start}..{kept.stop - 1} "
              f"(of {len(tokens)}) to {args.out}", file=sys.stderr)
    return 0


def _run_trace(args: argparse.Namespace) -> int:
    if args.out.suffix not in (".safetensors", ".npz"):
        raise QwenRefError(f"--out {args.out}: a trace is written as .safetensors or .npz")
    model, tokenizer, _ = _load(args)
    tokens = _prompt_tokens(args, model, tokenizer)
    check_context(model, len(tokens), 0)
    cfg = model.config
    layers = None if args.layers is None else parse_layers(args.layers, cfg.num_hidden_layers)
    recorder = Recorder(layers, None if args.names is None else parse_names(args.names))
    per_position = sum(
        values_per_position(name, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                            cfg.intermediate_size, cfg.vocab_size)
        for layer in [None, *range(cfg.num_hidden_layers)]
        for name in ((*FIRST_NAMES, *LAST_NAMES) if layer is None else LAYER_NAMES)
        if recorder.wants(name, layer)
    )
    size = 4 * per_position * len(tokens)  # float32, held in memory until written
    if not fits_in_memory(size + model.weight_bytes()):
        raise QwenRefError(f"the trace would hold {size / 1e9:.1f} GB, more than available memory beside the "
                           "weights: select fewer layers (--layers) or names (--names)")
    model.recorder = recorder
    bar = prefill_bar(len(tokens), args.prefill_chunk, args.quiet)
    prefill(model, tokens, model.new_cache(len(tokens)), ALL_ROWS, args.prefill_chunk, bar)
    metadata = {
        "source": "qwen-ref", "qwen_ref_version": __version__, "backend": model.backend.name,
        "weights_dtype": weights_dtype(model.weights), "kv_dtype": model.kv_dtype,
        "checkpoint_sha256": checkpoint_hash(args.model), "tokens": json.dumps(tokens),
    }
    tensors = recorder.tensors()
    try:
        save_trace(args.out, Trace(tensors, metadata))
    except OSError as exc:
        raise QwenRefError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    if not args.quiet:
        print(f"wrote {len(tensors)} tensors ({sum(t.nbytes for t in tensors.values()) / 1e6:.1f} MB) of "
              f"{len(tokens)} positions to {args.out}", file=sys.stderr)
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    model, tokenizer, load_seconds = _load(args)
    # after the load, which names a missing folder or file and maps the weights without reading their pages
    load = LoadStats(load_seconds, page_cache_fraction(weight_files(Path(args.model))))
    prompt = _prompt_tokens(args, model, tokenizer)
    params, eos = _sampling_params(args, args.model, model)
    if args.stop and tokenizer is None:
        raise QwenRefError(f"{args.model}: no tokenizer.json, so --stop strings cannot be matched")
    sampler = Sampler(params, args.seed)
    if args.profile is not None:
        sampler = args.profile.timed("sampling", sampler)
    stream = TextStream(tokenizer, tuple(args.stop)) if tokenizer else None
    stats = GenerationStats()
    tokens: list[int] = []
    first_token = None
    finish_reason = "length"
    bar = prefill_bar(len(prompt), args.prefill_chunk, args.quiet)
    for token in generate(model, prompt, args.max_new_tokens, eos, sampler, stats=stats,
                          prefill_chunk=args.prefill_chunk, on_prefill_chunk=bar):
        if not tokens:
            first_token = _process_age()
        tokens.append(token)
        piece = stream.push(token) if stream else ""
        if not args.json:
            print(piece if stream else f"{token} ", end="", flush=True)
        if token in eos:
            finish_reason = "eos"
        if stream and stream.stopped:
            finish_reason = "stop"
            break
    rest = stream.finish() if stream else ""
    if args.json:
        print(json.dumps({"prompt_tokens": prompt, "tokens": tokens, "text": stream.text if stream else None,
                          "finish_reason": finish_reason}, ensure_ascii=False))
    else:
        print(rest, flush=True)
    if not args.quiet:
        print(_timings(stats, len(tokens), load, first_token), file=sys.stderr)
    if args.profile is not None:
        print(f"profile (prefill and decode together; per token of {len(prompt) + len(tokens)}):", file=sys.stderr)
        print(args.profile.report(len(prompt) + len(tokens)), file=sys.stderr)
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    model, tokenizer, _ = _load(args)
    if tokenizer is None:
        raise QwenRefError(f"{args.model}: no tokenizer.json, which chat needs")
    params, eos = _sampling_params(args, args.model, model)
    session = ChatSession(model, tokenizer, ChatTemplate.from_model_dir(args.model), Sampler(params, args.seed),
                          eos, args.max_new_tokens, system=args.system, stop_strings=tuple(args.stop),
                          prefill_chunk=args.prefill_chunk,
                          progress=lambda n: prefill_bar(n, args.prefill_chunk, args.quiet))
    interactive = sys.stdin.isatty()
    if interactive and not args.quiet:
        print("qwen-ref chat: /reset, /system TEXT, /exit", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.rstrip("\n")
        if text == "/exit":
            return 0
        if text == "/reset":
            session.reset()
            continue
        if text.startswith("/system"):
            session.reset(system=text[len("/system"):].strip())
            continue
        if not text.strip():
            continue
        try:
            _, stats = session.reply(text, lambda piece: print(piece, end="", flush=True))
        except QwenRefError as exc:  # one bad turn (too long for the context) does not end the chat
            print(f"qwen-ref: error: {exc}", file=sys.stderr)
            continue
        print(flush=True)
        if not args.quiet:
            print(_timings(stats, stats.decode_tokens + 1), file=sys.stderr)


def _run_selfcheck(args: argparse.Namespace) -> int:
    from qwen_ref.selfcheck import run_selfcheck

    return 0 if run_selfcheck(get_backend(args.backend, args.kernels), layer_major(args)) else 1


COMMANDS = {
    "selfcheck": _run_selfcheck, "logits": _run_logits, "trace": _run_trace, "generate": _run_generate, "chat": _run_chat,
    "compare": compare.run, "perplexity": perplexity.run, "score": score.run, "info": info.run, "needle": needle.run,
    "suite": suite.run,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if "threads" in args:
            set_threads(args.threads)
        # the kernels' first-compile notice; set either way, as main() may run again in one process
        logging.getLogger("jitkernels").setLevel(logging.ERROR if getattr(args, "quiet", False) else logging.NOTSET)
        return COMMANDS[args.command](args)
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
    except Exception as exc:  # a bug of ours: still one line, with the way to see more
        if debug:
            raise
        print(f"qwen-ref: error: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", file=sys.stderr)
        return 3
