"""`qwen-ref info`: what a checkpoint is and what running it costs in memory.

The counts are pure functions of the config (`parameter_count`, `kv_cache_bytes_per_token`), so a
folder holding only config.json is enough to size a model before downloading its weights.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_ref.config import QwenConfig, load_config
from qwen_ref.errors import QwenRefError
from qwen_ref.options import positive_int
from qwen_ref.weights import expected_shapes, load_weights

# How weights.py holds each stored dtype (bf16 as raw uint16 words), by safetensors name.
_STORED_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint16): "BF16"}
# config.json's torch_dtype, for sizing a folder that has no weights yet.
_TORCH_DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}


@dataclass(frozen=True)
class ParameterCount:
    """Parameters by role; a tied LM head is the embedding matrix, counted once."""

    total: int
    embedding: int  # model.embed_tokens.weight [V, D]
    lm_head: int  # lm_head.weight [V, D], 0 when tied

    @property
    def non_embedding(self) -> int:
        """Everything but the embedding and the LM head, as Qwen's model cards count it."""
        return self.total - self.embedding - self.lm_head


def parameter_count(config: QwenConfig) -> ParameterCount:
    """Count from the tensor list the weight loader checks a checkpoint against."""
    shapes = expected_shapes(config)
    sizes = {name: int(np.prod(shape, dtype=np.int64)) for name, shape in shapes.items()}
    return ParameterCount(
        total=sum(sizes.values()),
        embedding=sizes["model.embed_tokens.weight"],
        lm_head=sizes.get("lm_head.weight", 0),
    )


def kv_cache_bytes_per_token(config: QwenConfig) -> int:
    """Keys and values of one token in every layer: 2 x L x Hkv x hd float32 (kv_cache.KVCache's layout)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4


def human_bytes(n: int) -> str:
    """Binary units: 1 KiB = 1024 bytes."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.2f} {unit}"


def _has_weights(model_dir: Path) -> bool:
    return (model_dir / "model.safetensors.index.json").is_file() or any(model_dir.glob("*.safetensors"))


def model_info(model_dir: Path, context: int | None = None) -> dict:
    """Everything `qwen-ref info` prints, as a JSON-ready dict."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise QwenRefError(f"model folder {model_dir} does not exist")
    config = load_config(model_dir)
    context = context or config.max_position_embeddings
    params = parameter_count(config)

    if _has_weights(model_dir):
        stored: dict[str, int] = {}
        for w in load_weights(model_dir, config).values():  # memory-mapped: nothing is read but headers
            name = _STORED_NAMES[w.dtype]
            stored[name] = stored.get(name, 0) + w.nbytes
        weights_source = "safetensors"
    elif config.torch_dtype in _TORCH_DTYPES:
        name, itemsize = _TORCH_DTYPES[config.torch_dtype]
        stored = {name: params.total * itemsize}
        weights_source = f"estimated: no weights in the folder, config.json says {config.torch_dtype}"
    else:
        stored = {}
        weights_source = "unknown: no weights in the folder and no torch_dtype in config.json"

    per_token = kv_cache_bytes_per_token(config)
    return {
        "model": str(model_dir),
        "architecture": {
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings,
            "rope_theta": config.rope_theta,
            "rms_norm_eps": config.rms_norm_eps,
            "tie_word_embeddings": config.tie_word_embeddings,
        },
        "parameters": {
            "total": params.total,
            "embedding": params.embedding,
            "lm_head": params.lm_head,
            "non_embedding": params.non_embedding,
        },
        "stored_bytes": stored,  # by safetensors dtype, over the tensors the model uses
        "weights_bytes": sum(stored.values()) if stored else None,  # resident: memory-mapped, as stored
        "weights_source": weights_source,
        "kv_cache": {
            "dtype": "float32",
            "bytes_per_token": per_token,
            "context": context,
            "bytes": per_token * context,
        },
    }


def format_info(info: dict) -> str:
    """The human-readable form of `model_info`."""
    a, p, kv = info["architecture"], info["parameters"], info["kv_cache"]
    group = a["num_attention_heads"] // a["num_key_value_heads"]
    head = "tied to the embedding (counted once)" if a["tie_word_embeddings"] else "separate lm_head.weight"
    lines = [
        f"model           {info['model']}",
        f"layers          {a['num_hidden_layers']}",
        f"attention       {a['num_attention_heads']} heads, {a['num_key_value_heads']} kv heads "
        f"(group {group}), head_dim {a['head_dim']}",
        f"hidden          {a['hidden_size']}, intermediate {a['intermediate_size']}",
        f"vocab           {a['vocab_size']}",
        f"context         {a['max_position_embeddings']} positions, rope_theta {a['rope_theta']:g}, "
        f"rms_norm_eps {a['rms_norm_eps']:g}",
        f"LM head         {head}",
        f"parameters      {p['total']:,} total = {p['embedding']:,} embedding + {p['lm_head']:,} LM head "
        f"+ {p['non_embedding']:,} non-embedding",
    ]
    if info["stored_bytes"]:
        stored = ", ".join(f"{name} {n:,} bytes ({human_bytes(n)})" for name, n in sorted(info["stored_bytes"].items()))
        estimated = info["weights_source"] != "safetensors"
        lines.append(f"stored{' (est.)' if estimated else '       '}   {stored}")
        lines.append(f"weights memory  {human_bytes(info['weights_bytes'])} (memory-mapped as stored, never widened "
                     f"whole)")
    if not info["weights_source"] == "safetensors":
        lines.append(f"weights         {info['weights_source']}")
    lines.append(
        f"KV cache        {human_bytes(kv['bytes_per_token'])} per token ({kv['dtype']}); "
        f"{human_bytes(kv['bytes'])} for {kv['context']:,} tokens"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# `qwen-ref info --model DIR`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `qwen-ref info`."""
    parser.description = (
        "Architecture, parameter count, bytes on disk by dtype, and the memory a run needs: the weights "
        "(memory-mapped, as stored) and a float32 KV cache of --context tokens. A folder with only "
        "config.json is enough (weight bytes are then estimated from its torch_dtype)."
    )
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json, *.safetensors)")
    parser.add_argument("--context", type=positive_int,
                        help="tokens of KV cache to size (default: the model's max_position_embeddings)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """`qwen-ref info`: always 0 (bad input raises QwenRefError)."""
    info = model_info(args.model, args.context)
    print(json.dumps(info) if args.json else format_info(info))
    return 0
