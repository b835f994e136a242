"""The SwiGLU gate of the MLP: the NumPy specification of the swiglu kernel."""

import numpy as np

from qwen_ref.linear import linear


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, where silu(g) = g * sigmoid(g) (Qwen2MLP.forward, between gate/up and down_proj).

    gate, up: [T, F] float32.
    """
    with np.errstate(over="ignore"):  # exp(-g) overflows to inf for g << 0, where silu(g) is correctly -0
        return gate / (1.0 + np.exp(-gate)) * up  # [T, F]


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray) -> np.ndarray:
    """silu(gate_proj(x)) * up_proj(x): Qwen2MLP.forward up to down_proj. x: [T, D]; returns [T, F]."""
    return silu_mul(linear(x, w_gate), linear(x, w_up))  # ffn_gate, ffn_up [T, F] each
