"""Chat messages -> prompt text, with the Jinja `chat_template` of the checkpoint's tokenizer_config.json.

Rendered the way transformers' `apply_chat_template` renders it: a sandboxed Jinja environment with
trim_blocks and lstrip_blocks, `raise_exception`, a `tojson` that keeps non-ASCII text, and the
tokenizer's special tokens (bos_token, eos_token, ...) as variables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen_ref.errors import QwenRefError

_SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise QwenRefError(f"chat_template does not parse: {exc}") from None
        self.source = source  # the Jinja text, as tokenizer_config.json has it
        self.special_tokens = special_tokens

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ChatTemplate:
        path = Path(model_dir) / "tokenizer_config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise QwenRefError(f"{model_dir}: no tokenizer_config.json, so there is no chat template") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QwenRefError(f"{path}: unreadable ({exc})") from None
        source = config.get("chat_template")
        if isinstance(source, list):  # some checkpoints store named templates; "default" is the chat one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str):
            raise QwenRefError(f"{path}: no chat_template")
        special = {}
        for field in _SPECIAL_TOKEN_FIELDS:
            value = config.get(field)
            special[field] = value.get("content") if isinstance(value, dict) else value
        return cls(source, special)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ({"role": ..., "content": ...}), ready for the assistant's turn."""
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.TemplateError as exc:
            raise QwenRefError(f"chat_template failed: {exc}") from None
