"""Named traces: the intermediates of a forward pass under llama.cpp's Qwen2 graph names, and their files.

A trace holds tensors keyed `inp_embd`, `blk.N.NAME` for layer N and each NAME of `LAYER_NAMES`, then
`result_norm` and `result_output`, every one float32 with the prompt's positions first ([T, ...]).
`QwenModel` passes every intermediate to one hook, a `Recorder` (`QwenModel.recorder`); with no
recorder set nothing is recorded and the decode steps keep their fused kernel (`jitkernels.decode`).

Shapes (T positions, D hidden, H query heads, Hkv kv heads, hd head size, F intermediate, V vocab):
    inp_embd [T, D]; attn_norm [T, D]; Qcur, Qcur_rope [T, H, hd]; Kcur, Kcur_rope, Vcur [T, Hkv, hd];
    kqv_out [T, H*hd]; attn_out, ffn_inp, ffn_norm [T, D]; ffn_gate, ffn_up, ffn_act [T, F];
    ffn_out, l_out [T, D]; result_norm [T, D]; result_output [T, V].
Those are ggml's tensor layouts read in row-major order (ggml's ne0 is the last axis here).
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from qwen_ref.errors import QwenRefError
from qwen_ref.npz import save_npz
from qwen_ref.weights import read_safetensors, read_safetensors_metadata

# one decoder layer's intermediates in the order the forward pass makes them (Qwen2DecoderLayer.forward)
LAYER_NAMES = (
    "attn_norm",  # input_layernorm(x)
    "Qcur", "Kcur", "Vcur",  # q_proj, k_proj, v_proj with their biases, before RoPE
    "Qcur_rope", "Kcur_rope",  # after RoPE
    "kqv_out",  # attention output, heads concatenated, before o_proj
    "attn_out",  # o_proj(kqv_out)
    "ffn_inp",  # x + attn_out: the first residual sum
    "ffn_norm",  # post_attention_layernorm(ffn_inp)
    "ffn_gate", "ffn_up",  # gate_proj, up_proj
    "ffn_act",  # silu(ffn_gate) * ffn_up
    "ffn_out",  # down_proj(ffn_act)
    "l_out",  # ffn_inp + ffn_out: the layer's output
)
FIRST_NAMES = ("inp_embd",)  # before layer 0: the embedding rows of the tokens
LAST_NAMES = ("result_norm", "result_output")  # after the last layer: final norm, LM head (the logits)

# What each tensor is computed from, within its layer; "l_out-1" is the previous layer's l_out
# (inp_embd before layer 0). kqv_out reads the keys and values of every position, which the trace's
# Kcur_rope and Vcur hold (with a quantised KV cache, kqv_out is where its rounding shows).
INPUTS = {
    "attn_norm": ("l_out-1",),
    "Qcur": ("attn_norm",), "Kcur": ("attn_norm",), "Vcur": ("attn_norm",),
    "Qcur_rope": ("Qcur",), "Kcur_rope": ("Kcur",),
    "kqv_out": ("Qcur_rope", "Kcur_rope", "Vcur"),
    "attn_out": ("kqv_out",),
    "ffn_inp": ("l_out-1", "attn_out"),
    "ffn_norm": ("ffn_inp",),
    "ffn_gate": ("ffn_norm",), "ffn_up": ("ffn_norm",),
    "ffn_act": ("ffn_gate", "ffn_up"),
    "ffn_out": ("ffn_act",),
    "l_out": ("ffn_inp", "ffn_out"),
}

_KEY = re.compile(r"blk\.(\d+)\.(\w+)")


def trace_key(name: str, layer: int | None) -> str:
    """The tensor's key in a trace file: `blk.N.NAME` inside layer N, the bare name outside the layers."""
    return name if layer is None else f"blk.{layer}.{name}"


def parse_key(key: str) -> tuple[str, int | None]:
    """(name, layer) of a trace key; QwenRefError for a key that is not one of the names above."""
    match = _KEY.fullmatch(key)
    if match and match.group(2) in LAYER_NAMES:
        return match.group(2), int(match.group(1))
    if key in FIRST_NAMES or key in LAST_NAMES:
        return key, None
    raise QwenRefError(f"{key!r} is not a trace tensor name (inp_embd, blk.N.NAME, result_norm, result_output)")


def forward_order(keys: Iterable[str]) -> list[str]:
    """The keys sorted as the forward pass makes them: inp_embd, layer by layer, then the output."""

    def rank(key: str) -> tuple[int, int, int]:
        name, layer = parse_key(key)
        if layer is not None:
            return (1, layer, LAYER_NAMES.index(name))
        return (0, 0, 0) if name in FIRST_NAMES else (2, 0, LAST_NAMES.index(name))

    return sorted(keys, key=rank)


def input_keys(key: str) -> tuple[str, ...]:
    """The keys of the tensors `key` is computed from (result_norm's is the last layer's l_out, found by the caller)."""
    name, layer = parse_key(key)
    if layer is None:
        return {"inp_embd": (), "result_norm": (), "result_output": ("result_norm",)}[name]
    previous = "inp_embd" if layer == 0 else trace_key("l_out", layer - 1)
    return tuple(previous if n == "l_out-1" else trace_key(n, layer) for n in INPUTS[name])


def parse_layers(text: str, n_layers: int) -> list[int]:
    """`--layers`: layer numbers and ranges separated by commas ("0-3,7"), 0-based, ranges inclusive."""
    layers: set[int] = set()
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not match:
            raise QwenRefError(f"--layers: {item.strip()!r} is not a layer or a range A-B (e.g. 0-3,7)")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if first > last or last >= n_layers:
            raise QwenRefError(f"--layers: {item.strip()!r} is not within the model's layers 0-{n_layers - 1}")
        layers.update(range(first, last + 1))
    return sorted(layers)


