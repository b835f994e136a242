"""`qwen-ref info`: what a checkpoint is, and what running it costs in memory and disk reads.

The counts are pure functions of the config (`parameter_count`, `kv_cache.kv_bytes_per_token`), so a
folder holding only config.json is enough to size a model before downloading its weights. Weights
are memory-mapped: when they do not fit in memory they stay on disk, and every forward pass reads
them again (the page cache keeps the most recent pages, which a pass over more weights than memory
evicts before the next pass needs them).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_ref.config import QwenConfig, load_config
from qwen_ref.errors import QwenRefError
from qwen_ref.kv_cache import kv_bytes_per_token
from qwen_ref.options import positive_int
from qwen_ref.paging import MEMINFO, fits, read_meminfo
from qwen_ref.published import published_shape
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


def _tensor_bytes(model_dir: Path, config: QwenConfig) -> tuple[dict[str, tuple[str, int]], str]:
    """{tensor name: (safetensors dtype, bytes)} of the tensors the model uses, and where the sizes come from."""
    if _has_weights(model_dir):
        weights = load_weights(model_dir, config)  # memory-mapped: nothing is read but headers
        return {name: (_STORED_NAMES[w.dtype], w.nbytes) for name, w in weights.items()}, "safetensors"
    if config.torch_dtype in _TORCH_DTYPES:
        dtype, itemsize = _TORCH_DTYPES[config.torch_dtype]
        sizes = {name: (dtype, math.prod(shape) * itemsize) for name, shape in expected_shapes(config).items()}
        return sizes, f"estimated: no weights in the folder, config.json says {config.torch_dtype}"
    return {}, "unknown: no weights in the folder and no torch_dtype in config.json"


def _published(config: QwenConfig, params: ParameterCount) -> dict | None:
    """The published Qwen1.5 size this config has the shape of, and this config counted as the Hub counts it."""
    shape = published_shape(config)
    if shape is None:
        return None
    return {
        "name": shape.name,
        "num_hidden_layers": shape.num_hidden_layers,
        "billions": shape.billions,  # as published
        "parameters_as_published": shape.counted_as_published(params.total, params.embedding),
        "stores_tied_lm_head": shape.stores_tied_lm_head,
    }


def model_info(model_dir: Path, context: int | None = None, meminfo: Path = MEMINFO) -> dict:
    """Everything `qwen-ref info` prints, as a JSON-ready dict; `meminfo` is this machine's /proc/meminfo."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise QwenRefError(f"model folder {model_dir} does not exist")
    config = load_config(model_dir)
    context = context or config.max_position_embeddings
    params = parameter_count(config)
    tensors, weights_source = _tensor_bytes(model_dir, config)
    stored: dict[str, int] = {}
    for dtype, nbytes in tensors.values():
        stored[dtype] = stored.get(dtype, 0) + nbytes
    weights_bytes = sum(stored.values()) if stored else None
    # A forward pass reads every weight whole, but of an untied embedding table only its tokens' rows.
    per_pass = sum(n for name, (_, n) in tensors.items()
                   if name != "model.embed_tokens.weight" or config.tie_word_embeddings)

    per_token = kv_bytes_per_token(config, "float32")
    kv_bytes = per_token * context
    machine = read_meminfo(meminfo)
    memory = None
    if machine is not None:
        memory = {"source": str(meminfo), **machine, "kv_cache_fits_MemAvailable": kv_bytes <= machine["MemAvailable"]}
        if weights_bytes is not None:
            # the rule load_model applies: weights that do not fit make prompts run layer-major
            memory |= {"weights_fit_MemAvailable": fits(weights_bytes, machine["MemAvailable"]),
                       "weights_fit_MemTotal": fits(weights_bytes, machine["MemTotal"])}
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
        "published": _published(config, params),
        "stored_bytes": stored,  # by safetensors dtype, over the tensors the model uses
        "weights_bytes": weights_bytes,  # resident: memory-mapped, as stored
        "weights_source": weights_source,
        "kv_cache": {
            "dtype": "float32",
            "bytes_per_token": per_token,
            "bytes_per_token_16bit": kv_bytes_per_token(config, "bfloat16"),
            "context": context,
            "bytes": kv_bytes,
        },
        "memory": memory,  # None where /proc/meminfo cannot be read
        # What a run reads from disk while the weights are not in memory: a prompt runs layer-major,
        # each layer read once for all its chunks; decode reads every layer per generated token.
        "disk_reads": None if not tensors else {"per_prompt": per_pass, "per_generated_token": per_pass},
    }


