"""The operations the model is written against, and the backends that implement them.

`numpy` is the readable specification (qwen_ref's own modules); `numba` runs the JIT kernels of the
top-level `jitkernels` package. Both take and return the same shapes and dtypes, so `model.py` is
written once.
"""

from __future__ import annotations

import functools
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
    kernels: str = ""  # which kernel runs where a backend has several, and why (numba: the prefill GEMM)


NUMPY = Backend(
    "numpy", linear=linear, linears=linears, rms_norm=rms_norm, apply_rope=apply_rope, attention=attention, swiglu=swiglu
)

BACKEND_NAMES = ("numpy", "numba")
# --kernels: which prefill GEMM and attention tiles the numba backend runs (jitkernels.choice; numpy has one)
KERNEL_CHOICES = ("auto", "numba-gemm", "blas-gemm")


def get_backend(name: str, kernels: str = "auto") -> Backend:
    """The backend called `name`; for numba, with the prefill GEMM that `kernels` names (KERNEL_CHOICES:
    auto lets $QWEN_REF_KERNELS, then a measurement cached per CPU, decide)."""
    if kernels not in KERNEL_CHOICES:
        raise QwenRefError(f"unknown kernels {kernels!r} (choose from {', '.join(KERNEL_CHOICES)})")
    if name == "numpy":
        return NUMPY
    if name == "numba":
        return _numba_backend(kernels)
    raise QwenRefError(f"unknown backend {name!r} (choose from {', '.join(BACKEND_NAMES)})")


def _numba_backend(kernels: str) -> Backend:
    """The JIT kernels of the `jitkernels` package, imported only when asked for, so that `import qwen_ref`
    stays light and the numpy backend works where Numba is missing or cannot compile."""
    try:
        import jitkernels
    except ImportError as exc:
        raise QwenRefError(f"the numba backend is unavailable: {exc}") from None
    try:
        choice = jitkernels.choose_gemm(kernels)
    except ValueError as exc:
        raise QwenRefError(str(exc)) from None
    return Backend(
        "numba",
        linear=functools.partial(jitkernels.linear, gemm=choice.gemm),
        linears=functools.partial(jitkernels.linears, gemm=choice.gemm),
        rms_norm=jitkernels.rms_norm,
        apply_rope=jitkernels.apply_rope,
        attention=functools.partial(jitkernels.attention, gemm=choice.attention),
        swiglu=functools.partial(jitkernels.swiglu, gemm=choice.gemm),
        decoder_stack=jitkernels.DecoderStack,
        kernels=f"prefill GEMM {choice}",
    )
