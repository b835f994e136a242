"""RMSNorm: the NumPy specification of the norm kernel."""

import numpy as np

from qwen_ref.weights import to_float32


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """weight * x / sqrt(mean(x^2) + eps) over the last axis (Qwen2RMSNorm.forward).

    x: [T, D] float32; weight: [D] stored dtype. transformers normalises in float32 and casts back
    to the activation dtype before multiplying by the weight; our activations are float32 throughout.
    """
    variance = np.mean(x * x, axis=-1, keepdims=True)  # [T, 1]
    return to_float32(weight) * (x * (1.0 / np.sqrt(variance + eps)))  # [T, D]
