"""The cases of a reference suite: a prompts JSONL file read into token ids, one case per line.

A line is {"id": optional string, "text": ..., "chat": true|false (default false)} or
{"id": optional, "tokens": [ids]}. A chat case is the text rendered by the checkpoint's chat template
as one user message with the generation prompt added, then tokenized; a text case is tokenized as
it is; a token case is taken as given. A case without an id is called `line N` (its line number).
Everything downstream (the reference files, the engine's outputs) works on the token ids, so the
suite's `cases.jsonl` lists them for engines that should not tokenize at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen_ref.chat_template import ChatTemplate
from qwen_ref.errors import QwenRefError
from qwen_ref.prompt import read_jsonl_objects
from qwen_ref.tokenizer import Tokenizer

_KEYS = {"id", "text", "chat", "tokens"}


@dataclass(frozen=True)
class Case:
    id: str
    tokens: tuple[int, ...]  # [T], T >= 1; the reference holds a distribution for each position
    source: str  # "text", "chat" or "tokens": how the ids were made (for the manifest)


def read_cases(path: Path, model_dir: Path, tokenizer: Tokenizer | None, vocab_size: int, context: int) -> list[Case]:
    """Every case of a prompts JSONL file, in file order; one-line errors name the line and the field."""
    cases: list[Case] = []
    seen: dict[str, int] = {}
    template: ChatTemplate | None = None  # loaded at the first chat case: token-only suites need no template
    for number, where, item in read_jsonl_objects(path):
        unknown = sorted(set(item) - _KEYS)
        if unknown:
            raise QwenRefError(f"{where}: unknown field {unknown[0]!r} (a case has {', '.join(sorted(_KEYS))})")
        case_id = item.get("id", f"line {number}")
        if not isinstance(case_id, str) or not case_id:
            raise QwenRefError(f"{where}: 'id' must be a non-empty string, got {json.dumps(case_id)}")
        if case_id in seen:
            raise QwenRefError(f"{where}: id {case_id!r} repeats line {seen[case_id]}")
        seen[case_id] = number

        if ("text" in item) == ("tokens" in item):
            raise QwenRefError(f"{where}: give exactly one of 'text' and 'tokens'")
        chat = item.get("chat", False)
        if not isinstance(chat, bool):
            raise QwenRefError(f"{where}: 'chat' must be true or false, got {json.dumps(chat)}")
        if "tokens" in item:
            if chat:
                raise QwenRefError(f"{where}: 'chat' needs a 'text', not token ids")
            tokens, source = item["tokens"], "tokens"
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in tokens):
                raise QwenRefError(f"{where}: 'tokens' must be a list of integers")
        else:
            text = item["text"]
            if not isinstance(text, str):
                raise QwenRefError(f"{where}: 'text' must be a string")
            if tokenizer is None:
                raise QwenRefError(f"{where}: {model_dir} has no tokenizer.json, so text cannot be tokenized")
            if chat:
                template = template or ChatTemplate.from_model_dir(model_dir)
                text = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
            tokens, source = tokenizer.encode(text), "chat" if chat else "text"

        if not tokens:
            raise QwenRefError(f"{where}: the case has no tokens")
        if len(tokens) > context:
            raise QwenRefError(f"{where}: {len(tokens)} tokens exceed the model's context of {context}")
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise QwenRefError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        cases.append(Case(case_id, tuple(tokens), source))
    if not cases:
        raise QwenRefError(f"{path}: no cases")
    return cases


def case_file_name(index: int) -> str:
    """The reference file of the index-th case (0-based), named by position so that any id is a safe name."""
    return f"case-{index:05d}.npz"


def cases_jsonl(cases: list[Case]) -> str:
    """`cases.jsonl`: one {"id", "tokens"} object per line, the ids an engine must run, in suite order."""
    return "".join(json.dumps({"id": c.id, "tokens": list(c.tokens)}, ensure_ascii=False) + "\n" for c in cases)
