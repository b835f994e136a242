"""Backends that round as other engines do, to tell their expected differences from bugs (`qwen-ref compare`).

llama.cpp with bf16 weights rounds each matmul's input activations to bf16 before the product (its
bf16 dot products take two bf16 operands) and accumulates in float32. `bf16_activations(backend)`
does the same around any backend's projections: what such an engine should differ by from the
float32 reference, the DRIFT class of `qwen_ref.verdict`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen_ref.backends import Backend
from qwen_ref.kv_cache import round_to_kv_dtype
from qwen_ref.weights import to_float32


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to nearest-even bfloat16, widened back to float32 (same shape)."""
    return to_float32(round_to_kv_dtype(x, "bfloat16"))


def bf16_activations(backend: Backend) -> Backend:
    """`backend` with the input of every projection (q/k/v, o, gate/up, down, LM head) rounded to bfloat16.

    Attention's own products stay float32, as in llama.cpp's CPU attention with a float32 cache. The
    fused one-call decode is switched off (`decoder_stack=None`): it would skip the rounding.
    """
    return dataclasses.replace(
        backend,
        name=f"{backend.name}+bf16-activations",
        decoder_stack=None,
        linear=lambda x, w, b: backend.linear(round_to_bf16(x), w, b),
        linears=lambda x, ws, bs: backend.linears(round_to_bf16(x), ws, bs),
        swiglu=lambda x, w_gate, w_up: backend.swiglu(round_to_bf16(x), w_gate, w_up),
    )