def _size_line(info: dict) -> str:
    """The parameter count in billions, against the published size it has the shape of."""
    published = info["published"]
    if published is None:
        return f"{info['parameters']['total'] / 1e9:.2f}B; no published Qwen1.5 shape"
    digits = len(published["billions"].partition(".")[2])
    here = f"{published['parameters_as_published'] / 1e9:.{digits}f}B"
    layers = info["architecture"]["num_hidden_layers"]
    name = published["name"]
    if layers < published["num_hidden_layers"]:
        name = f"{layers} of the {published['num_hidden_layers']} layers of {name}"
    tied = ", counting the tied LM head twice as its files store it" if published["stores_tied_lm_head"] else ""
    return f"{here}; {name} (published: {published['billions']}B{tied})"


def _fit(available: bool, total: bool) -> str:
    if available:
        return "fit in MemAvailable"
    return "fit in MemTotal but not in MemAvailable" if total else "fit in neither MemAvailable nor MemTotal"


def _memory_lines(info: dict) -> list[str]:
    """This machine's memory, what fits in it, and the disk reads of the weights that do not."""
    memory, kv, weights = info["memory"], info["kv_cache"], info["weights_bytes"]
    lines = []
    if memory is not None:
        available, total = memory["MemAvailable"], memory["MemTotal"]
        lines.append(f"memory          MemAvailable {human_bytes(available)}, MemTotal {human_bytes(total)} "
                     f"({memory['source']})")
        fits = []
        if weights is not None:
            fit = _fit(memory["weights_fit_MemAvailable"], memory["weights_fit_MemTotal"])
            fits.append(f"weights ({human_bytes(weights)}) {fit}")
        kv_fit = "fits" if memory["kv_cache_fits_MemAvailable"] else "does not fit"
        fits.append(f"KV cache for {kv['context']:,} tokens ({human_bytes(kv['bytes'])}) {kv_fit} in MemAvailable")
        lines.append(f"fits in memory  {'; '.join(fits)}")
    reads = info["disk_reads"]
    if reads is not None and (memory is None or not memory["weights_fit_MemAvailable"]):
        embedding = ("the tied embedding is the LM head" if info["architecture"]["tie_word_embeddings"]
                     else "of the embedding table, only the tokens' rows")
        # with memory unknown, load_model keeps the chunk-by-chunk order unless told (--layer-major on)
        when = "if they do not fit (--layer-major on)" if memory is None else "the weights do not fit"
        lines.append(f"disk reads      {when}: prompts run layer-major, reading "
                     f"{human_bytes(reads['per_prompt'])} per prompt (each layer once for all its chunks), and "
                     f"{human_bytes(reads['per_generated_token'])} per generated token (every weight; {embedding})")
    return lines


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
        f"size            {_size_line(info)}",
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
        f"KV cache        {human_bytes(kv['bytes_per_token'])} per token ({kv['dtype']}; "
        f"{human_bytes(kv['bytes_per_token_16bit'])} with --kv-dtype bfloat16 or float16); "
        f"{human_bytes(kv['bytes'])} for {kv['context']:,} tokens"
    )
    return "\n".join(lines + _memory_lines(info))


# ---------------------------------------------------------------------------------------------------
# `qwen-ref info --model DIR`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `qwen-ref info`."""
    parser.description = (
        "Architecture, parameter count against the published Qwen1.5 size of that shape, bytes on disk by "
        "dtype, the memory a run needs (the weights, memory-mapped as stored, and a float32 KV cache of "
        "--context tokens), whether they fit in this machine's memory (/proc/meminfo), and what each "
        "forward pass reads from disk when the weights do not. A folder with only config.json is enough "
        "(weight bytes are then estimated from its torch_dtype)."
    )
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder (config.json, *.safetensors)")
    parser.add_argument("--context", type=positive_int,
                        help="tokens of KV cache to size (default: the model's max_position_embeddings)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def kernels_line() -> str:
    """The prefill GEMM the numba backend's `--kernels auto` runs on this host, and why (not measured here)."""
    try:
        import numba

        from jitkernels.choice import describe_auto
    except ImportError as exc:
        return f"the numba backend is unavailable: {exc}"
    return f"prefill GEMM {describe_auto(numba.get_num_threads())}"


def run(args: argparse.Namespace) -> int:
    """`qwen-ref info`: always 0 (bad input raises QwenRefError)."""
    info = model_info(args.model, args.context) | {"kernels": kernels_line()}
    print(json.dumps(info) if args.json else format_info(info) + f"\nkernels         {info['kernels']}")
    return 0
