"""Checkpoint tensors, memory-mapped from safetensors files and kept in their stored dtype.

NumPy has no bfloat16, so a BF16 tensor is held as its raw 16-bit words (`np.uint16`): in qwen_ref a
uint16 weight always means bfloat16. `to_float32` widens it exactly (bfloat16 is the top half of a
float32) at the place where it is used, so a 16-bit checkpoint is never copied whole into float32.

We parse safetensors ourselves (an 8-byte header length, a JSON header, then raw data) because the
`safetensors` package cannot hand bfloat16 to NumPy, and a zero-copy view of the memory map is what
lets a checkpoint larger than RAM stream through the page cache.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from qwen_ref.config import QwenConfig
from qwen_ref.errors import QwenRefError

_STORED_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_HEADER_LIMIT = 100 * 2**20  # the safetensors format caps its JSON header at 100 MB
# Keys some exporters add that carry no weights (RoPE tables are recomputed from rope_theta).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def to_float32(w: np.ndarray) -> np.ndarray:
    """Widen a stored tensor to float32 exactly (bfloat16 words shift into the high half)."""
    if w.dtype == np.uint16:
        return (w.astype(np.uint32) << 16).view(np.float32)
    return w.astype(np.float32, copy=False)


def read_safetensors(path: Path, dtypes: dict[str, np.dtype] = _STORED_DTYPES) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as a read-only view of a memory map.

    `dtypes` maps the file's dtype names to NumPy dtypes; any other dtype is refused.
    """
    size = path.stat().st_size
    if size < 8:
        raise QwenRefError(f"{path}: truncated safetensors file ({size} bytes)")
    data = np.frombuffer(map_file(path), dtype=np.uint8)  # read-only, zero-copy
    (header_len,) = struct.unpack("<Q", data[:8].tobytes())
    if header_len > min(_HEADER_LIMIT, size - 8):
        raise QwenRefError(f"{path}: corrupt safetensors header (header length {header_len}, file size {size})")
    try:
        header = json.loads(data[8 : 8 + header_len].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QwenRefError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise QwenRefError(f"{path}: corrupt safetensors header (not a JSON object)")

    body_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise QwenRefError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        dtype = dtypes.get(dtype_name)
        if dtype is None:
            raise QwenRefError(f"{path}: tensor {name!r} has dtype {dtype_name}; only {', '.join(dtypes)} are supported")
        if body_start + end > size:
            raise QwenRefError(f"{path}: truncated file: tensor {name!r} ends at byte {body_start + end} of {size}")
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize or begin < 0:
            raise QwenRefError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} {dtype_name}")
        tensors[name] = data[body_start + begin : body_start + end].view(dtype).reshape(shape)
    return tensors


def map_file(path: Path) -> mmap.mmap:
    """The whole file, memory-mapped read-only, in 2 MB pages where the kernel can.

    A decode step streams every weight once; on 4 KB pages it measured 24-26 GB/s against 31-33 on
    huge pages (tools/bench.py). Linux maps a file's page-cache pages as 2 MB pages when the
    filesystem keeps them in large folios (seen with ext4 on Linux 6.18, for files read from disk)
    and the mapping asks for it. The pages stay the file's: nothing is copied, and they can still
    be evicted.
    """
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        mapped.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass  # not Linux, or a kernel without transparent huge pages: plain pages
    return mapped


def expected_shapes(config: QwenConfig) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor names (transformers' parameter names) and their shapes."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q_dim, D),
            p + "self_attn.q_proj.bias": (q_dim,),
            p + "self_attn.k_proj.weight": (kv_dim, D),
            p + "self_attn.k_proj.bias": (kv_dim,),
            p + "self_attn.v_proj.weight": (kv_dim, D),
            p + "self_attn.v_proj.bias": (kv_dim,),
            p + "self_attn.o_proj.weight": (D, q_dim),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        })
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those the shard index names, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise QwenRefError(f"{index}: unreadable shard index ({exc})") from None
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise QwenRefError(f"{index}: names shard {missing[0]} which is not in {model_dir}")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        hint = " (PyTorch .bin checkpoints are not supported)" if any(model_dir.glob("*.bin")) else ""
        raise QwenRefError(f"{model_dir}: no *.safetensors weights{hint}")
    return files


def load_weights(model_dir: Path, config: QwenConfig) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint by name, memory-mapped, checked against the config.

    Tied checkpoints may or may not carry `lm_head.weight`; when they do it is ignored, as
    transformers does, and the head reads `model.embed_tokens.weight`.
    """
    model_dir = Path(model_dir)
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, Path] = {}
    for path in _weight_files(model_dir):
        try:
            file_tensors = read_safetensors(path)
        except OSError as exc:
            raise QwenRefError(f"cannot read {path}: {exc.strerror or exc}") from None
        for name, array in file_tensors.items():
            if name in tensors:
                raise QwenRefError(f"{path}: tensor {name!r} is also in {origin[name]}")
            tensors[name], origin[name] = array, path

    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in tensors:
            raise QwenRefError(f"{model_dir}: tensor {name!r} is missing from the checkpoint")
        if tensors[name].shape != shape:
            raise QwenRefError(
                f"{origin[name]}: tensor {name!r} has shape {list(tensors[name].shape)}, config says {list(shape)}"
            )
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
    for name in tensors:
        if name not in expected and name not in tolerated and not name.endswith(_IGNORED_SUFFIXES):
            raise QwenRefError(f"{origin[name]}: unexpected tensor {name!r} (does config.json match the weights?)")
    return {name: tensors[name] for name in expected}
