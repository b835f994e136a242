"""Where a prompt comes from: --prompt, --prompt-file, --tokens or --tokens-file (one of them).

The files exist for long prompts: Linux refuses a single command-line argument over 128 KB, which
32,000 token ids (~200 KB) or ~130 KB of text exceed. `-` reads standard input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from qwen_ref.errors import QwenRefError

STDIN = "-"
_TOKEN_ID = re.compile(r"-?[0-9]+")  # ASCII digits only: int() would also take "1_000" and other scripts' digits
_SEPARATORS = re.compile(r"[,\s]+")


def add_prompt_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, required: bool = True) -> None:
    """The four mutually exclusive prompt sources; exactly one is required unless `required` is False (the
    command then checks, as `compare` does for its --incremental mode)."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--prompt", help="prompt text, tokenized with the checkpoint's tokenizer.json")
    source.add_argument("--prompt-file", metavar="FILE",
                        help="prompt text from a UTF-8 file, byte for byte (a final newline is part of it); - reads "
                             "standard input")
    source.add_argument("--tokens", help="prompt as token ids separated by commas and/or whitespace, e.g. 1,2,3")
    source.add_argument("--tokens-file", metavar="FILE",
                        help="prompt token ids from a file, separated by commas and/or whitespace; - reads standard "
                             "input")


def prompt_text(args: argparse.Namespace) -> str | None:
    """The text of --prompt or --prompt-file; None when the prompt is given as token ids."""
    return read_text(args.prompt_file) if args.prompt_file is not None else args.prompt


def prompt_token_ids(args: argparse.Namespace) -> list[int] | None:
    """The ids of --tokens or --tokens-file; None when the prompt is given as text."""
    if args.tokens is not None:
        return parse_token_ids(args.tokens, "--tokens")
    if args.tokens_file is not None:
        return parse_token_ids(read_text(args.tokens_file), _name(args.tokens_file))
    return None


def parse_token_ids(text: str, source: str) -> list[int]:
    """Integers separated by commas and/or whitespace ("1,2, 3\\n4"); `source` names the flag or file in errors."""
    ids = []
    for number, item in enumerate((item for item in _SEPARATORS.split(text) if item), start=1):
        if not _TOKEN_ID.fullmatch(item):
            raise QwenRefError(f"{source}: item {number}, {item[:24]!r}, is not a token id "
                               "(want integers separated by commas and/or whitespace)")
        ids.append(int(item))
    return ids


def read_text(path: str | Path) -> str:
    """A UTF-8 text file whole, or standard input for `-`; one-line errors for a missing, unreadable or
    non-UTF-8 file."""
    name = _name(path)
    try:
        data = sys.stdin.buffer.read() if str(path) == STDIN else Path(path).read_bytes()
    except FileNotFoundError:
        raise QwenRefError(f"{name}: no such file") from None
    except OSError as exc:
        raise QwenRefError(f"cannot read {name}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QwenRefError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_jsonl_objects(path: str | Path) -> Iterator[tuple[int, str, dict]]:
    """Each non-blank line of a JSONL file as (N, `PATH: line N`, its object); one-line errors name the line."""
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{_name(path)}: line {number}"
        yield number, where, json_object(line, where)


def json_object(text: str, where: str) -> dict:
    """One line of JSONL as a JSON object; a one-line error starting with `where` otherwise."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QwenRefError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(item, dict):
        raise QwenRefError(f"{where}: want a JSON object, got {type(item).__name__}")
    return item


def _name(path: str | Path) -> str:
    return "standard input" if str(path) == STDIN else str(path)
