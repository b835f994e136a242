"""Write a random-weight Qwen2ForCausalLM checkpoint of a published Qwen1.5 shape, with NumPy alone.

For memory and speed measurements on the exact shapes people run, without downloading weights:
    python tools/make_checkpoint.py --shape 0.5b --dtype bfloat16 --out /tmp/qwen1.5-0.5b-bf16
    python tools/make_checkpoint.py --shape 32b --layers 2 --out /tmp/qwen1.5-32b-2layers  # a slice
    python tools/make_checkpoint.py --shape 110b --config-only --out /tmp/qwen1.5-110b  # to size it

The folder is what transformers' save_pretrained writes: config.json (the published values, see
qwen_ref/published.py), generation_config.json, the Qwen1.5 tokenizer files, and the weights as one
model.safetensors or as shards model-0000i-of-0000N.safetensors with model.safetensors.index.json
(shards cut as huggingface_hub cuts them: tensors in order, a new shard when the next would pass
--shard-gb). Each tensor is generated and written a chunk of rows at a time, so memory stays near one
chunk (16 MB) whatever the shape: the 110B's embedding alone is 2.5 GB in bf16. The values come from
one random stream in file order, so a --layers slice holds the same embedding and first layers as the
whole model written with the same --seed. Before writing, the free disk space is checked.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this tree's qwen_ref, whatever is installed

from qwen_ref.config import QwenConfig  # noqa: E402
from qwen_ref.published import BOS_EOS_ID, PUBLISHED  # noqa: E402
from qwen_ref.weights import expected_shapes  # noqa: E402

TOKENIZER = REPO / "tests" / "data" / "qwen1.5-tokenizer"
# torch_dtype -> (safetensors dtype, how the bytes are made: bf16 as raw 16-bit words)
DTYPES = {"float32": ("F32", np.dtype("<f4")), "float16": ("F16", np.dtype("<f2")),
          "bfloat16": ("BF16", np.dtype("<u2"))}
CHUNK_VALUES = 1 << 22  # float32 values generated at once: 16 MB
# `tiny`, for smoke tests of the tools that use these checkpoints: 10M parameters, grouped-query
# attention, and the full vocabulary, so that the tokenizer still fits.
TINY = {**PUBLISHED["0.5b"].config_json(), "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_window_layers": 2}
SHAPES = sorted(PUBLISHED, key=lambda name: float(name[:-1])) + ["tiny"]


def config_json(shape: str, dtype: str, layers: int | None = None) -> dict:
    """config.json of a shape saved in `dtype`; with `layers`, of its first `layers` decoder layers."""
    config = dict(TINY) if shape == "tiny" else PUBLISHED[shape].config_json()
    config["torch_dtype"] = dtype
    if layers is not None:
        if not 1 <= layers <= config["num_hidden_layers"]:
            raise ValueError(f"--layers {layers}: {shape} has layers 1 to {config['num_hidden_layers']}")
        config["num_hidden_layers"] = layers
    return config


# ---------------------------------------------------------------------------------------------------
# The file layout, known in full before a byte is written


def tensor_order(config: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor and its shape: the embedding, the layers in order, then the final norm and the LM head,
    as transformers' state_dict has them."""
    shapes = expected_shapes(config)
    last = [name for name in ("model.norm.weight", "lm_head.weight") if name in shapes]
    return {**{n: s for n, s in shapes.items() if n not in last}, **{n: shapes[n] for n in last}}


def plan_shards(tensors: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, as huggingface_hub's split_state_dict_into_shards_factory cuts them: in order,
    a new shard when the next tensor would pass `shard_bytes`, and a bigger tensor in a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, shape in tensors.items():
        nbytes = math.prod(shape) * itemsize
        if nbytes > shard_bytes:
            shards.append([name])
            continue
        if size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current] if current else shards


def shard_names(n_shards: int) -> list[str]:
    """The file names save_pretrained gives `n_shards` shards."""
    if n_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


