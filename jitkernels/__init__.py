"""Numba kernels for a transformer forward pass on the CPU: plain functions on NumPy arrays.

Each public kernel has a NumPy twin in `qwen_ref` that is its specification (named in its
docstring); tests/test_kernels.py checks that the two agree. Weights and KV caches may be float32,
float16, or bfloat16 held as raw uint16 words; activations are float32. The operations of a model
backend (linear, linears, rms_norm, apply_rope, attention, swiglu) return new arrays and never write
into their inputs; widen_rows fills the array it is given. No kernel knows a checkpoint, a config or
qwen_ref; one module composes them into a layer: `decode.py`'s `DecoderStack`, a decode step's
pre-norm decoder layers in one call. `attention.py` deals attention's work items to threads,
`attention_items.py` computes one. The prefill's products (T >= 4 rows, and attention over a chunk)
have two kernels, Numba's own or (widen-then-)BLAS: `choice.py` picks one for the host, passed as `gemm=`.

Every kernel is compiled with `cache=CACHE` (`cache.py`): the first process compiles, announced on
stderr; later ones load machine code from a per-user folder keyed by these sources, so an edit to
any module recompiles its callers too. NUMBA_DISABLE_JIT=1 runs it all as Python, for a debugger.
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
