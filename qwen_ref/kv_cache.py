"""The key/value cache: what attention needs from earlier tokens, preallocated once, in float32 or 16 bits.

A 16-bit cache (llama.cpp's `--cache-type-k/-v bf16|f16`) halves the memory and what every decode step
reads of it: keys and values are rounded to nearest even when written and widened exactly when read.
bfloat16 keeps float32's range with 8 significant bits (relative rounding error at most 2^-8, half
a unit in the last of them); float16 keeps 11 (2^-11) but overflows to inf from 65520 up and loses
relative precision below 2^-14.
"""

import numpy as np

from qwen_ref.config import QwenConfig
from qwen_ref.errors import QwenRefError

# What each cache dtype stores, as qwen_ref stores weights: bfloat16 as raw uint16 words (NumPy has no bfloat16)
KV_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16)}
DEFAULT_KV_DTYPE = "float32"  # exact against transformers' float32 cache


def check_kv_dtype(kv_dtype: str) -> np.dtype:
    """The NumPy dtype a cache of `kv_dtype` stores, or one clear error."""
    if kv_dtype not in KV_DTYPES:
        raise QwenRefError(f"unknown KV cache dtype {kv_dtype!r} (choose from {', '.join(KV_DTYPES)})")
    return KV_DTYPES[kv_dtype]


def kv_bytes_per_token(config: QwenConfig, kv_dtype: str = DEFAULT_KV_DTYPE) -> int:
    """Keys and values of one token in every layer: 2 x L x Hkv x hd elements of the cache dtype."""
    itemsize = check_kv_dtype(kv_dtype).itemsize
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


def round_to_kv_dtype(x: np.ndarray, kv_dtype: str) -> np.ndarray:
    """float32 values as the cache stores them, rounded to nearest even (float32: x itself).

    bfloat16: the high half of the float32 bits after adding half a unit of the low half (minus one
    where the kept half is even, so that ties go to even); a carry out of the largest finite value
    gives inf, as rounding should. A nan stays a nan of the same sign, quiet. float16: NumPy's conversion.
    """
    x = np.asarray(x, dtype=np.float32)
    if kv_dtype == "float32":
        return x
    if kv_dtype == "float16":
        with np.errstate(over="ignore"):  # beyond 65504: inf, float16's defined result
            return x.astype(np.float16)
    check_kv_dtype(kv_dtype)
    bits = x.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16  # no nan: no carry past 32 bits
    quiet_nan = (bits >> 16) | np.uint32(0x0040)
    return np.where(np.isnan(x), quiet_nan, rounded).astype(np.uint16)


class KVCache:
    """Keys and values (after RoPE) of every token seen so far, for every layer.

    `keys[i]` and `values[i]` are [Hkv, capacity, hd] of the cache dtype (float32; bfloat16 as uint16
    words; float16), so one kv head's history is contiguous. `np.zeros` reserves the memory lazily:
    pages are committed only as tokens fill them.
    """

    def __init__(self, config: QwenConfig, capacity: int, kv_dtype: str = DEFAULT_KV_DTYPE):
        dtype = check_kv_dtype(kv_dtype)
        shape = (config.num_hidden_layers, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = np.zeros(shape, dtype=dtype)  # [L, Hkv, capacity, hd]
        self.values = np.zeros(shape, dtype=dtype)  # [L, Hkv, capacity, hd]
        self.kv_dtype = kv_dtype
        self.capacity = capacity
        self.length = 0  # tokens stored; the next token's position

    def reserve(self, n_tokens: int) -> None:
        """Fail cleanly before a forward pass that would not fit."""
        if self.length + n_tokens > self.capacity:
            raise QwenRefError(
                f"KV cache full: {self.length} tokens stored, {n_tokens} more do not fit in {self.capacity}"
            )

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store the keys and values k, v [Hkv, T, hd] float32 of positions start .. start+T-1 of a layer."""
        end = start + k.shape[1]
        self.keys[layer, :, start:end] = round_to_kv_dtype(k, self.kv_dtype)
        self.values[layer, :, start:end] = round_to_kv_dtype(v, self.kv_dtype)

    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on: the next forward pass writes there.

        A prompt that begins with the cached tokens' first `length` then reuses their keys and values.
        The slots past `length` keep their stale values until overwritten; attention reads only up
        to the new tokens' end, so they are never seen.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate: length {length} outside 0..{self.length}")
        self.length = length