def parse_names(text: str) -> list[str]:
    """`--names`: fnmatch patterns separated by commas ("Qcur*,l_out"), each matching at least one trace name."""
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    if not patterns:
        raise QwenRefError("--names: no pattern given (e.g. 'Qcur*,l_out')")
    every = FIRST_NAMES + LAYER_NAMES + LAST_NAMES
    for pattern in patterns:
        if not fnmatch.filter(every, pattern):
            raise QwenRefError(f"--names: {pattern!r} matches no trace name (names: {', '.join(every)})")
    return patterns


def values_per_position(name: str, H: int, Hkv: int, hd: int, D: int, F: int, V: int) -> int:
    """How many float32 values the tensor `name` holds per position (for the size of a trace before it runs)."""
    return {"Qcur": H * hd, "Qcur_rope": H * hd, "kqv_out": H * hd, "Kcur": Hkv * hd, "Kcur_rope": Hkv * hd,
            "Vcur": Hkv * hd, "ffn_gate": F, "ffn_up": F, "ffn_act": F, "result_output": V}.get(name, D)


class Hook(Protocol):
    """What `QwenModel.recorder` takes: `Recorder` keeps tensors, `qwen_ref.profile.Profile` times them."""

    def wants(self, name: str, layer: int | None) -> bool: ...

    def record(self, name: str, layer: int | None, value: np.ndarray) -> None: ...


class Recorder:
    """The hook `QwenModel` calls with every named intermediate; keeps those `layers` and `names` select.

    layers: the layer numbers to keep (None: all); names: fnmatch patterns over the names above, the
    global names included (None: all). A prompt run in several forward calls (chunks) is recorded
    as one trace: each tensor's rows are joined in the order they come.
    """

    def __init__(self, layers: Iterable[int] | None = None, names: Iterable[str] | None = None):
        self.layers = None if layers is None else frozenset(layers)
        self.names = None if names is None else tuple(names)
        self._parts: dict[str, list[np.ndarray]] = {}

    def wants(self, name: str, layer: int | None) -> bool:
        """Whether `record(name, layer, ...)` would keep the tensor: the model skips work for names nobody wants."""
        if layer is not None and self.layers is not None and layer not in self.layers:
            return False
        return self.names is None or any(fnmatch.fnmatchcase(name, p) for p in self.names)

    def record(self, name: str, layer: int | None, value: np.ndarray) -> None:
        """Keep a float32 copy of `value` under its trace key, if selected."""
        if self.wants(name, layer):
            self._parts.setdefault(trace_key(name, layer), []).append(np.array(value, dtype=np.float32))

    def tensors(self) -> dict[str, np.ndarray]:
        """The recorded tensors in forward order, the rows of each call joined: {key: [T, ...]}."""
        return {key: np.concatenate(self._parts[key]) for key in forward_order(self._parts)}


# ---------------------------------------------------------------------------------------------------
# Trace files: .safetensors (F32 tensors, metadata in the header's __metadata__) or .npz (metadata as a
# JSON string in the member __metadata__).


@dataclass(frozen=True)
class Trace:
    tensors: dict[str, np.ndarray]  # {trace key: float32 [T, ...]} in forward order
    metadata: dict[str, str] = field(default_factory=dict)  # qwen_ref_version, backend, weights_dtype, ...


def save_trace(path: Path, trace: Trace) -> None:
    """Write a trace as .safetensors or .npz, chosen by the suffix."""
    path = Path(path)
    tensors = {key: np.ascontiguousarray(trace.tensors[key], dtype=np.float32) for key in forward_order(trace.tensors)}
    if path.suffix == ".npz":
        save_npz(path, tensors | {"__metadata__": np.array(json.dumps(trace.metadata))})
    elif path.suffix == ".safetensors":
        _write_safetensors(path, tensors, trace.metadata)
    else:
        raise QwenRefError(f"{path}: a trace is written as .safetensors or .npz")


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    for key, value in tensors.items():
        header[key] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header so tensor data is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for value in tensors.values():
            f.write(value.astype("<f4", copy=False).tobytes())


def load_trace(path: Path) -> Trace:
    """A trace file's tensors (as float32) and metadata; QwenRefError for anything that is not a trace."""
    path = Path(path)
    if not path.is_file():
        raise QwenRefError(f"{path}: no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError) as exc:
            raise QwenRefError(f"{path}: not a readable .npz file ({exc})") from None
        raw = arrays.pop("__metadata__", None)
        try:
            metadata = {} if raw is None else json.loads(str(raw))
        except ValueError:
            raise QwenRefError(f"{path}: its __metadata__ is not JSON") from None
    elif path.suffix == ".safetensors":
        arrays = read_safetensors(path, {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8")})
        metadata = read_safetensors_metadata(path)
    else:
        raise QwenRefError(f"{path}: want a trace as .safetensors or .npz")
    if not arrays:
        raise QwenRefError(f"{path}: holds no tensors")
    for key, value in arrays.items():
        parse_key(key)
        if value.dtype.kind != "f":
            raise QwenRefError(f"{path}: tensor {key!r} has dtype {value.dtype}, want a float type")
    tensors = {key: np.asarray(arrays[key], dtype=np.float32) for key in forward_order(arrays)}
    return Trace(tensors, {str(k): str(v) for k, v in metadata.items()})
