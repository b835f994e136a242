"""`manifest.json` of a reference suite: what the reference was computed from, so that a judge can
refuse outputs made with another tokenizer and a resumed run can refuse to mix two suites.

It holds no time or host: two runs of the same inputs, local or on a cluster, write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from qwen_ref.chat_template import ChatTemplate
from qwen_ref.errors import QwenRefError
from qwen_ref.fingerprint import checkpoint_hash, tokenizer_hash
from qwen_ref.model import QwenModel
from qwen_ref.suite_cases import Case, case_file_name, cases_jsonl
from qwen_ref.tokenizer import Tokenizer

FORMAT = "qwen-ref suite 2"  # 2: case files hold max_abs_logit
MANIFEST = "manifest.json"
CASES = "cases.jsonl"
# how weights.py holds each stored dtype (bfloat16 as raw 16-bit words)
_WEIGHT_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.uint16): "bfloat16"}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_metadata(model_dir: Path, tokenizer: Tokenizer | None) -> dict | None:
    """The tokenizer's hash, its special tokens by text, the eos/bos/pad tokens and the chat template's hash.

    These are what `suite check` compares with what an engine states about its own tokenizer.
    None when the checkpoint has no tokenizer.json (a suite of token-id cases only).
    """
    if tokenizer is None:
        return None
    meta: dict = {"sha256": tokenizer_hash(model_dir), "special_tokens": tokenizer.special_tokens()}
    try:
        template = ChatTemplate.from_model_dir(model_dir)
    except QwenRefError:  # no tokenizer_config.json or no template in it: text cases still work
        template = None
    for role in ("eos", "bos", "pad"):
        text = template.special_tokens.get(f"{role}_token") if template else None
        meta[f"{role}_token"] = text
        meta[f"{role}_token_id"] = None if text is None else tokenizer.token_id(text)
    meta["chat_template_sha256"] = None if template is None else _sha256(template.source.encode())
    return meta


def build_manifest(model_dir: Path, model: QwenModel, tokenizer: Tokenizer | None, prompts: Path, cases: list[Case],
                   top_k: int, full_logits: bool, prefill_chunk: int) -> dict:
    """Everything a case file depends on, and the cases in suite order."""
    try:
        package_version = version("qwen-ref")
    except PackageNotFoundError:  # run from a source tree that was never installed
        package_version = None
    try:
        prompts_bytes = Path(prompts).read_bytes()
    except OSError as exc:
        raise QwenRefError(f"cannot read {prompts}: {exc.strerror or exc}") from None
    embed = model.weights["model.embed_tokens.weight"]
    return {
        "format": FORMAT,
        "qwen_ref_version": package_version,
        "checkpoint_sha256": checkpoint_hash(model_dir),
        "vocab_size": model.config.vocab_size,  # the width of the logits, which may exceed the tokenizer's
        "tokenizer": tokenizer_metadata(model_dir, tokenizer),
        "weights_dtype": _WEIGHT_DTYPES[embed.dtype],
        "kv_dtype": model.kv_dtype,
        "backend": model.backend.name,
        "prefill_chunk": prefill_chunk,
        "top_k": min(top_k, model.config.vocab_size),
        "full_logits": full_logits,
        "prompts_sha256": _sha256(prompts_bytes),
        "cases": [{"id": c.id, "source": c.source, "n_tokens": len(c.tokens), "file": case_file_name(i)}
                  for i, c in enumerate(cases)],
    }


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise QwenRefError(f"cannot write {path}: {exc.strerror or exc}") from None


def start_suite(out_dir: Path, manifest: dict, cases: list[Case]) -> None:
    """Create the suite folder with its manifest and cases.jsonl, or check that an existing one (a killed
    run) has the same manifest, so that the case files already there belong to this suite."""
    path = out_dir / MANIFEST
    if path.exists():
        existing = read_manifest(out_dir)
        if existing != manifest:
            field = next(k for k in [*manifest, *existing] if existing.get(k) != manifest.get(k))
            raise QwenRefError(f"{out_dir} holds a suite made from other inputs ({field!r} differs): "
                               "use another --out, or delete it to start over")
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QwenRefError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    _write_atomically(out_dir / CASES, cases_jsonl(cases))
    _write_atomically(path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")  # last: marks a started suite


def read_manifest(suite_dir: Path) -> dict:
    """The manifest of a suite folder; a one-line error when it is missing or not ours."""
    path = Path(suite_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QwenRefError(f"{suite_dir}: no {MANIFEST} (not a folder made by `qwen-ref suite make`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QwenRefError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        if isinstance(manifest, dict) and str(manifest.get("format")).startswith("qwen-ref suite "):
            raise QwenRefError(f"{path}: a {manifest['format']!r} suite, this qwen-ref reads {FORMAT!r}: "
                               "make it again (`qwen-ref suite make` with a new --out)")
        raise QwenRefError(f"{path}: not a {FORMAT!r} manifest")
    return manifest
