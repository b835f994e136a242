"""The SwiGLU gate of the MLP: the NumPy specification of the silu_mul kernel."""

import numpy as np


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, where silu(g) = g * sigmoid(g) (Qwen2MLP.forward, between gate/up and down_proj).

    gate, up: [T, F] float32.
    """
    with np.errstate(over="ignore"):  # exp(-g) overflows to inf for g << 0, where silu(g) is correctly -0
        return gate / (1.0 + np.exp(-gate)) * up  # [T, F]
