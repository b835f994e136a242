"""The key/value cache: what attention needs from earlier tokens, preallocated once."""

import numpy as np

from qwen_ref.config import QwenConfig
from qwen_ref.errors import QwenRefError


class KVCache:
    """Keys and values (after RoPE) of every token seen so far, for every layer.

    `keys[i]` and `values[i]` are [Hkv, capacity, hd] float32, so one kv head's history is
    contiguous. `np.zeros` reserves the memory lazily: pages are committed only as tokens fill them.
    """

    def __init__(self, config: QwenConfig, capacity: int):
        shape = (config.num_hidden_layers, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = np.zeros(shape, dtype=np.float32)  # [L, Hkv, capacity, hd]
        self.values = np.zeros(shape, dtype=np.float32)  # [L, Hkv, capacity, hd]
        self.capacity = capacity
        self.length = 0  # tokens stored; the next token's position

    def reserve(self, n_tokens: int) -> None:
        """Fail cleanly before a forward pass that would not fit."""
        if self.length + n_tokens > self.capacity:
            raise QwenRefError(
                f"KV cache full: {self.length} tokens stored, {n_tokens} more do not fit in {self.capacity}"
            )
