"""Rotary position embedding (RoPE), the NumPy specification of the rope kernel.

Qwen rotates element j of a head together with element j + hd/2 (transformers' `rotate_half`),
not neighbouring pairs as llama2.c does. Angles are computed in float32 exactly the way
`Qwen2RotaryEmbedding` does (inverse frequencies and position x frequency products in float32),
because at long contexts a float64 angle would differ visibly from the reference.
"""

import numpy as np


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2i / hd) for i < hd/2, in float32 (Qwen2RotaryEmbedding.compute_default_rope_parameters)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)  # [hd/2]
    return np.float32(1.0) / (np.float32(theta) ** exponent)  # [hd/2]


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position x frequency, in float32 (Qwen2RotaryEmbedding.forward), one half-table each."""
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x * cos + rotate_half(x) * sin (apply_rotary_pos_emb), for each head.

    x: [T, n_heads, hd] float32; cos, sin: [T, hd/2]. Returns a new array; x is left as it was.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [T, n_heads, hd/2] each
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, hd/2]: the same angle for every head
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)  # [T, n_heads, hd]
