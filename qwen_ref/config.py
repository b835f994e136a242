"""The model's hyper-parameters, read from a checkpoint's `config.json` and `generation_config.json`.

Shape legend used in comments throughout qwen_ref and kernels:
    T      tokens in this forward call        S      tokens in the KV cache (past + this call)
    D      hidden_size                        F      intermediate_size (MLP)
    H      num_attention_heads                Hkv    num_key_value_heads
    hd     head_dim                           G      H // Hkv, query heads sharing one kv head
    V      vocab_size                         L      num_hidden_layers
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_ref.errors import QwenRefError

# Optional fields and the values transformers' Qwen2Config gives them when config.json is silent.
_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class QwenConfig:
    """Architecture of one Qwen2ForCausalLM checkpoint (Qwen1.5, Qwen2, Qwen2.5 dense)."""

    vocab_size: int  # V: rows of the embedding and of the LM head (padded past the tokenizer's ids)
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hkv: H for multi-head attention, fewer for grouped-query, 1 for multi-query
    head_dim: int  # hd: given by the checkpoint, else D // H
    max_position_embeddings: int  # the context length the model was trained for
    rope_theta: float  # RoPE base: 1e6 for most Qwen1.5 sizes, 5e6 for Qwen1.5-4B
    rms_norm_eps: float
    tie_word_embeddings: bool  # the LM head reuses embed_tokens.weight
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None  # the dtype the checkpoint says it was saved in (informational)

    @property
    def group_size(self) -> int:
        """G: how many query heads read the same key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QwenConfig:
        """Validate a parsed config.json; unsupported settings raise, naming the field."""
        model_type = raw.get("model_type")
        if model_type != "qwen2":
            raise QwenRefError(f"config.json: model_type {model_type!r} is not supported (only 'qwen2')")
        for field in _REQUIRED:
            if not isinstance(raw.get(field), int) or raw[field] <= 0:
                raise QwenRefError(f"config.json: field {field!r} must be a positive integer, got {raw.get(field)!r}")
        if raw.get("use_sliding_window"):
            raise QwenRefError("config.json: use_sliding_window=true is not supported")
        layer_types = raw.get("layer_types") or []
        if any(kind != "full_attention" for kind in layer_types):
            raise QwenRefError(f"config.json: layer_types {sorted(set(layer_types))} is not supported (only full_attention)")
        hidden_act = raw.get("hidden_act", _DEFAULTS["hidden_act"])
        if hidden_act != "silu":
            raise QwenRefError(f"config.json: hidden_act {hidden_act!r} is not supported (only 'silu')")

        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads != 0:
            raise QwenRefError(
                f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if raw["hidden_size"] % heads != 0:
                raise QwenRefError(
                    f"config.json: hidden_size {raw['hidden_size']} is not divisible by num_attention_heads {heads}"
                )
            head_dim = raw["hidden_size"] // heads
        if head_dim % 2 != 0:
            raise QwenRefError(f"config.json: head_dim {head_dim} must be even for rotary embeddings")

        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=raw.get("max_position_embeddings", _DEFAULTS["max_position_embeddings"]),
            rope_theta=_rope_theta(raw),
            rms_norm_eps=float(raw.get("rms_norm_eps", _DEFAULTS["rms_norm_eps"])),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", _DEFAULTS["tie_word_embeddings"])),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_token_ids(raw.get("eos_token_id"), "config.json", "eos_token_id"),
            torch_dtype=raw.get("torch_dtype", raw.get("dtype")),
        )


def _rope_theta(raw: dict[str, Any]) -> float:
    """RoPE base: top level in published Qwen1.5 configs, under `rope_parameters` in transformers 5."""
    params = raw.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise QwenRefError(f"config.json: rope_parameters.rope_type {rope_type!r} is not supported (only 'default')")
    scaling = raw.get("rope_scaling")
    if scaling:
        raise QwenRefError(f"config.json: rope_scaling {scaling!r} is not supported")
    theta = params.get("rope_theta", raw.get("rope_theta", _DEFAULTS["rope_theta"]))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise QwenRefError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def _token_ids(value: Any, file: str, field: str) -> tuple[int, ...]:
    """An id field that may be null, one int or a list of ints."""
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and i >= 0 for i in ids):
        raise QwenRefError(f"{file}: {field} must be an integer or a list of integers, got {value!r}")
    return tuple(ids)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding defaults from generation_config.json, with transformers' defaults where it is silent."""

    eos_token_ids: tuple[int, ...]
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise QwenRefError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QwenRefError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise QwenRefError(f"{path} must hold a JSON object")
    return data


def load_config(model_dir: Path) -> QwenConfig:
    """Read and validate `model_dir/config.json`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise QwenRefError(f"{model_dir}: no config.json (is this a checkpoint folder?)")
    return QwenConfig.from_dict(_read_json(path))


def load_generation_config(model_dir: Path, config: QwenConfig) -> GenerationConfig:
    """Read `generation_config.json` when present; eos ids fall back to config.json's."""
    path = Path(model_dir) / "generation_config.json"
    raw = _read_json(path) if path.is_file() else {}
    eos = _token_ids(raw.get("eos_token_id"), "generation_config.json", "eos_token_id") or config.eos_token_ids
    defaults = GenerationConfig(eos_token_ids=eos)

    def field(name: str) -> Any:  # null in the file means "use the default", as in transformers
        value = raw.get(name)
        return getattr(defaults, name) if value is None else value

    try:
        return GenerationConfig(
            eos_token_ids=eos,
            do_sample=bool(field("do_sample")),
            temperature=float(field("temperature")),
            top_k=int(field("top_k")),
            top_p=float(field("top_p")),
            min_p=None if raw.get("min_p") is None else float(raw["min_p"]),
            repetition_penalty=float(field("repetition_penalty")),
        )
    except (TypeError, ValueError) as exc:
        raise QwenRefError(f"{path}: a sampling field has a bad value ({exc})") from None
