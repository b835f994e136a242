"""Content hashes that say which checkpoint and which tokenizer a trace or a reference was made from.

A folder's hash is the sha256 of a list of its files' names and sha256s. Hashing a 32B checkpoint
reads 64 GB, so each file's sha256 is remembered in the user's cache folder (`$XDG_CACHE_HOME`,
default `~/.cache`, `qwen-ref/sha256.json`) under its path, size and modification time: a file that
changes is hashed again, an unchanged one is not. Where the cache cannot be written, files are hashed
every time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qwen_ref.errors import QwenRefError

_READ = 1 << 24  # bytes per read: hashing streams the files, never holds one whole


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "qwen-ref" / "sha256.json"


def _load_cache(path: Path) -> dict[str, str]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _save_cache(path: Path, cache: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, sort_keys=True))
        tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file, whole
    except OSError:
        pass  # a read-only home: hash again next time


def file_sha256(path: Path, cache: dict[str, str] | None = None) -> str:
    """sha256 of a file's bytes, from `cache` when its path, size and modification time are there."""
    try:
        stat = path.stat()
        key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
        if cache is not None and key in cache:
            return cache[key]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_READ):
                digest.update(block)
    except OSError as exc:
        raise QwenRefError(f"cannot read {path}: {exc.strerror or exc}") from None
    if cache is not None:
        cache[key] = digest.hexdigest()
    return digest.hexdigest()


def _hash_files(paths: list[Path]) -> str:
    cache_path = _cache_file()
    cache = _load_cache(cache_path)
    before = len(cache)
    listing = "".join(f"{path.name} {file_sha256(path, cache)}\n" for path in paths)
    if len(cache) != before:
        _save_cache(cache_path, cache)
    return hashlib.sha256(listing.encode()).hexdigest()


def checkpoint_hash(model_dir: Path) -> str:
    """sha256 over config.json and every *.safetensors file of a checkpoint folder, by name, in name order."""
    model_dir = Path(model_dir)
    return _hash_files([model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))])


def tokenizer_hash(model_dir: Path) -> str:
    """sha256 over tokenizer.json (and tokenizer_config.json, which holds the chat template and the special tokens)."""
    model_dir = Path(model_dir)
    files = [model_dir / "tokenizer.json"]
    if (model_dir / "tokenizer_config.json").is_file():
        files.append(model_dir / "tokenizer_config.json")
    return _hash_files(files)
