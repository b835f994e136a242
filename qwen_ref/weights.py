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
import math
import mmap
import struct
from pathlib import Path

import numpy as np

from qwen_ref.config import QwenConfig
from qwen_ref.errors import QwenRefError

_STORED_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_DTYPE_NAMES = {dtype: name for name, dtype in _STORED_DTYPES.items()}
_HEADER_LIMIT = 100 * 2**20  # the safetensors format caps its JSON header at 100 MB
# Keys some exporters add that carry no weights (RoPE tables are recomputed from rope_theta).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def to_float32(w: np.ndarray) -> np.ndarray:
    """Widen a stored tensor to float32 exactly (bfloat16 words shift into the high half)."""
    if w.dtype == np.uint16:
        return (w.astype(np.uint32) << 16).view(np.float32)
    return w.astype(np.float32, copy=False)


def weights_dtype(weights: dict[str, np.ndarray]) -> str:
    """The safetensors name (F32, F16, BF16) of the dtype the weights are stored in: one per checkpoint."""
    return _DTYPE_NAMES[next(iter(weights.values())).dtype]


def read_safetensors(path: Path, dtypes: dict[str, np.dtype] = _STORED_DTYPES) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as a read-only view of a memory map.

    `dtypes` maps the file's dtype names to NumPy dtypes; any other dtype is refused. The header is
    checked as the format defines it, field by field, before any view is made: a corrupt or
    hostile file gets an error naming the tensor and the field, never a view past the file.
    """
    size = path.stat().st_size
    if size < 8:
        raise QwenRefError(f"{path}: truncated safetensors file ({size} bytes)")
    data = np.frombuffer(map_file(path), dtype=np.uint8)  # read-only, zero-copy
    header, header_len = _header(path, data)
    body = data[8 + header_len :]  # the tensors' bytes; data_offsets count from here
    entries = {
        name: _tensor_entry(info, dtypes, len(body), f"{path}: tensor {name!r}")
        for name, info in header.items()
        if name != "__metadata__"
    }
    _check_layout(path, entries, len(body))
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        try:
            tensors[name] = body[begin:end].view(dtype).reshape(shape)
        except ValueError:  # sizes agree, so only an empty tensor with absurd dimensions gets here
            raise QwenRefError(f"{path}: tensor {name!r} has an unusable shape {_short(shape)}") from None
    return tensors



def _header(path: Path, data: np.ndarray) -> tuple[dict, int]:
    """The JSON header of a safetensors file's bytes, and its length; refused unless it is a JSON object."""
    size = len(data)
    (header_len,) = struct.unpack("<Q", data[:8].tobytes())
    if header_len > min(_HEADER_LIMIT, size - 8):
        raise QwenRefError(f"{path}: corrupt safetensors header (header length {header_len}, file size {size})")
    try:
        header = json.loads(data[8 : 8 + header_len].tobytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an int too long
        raise QwenRefError(f"{path}: corrupt safetensors header ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise QwenRefError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, header_len


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file: {tensor name: {dtype, shape, data_offsets}, "__metadata__": ...}."""
    if path.stat().st_size < 8:
        raise QwenRefError(f"{path}: truncated safetensors file ({path.stat().st_size} bytes)")
    return _header(path, np.frombuffer(map_file(path), dtype=np.uint8))[0]


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The string-to-string `__metadata__` of a .safetensors file's header ({} when it has none)."""
    metadata = read_safetensors_header(path).get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise QwenRefError(f"{path}: corrupt safetensors header (__metadata__ is not a map of strings)")
    return metadata


def _short(value: object) -> str:
    """A header value for an error message, cut to stay on one line."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):  # an int too long to print, or nesting too deep
        return f"a JSON {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def _tensor_entry(info: object, dtypes: dict[str, np.dtype], body_size: int, where: str) -> tuple:
    """(dtype, shape, begin, end) of one header entry, each field's type and value checked."""
    if not isinstance(info, dict):
        raise QwenRefError(f"{where}: header entry must be an object, not {_short(info)}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise QwenRefError(f"{where}: header entry has no {field!r}")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str):
        raise QwenRefError(f"{where}: dtype must be a string, not {_short(dtype_name)}")
    if dtype_name not in dtypes:
        raise QwenRefError(f"{where}: dtype {_short(dtype_name)} is not supported (only {', '.join(dtypes)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise QwenRefError(f"{where}: shape must be a list of non-negative integers, not {_short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise QwenRefError(f"{where}: data_offsets must be two integers [begin, end], 0 <= begin <= end, "
                           f"not {_short(offsets)}")
    begin, end = offsets
    if end > body_size:
        raise QwenRefError(f"{where}: truncated file: data_offsets end at byte {end} of {body_size} data bytes")
    dtype = dtypes[dtype_name]
    if end - begin != math.prod(shape) * dtype.itemsize:  # Python ints: no overflow on absurd shapes
        raise QwenRefError(f"{where}: data_offsets give {end - begin} bytes, shape {_short(shape)} "
                           f"{dtype_name} needs {math.prod(shape) * dtype.itemsize}")
    return dtype, shape, begin, end


def _check_layout(path: Path, entries: dict[str, tuple], body_size: int) -> None:
    """The format's rule: tensors tile the data bytes in order, with no overlap, gap or trailing bytes."""
    expected_begin, previous = 0, "the start of the data"
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != expected_begin:
            kind = "overlaps" if begin < expected_begin else "leaves a gap after"
            raise QwenRefError(f"{path}: tensor {name!r} (data_offsets [{begin}, {end}]) {kind} {previous}")
        expected_begin, previous = end, f"tensor {name!r}"
    if expected_begin != body_size:
        raise QwenRefError(f"{path}: {body_size - expected_begin} bytes after the last tensor's data (corrupt file?)")


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


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those the shard index names, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
            raise QwenRefError(f"{index}: unreadable shard index ({type(exc).__name__})") from None
        outside = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
        if outside:
            raise QwenRefError(f"{index}: shard name {outside[0]!r} is not a file name in the checkpoint folder")
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
    for path in weight_files(model_dir):
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
    first = "model.embed_tokens.weight"
    for name in expected:  # the kernels take a layer's weights and biases in one dtype
        if tensors[name].dtype != tensors[first].dtype:
            raise QwenRefError(
                f"{origin[name]}: tensor {name!r} is {_DTYPE_NAMES[tensors[name].dtype]} but {first!r} is "
                f"{_DTYPE_NAMES[tensors[first].dtype]}: every weight must be stored in one dtype"
            )
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
    for name in tensors:
        if name not in expected and name not in tolerated and not name.endswith(_IGNORED_SUFFIXES):
            raise QwenRefError(f"{origin[name]}: unexpected tensor {name!r} (does config.json match the weights?)")
    return {name: tensors[name] for name in expected}
