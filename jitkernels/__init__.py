"""Numba kernels for a transformer forward pass on the CPU: plain functions on NumPy arrays.

Each public kernel has a NumPy twin in `qwen_ref` that is its specification (named in its
docstring); tests/test_kernels.py checks that the two agree. Weights and KV caches may be float32,
float16, or bfloat16 held as raw uint16 words; activations are float32. The operations of a model
backend (linear, linears, rms_norm, apply_rope, attention, swiglu) return new arrays and never write
into their inputs; widen_rows fills the array it is given. `DecoderStack` runs a decode step's
decoder layers with those kernels in one call, writing the step's keys and values into the cache.
The products of T >= 4 rows (the prefill) have two kernels, Numba's own or widen-then-BLAS; `choose_gemm`
picks one for the host (`choice.py`) and `linear`, `linears` and `swiglu` take it as `gemm=`.

Every kernel is compiled with `cache=CACHE` (see `cache.py`): the first process compiles (tens of
seconds, announced on stderr), later ones load machine code from a per-user cache folder keyed by
these sources, so an edit to any module recompiles its callers too. With NUMBA_DISABLE_JIT=1 the
same code runs as plain Python, slowly, for stepping through in a debugger.
"""

from jitkernels import cache

with cache.numba_cache_dir():  # every kernel module is first imported here, so all are cached there
    from jitkernels.attention import attention
    from jitkernels.choice import KERNEL_CHOICES, choose_gemm
    from jitkernels.decode import DecoderStack
    from jitkernels.matmul import linear, linears, swiglu
    from jitkernels.norm import rms_norm
    from jitkernels.rope import apply_rope
    from jitkernels.widen import widen_rows
cache.install_listeners()

__all__ = ["KERNEL_CHOICES", "DecoderStack", "apply_rope", "attention", "choose_gemm", "linear", "linears", "rms_norm",
           "swiglu", "widen_rows"]
