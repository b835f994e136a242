"""Content hashes that say which checkpoint and which tokenizer a trace or a reference was made from."""

from __future__ import annotations

import hashlib
from pathlib import Path

from qwen_ref.errors import QwenRefError

_READ = 1 << 24  # bytes per read: hashing streams the files, never holds one whole


def _hash_files(paths: list[Path], digest: hashlib._Hash) -> str:
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        try:
            with open(path, "rb") as f:
                while block := f.read(_READ):
                    digest.update(block)
        except OSError as exc:
            raise QwenRefError(f"cannot read {path}: {exc.strerror or exc}") from None
        digest.update(b"\0")
    return digest.hexdigest()


def checkpoint_hash(model_dir: Path) -> str:
    """sha256 over config.json and every *.safetensors file of a checkpoint folder, by name, in name order.

    It reads every weight byte (about a second per GB from the page cache), so two folders with the
    same hash hold the same model, whatever their files' dates.
    """
    model_dir = Path(model_dir)
    return _hash_files([model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))], hashlib.sha256())


def tokenizer_hash(model_dir: Path) -> str:
    """sha256 over tokenizer.json (and tokenizer_config.json, which holds the chat template and the special tokens)."""
    model_dir = Path(model_dir)
    files = [model_dir / "tokenizer.json"]
    if (model_dir / "tokenizer_config.json").is_file():
        files.append(model_dir / "tokenizer_config.json")
    return _hash_files(files, hashlib.sha256())
