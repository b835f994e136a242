"""The operations the model is written against, and the backends that implement them.

`numpy` is the readable specification (qwen_ref's own modules); `numba` runs the JIT kernels of the
top-level `jitkernels` package. Both take and return the same shapes and dtypes, so `model.py` is
written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qwen_ref.attention import attention
from qwen_ref.errors import QwenRefError
from qwen_ref.linear import linear, linears
from qwen_ref.mlp import swiglu
from qwen_ref.rms_norm import rms_norm
from qwen_ref.rope import apply_rope


@dataclass(frozen=True)
class Backend:
    name: str
    linear: Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]  # ([T,in], [out,in], [out]) -> [T,out]
    # several projections of one input, weights of one dtype: ([T,in], ([out_i,in], ...), ([out_i] | None, ...)) -> ([T,out_i], ...)
    linears: Callable[[np.ndarray, tuple, tuple], tuple]
    rms_norm: Callable[[np.ndarray, np.ndarray, float], np.ndarray]  # ([T,D], [D], eps) -> [T,D]
    apply_rope: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # ([T,n,hd], [T,hd/2] x2) -> [T,n,hd]
    attention: Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]  # ([T,H,hd], [Hkv,cap,hd] x2, S) -> [T,H*hd]
    swiglu: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # ([T,D], [F,D] x2) -> [T,F]
    # optional: the decoder layers of a one-token step in one call (see jitkernels.decode.DecoderStack);
    # (per-layer weight dicts, H, Hkv, eps) -> a callable (x [1,D], keys, values, past, cos, sin) -> [1,D].
    # A backend that wraps another's operations (rounding or timing them) sets it to None, so that its
    # own operations are the ones that run (QwenModel.fused_decode).
    decoder_stack: Callable | None = None


NUMPY = Backend(
    "numpy", linear=linear, linears=linears, rms_norm=rms_norm, apply_rope=apply_rope, attention=attention, swiglu=swiglu
)

BACKEND_NAMES = ("numpy", "numba")


def get_backend(name: str) -> Backend:
    """The backend called `name`."""
    if name == "numpy":
        return NUMPY
    if name == "numba":
        return _numba_backend()
    raise QwenRefError(f"unknown backend {name!r} (choose from {', '.join(BACKEND_NAMES)})")


def _numba_backend() -> Backend:
    """The JIT kernels of the `jitkernels` package, imported only when asked for, so that `import qwen_ref`
    stays light and the numpy backend works where Numba is missing or cannot compile."""
    try:
        import jitkernels
    except ImportError as exc:
        raise QwenRefError(f"the numba backend is unavailable: {exc}") from None
    return Backend(
        "numba",
        linear=jitkernels.linear,
        linears=jitkernels.linears,
        rms_norm=jitkernels.rms_norm,
        apply_rope=jitkernels.apply_rope,
        attention=jitkernels.attention,
        swiglu=jitkernels.swiglu,
        decoder_stack=jitkernels.DecoderStack,
    )
