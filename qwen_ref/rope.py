"""Rotary position embedding (RoPE), the NumPy specification of the rope kernel.

Qwen rotates element j of a head together with element j + hd/2 (transformers' `rotate_half`),
not neighbouring pairs as llama2.c does. Angles are position x frequency products in float32, as
`Qwen2RotaryEmbedding` computes them: at position 32,000 one float32 ulp of an angle is 0.004 rad,
so an angle computed in float64 would differ visibly from the reference.

The inverse frequencies need more care than their formula suggests. An ulp of a frequency near 1
is 6e-8, which position 32,000 turns into 2e-3 rad. NumPy's float32 `pow` is up to 2 ulp off (14 of
the 64 frequencies of head_dim 128, theta 1e6), which put cos and sin 2e-3 away from transformers'
at positions 30,000-32,767 and the logits of a random model 3.6x the tolerance. theta^x is therefore
a float64 power rounded once to float32 (correctly rounded). PyTorch's own float32 `pow` rounds the
other way where theta^x lies within 0.08 ulp of a float32 midpoint (1 of the 64 frequencies of
head_dim 128 with theta 1e6 or 5e6); no portable computation reproduces that, and it costs 0.09 of
the tolerance at those positions with theta 5e6 (tests/test_long_context.py).
"""

import numpy as np


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2i / hd) for i < hd/2 in float32 (Qwen2RotaryEmbedding.compute_default_rope_parameters).

    The exponent and the reciprocal are float32 operations, as in transformers; the power is exact
    to float32 rounding (module docstring).
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)  # [hd/2]
    base = np.float64(np.float32(theta))  # transformers raises a float32 theta
    power = (base ** exponent.astype(np.float64)).astype(np.float32)  # [hd/2] theta^x, one rounding
    return np.float32(1.0) / power  # [hd/2]


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