def safetensors_header(tensors: dict[str, tuple[int, ...]], names: list[str], dtype: str) -> bytes:
    """The 8-byte length and JSON header of a file holding `names`, padded so the data is 8-byte aligned."""
    stored, np_dtype = DTYPES[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}  # what save_pretrained writes; transformers checks it
    offset = 0
    for name in names:
        end = offset + math.prod(tensors[name]) * np_dtype.itemsize
        header[name] = {"dtype": stored, "shape": list(tensors[name]), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


# ---------------------------------------------------------------------------------------------------
# Random values, written as they are made


def bf16_words(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16, ties to even, as raw 16-bit words (finite x only)."""
    bits = x.view(np.uint32)
    bits += 0x7FFF + ((bits >> 16) & 1)  # in place: x is a scratch chunk. No finite value carries past 2**32.
    return (bits >> 16).astype(np.uint16)


def value_chunks(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> Iterator[np.ndarray]:
    """float32 values of one tensor, a block of rows at a time.

    Norm weights near 1 and non-zero biases (as tests/helpers.random_checkpoint makes them); every matrix
    [out, in] ~ N(0, 1/in), which keeps each projection's output, and so the logits, near unit scale.
    """
    if len(shape) == 1:
        values = rng.standard_normal(shape, dtype=np.float32)
        yield 1 + 0.2 * values if name.endswith("norm.weight") else 0.3 * values
        return
    rows, cols = shape
    std = np.float32(1 / math.sqrt(cols))
    step = max(1, CHUNK_VALUES // cols)
    for start in range(0, rows, step):
        values = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        values *= std
        yield values


def write_shard(path: Path, header: bytes, tensors: dict[str, tuple[int, ...]], names: list[str], dtype: str,
                rng: np.random.Generator) -> None:
    np_dtype = DTYPES[dtype][1]
    with open(path, "wb") as f:
        f.write(header)
        for name in names:
            for values in value_chunks(name, tensors[name], rng):
                words = bf16_words(values) if dtype == "bfloat16" else values.astype(np_dtype, copy=False)
                f.write(words.tobytes())


# ---------------------------------------------------------------------------------------------------
# The checkpoint folder


def write_checkpoint(out: Path, config: dict, shard_bytes: int = 5 * 10**9, seed: int = 0,
                     config_only: bool = False) -> dict:
    """Write the folder; refuses (ValueError) a non-empty `out` or a disk without room. What it wrote."""
    dtype = config["torch_dtype"]
    tensors = tensor_order(QwenConfig.from_dict(config))
    itemsize = DTYPES[dtype][1].itemsize
    shards = [] if config_only else plan_shards(tensors, itemsize, shard_bytes)
    files = dict(zip(shard_names(len(shards)), shards, strict=True))
    headers = {file: safetensors_header(tensors, names, dtype) for file, names in files.items()}
    data_bytes = {file: sum(math.prod(tensors[n]) for n in names) * itemsize for file, names in files.items()}
    sizes = {file: len(headers[file]) + data_bytes[file] for file in files}
    tokenizer_json = lzma.decompress((TOKENIZER / "tokenizer.json.xz").read_bytes())

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is not an empty folder")
    check_free_space(out, sum(sizes.values()) + len(tokenizer_json))
    out.mkdir(parents=True, exist_ok=True)

    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # greedy, stopping at <|im_end|> (151645, the end of a chat turn) or <|endoftext|>
    generation = {"bos_token_id": BOS_EOS_ID, "eos_token_id": [151645, BOS_EOS_ID], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "tokenizer.json").write_bytes(tokenizer_json)
    shutil.copyfile(TOKENIZER / "tokenizer_config.json", out / "tokenizer_config.json")
    rng = np.random.default_rng(seed)
    for file, names in files.items():
        write_shard(out / file, headers[file], tensors, names, dtype, rng)
        print(f"wrote {out / file} ({sizes[file] / 1e9:.2f} GB)", file=sys.stderr, flush=True)
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(data_bytes.values()),
                         "total_parameters": sum(math.prod(shape) for shape in tensors.values())},
            "weight_map": {name: file for file, names in files.items() for name in names},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"out": str(out), "dtype": dtype, "num_hidden_layers": config["num_hidden_layers"],
            "files": list(files), "safetensors_bytes": sum(sizes.values())}


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse (ValueError, with both sizes) to start a write the disk has no room for."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())  # `folder` may be made later
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ValueError(f"needs {needed / 1e9:.2f} GB in {folder}, but only {free / 1e9:.2f} GB are free")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main() -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, required=True, help="a published Qwen1.5 size, or tiny")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    parser.add_argument("--layers", type=int, help="write only the first N decoder layers (default: all)")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest shard in GB of 1e9 bytes, one file "
                        "if all fit (default: %(default)s, transformers 4's default)")
    parser.add_argument("--config-only", action="store_true", help="config.json and tokenizer, no weights")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    args = parser.parse_args()
    if args.shard_gb <= 0:
        parser.error(f"--shard-gb wants a positive size, got {args.shard_gb}")
    try:
        config = config_json(args.shape, args.dtype, args.layers)
        written = write_checkpoint(args.out, config, int(args.shard_gb * 1e9), args.seed, args.config_only)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except OSError as exc:
        parser.exit(2, f"{parser.prog}: error: cannot write {args.out}: {exc.strerror or exc}\n")
    print(json.dumps({"shape": args.shape, **written}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
