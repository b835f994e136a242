"""Numba kernels for a transformer forward pass on the CPU: plain functions on NumPy arrays.

Each public kernel has a NumPy twin in `qwen_ref` that is its specification (named in its
docstring); tests/test_kernels.py checks that the two agree. Weights may be float32, float16, or
bfloat16 held as raw uint16 words; activations are float32. The operations of a model backend
(linear, linears, rms_norm, apply_rope, attention, swiglu) return new arrays and never write into
their inputs; widen_rows fills the array it is given. `DecoderStack` runs a decode step's decoder
layers with those kernels in one call, writing the step's keys and values into the cache.

Every kernel is compiled with `cache=True`: the first process compiles (tens of seconds), later
ones load machine code from `__pycache__` beside these files, or from NUMBA_CACHE_DIR. Numba checks
only the file a cached function is written in: after editing a module that others call (widen,
exp, silu, microkernel, registers; and matmul, norm, rope, attention, which decode calls), delete
`kernels/__pycache__`, or the callers keep the old code. With
NUMBA_DISABLE_JIT=1 the same code runs as plain Python, slowly, for stepping through in a debugger.
"""

from kernels.attention import attention
from kernels.decode import DecoderStack
from kernels.matmul import linear, linears, swiglu
from kernels.norm import rms_norm
from kernels.rope import apply_rope
from kernels.widen import widen_rows

__all__ = ["DecoderStack", "apply_rope", "attention", "linear", "linears", "rms_norm", "swiglu", "widen_rows"]
