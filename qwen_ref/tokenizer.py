"""Text <-> token ids, with the checkpoint's own tokenizer.json (byte-level BPE for Qwen)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from qwen_ref.errors import QwenRefError


class Tokenizer:
    """The `tokenizers` library's Tokenizer with the checkpoint's special tokens (<|im_start|>...)."""

    def __init__(self, path: Path):
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception for a corrupt file
            raise QwenRefError(f"{path}: cannot load tokenizer ({exc})") from None

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint folder, or None when it ships no tokenizer.json."""
        path = Path(model_dir) / "tokenizer.json"
        return cls(path) if path.is_file() else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings such as <|im_end|> become their ids.

        Qwen adds no BOS token, so this equals transformers' `tokenizer(text).input_ids`.
        """
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; special tokens (eos, <|im_end|>) are dropped unless asked for."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
