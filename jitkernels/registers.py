"""A small float32 block that LLVM keeps in vector registers: the accumulators of a micro-kernel.

An array a kernel makes with np.zeros lives on the heap, so every `c[i] += ...` on it is a load
and a store. `register_block(n)` is an array on the kernel's stack instead: once the loops of
fixed length that index it are unrolled, every index is a constant, LLVM splits the array into
scalars (SROA) and the SLP vectorizer packs those into SIMD registers. That is how a kernel holds a
4 x 16 block of y in eight AVX2 registers for the whole of a dot-product loop, which Numba has no
syntax for. Use it only with constant indices (after unrolling) and never return it: the memory
is the calling kernel's stack frame. Under NUMBA_DISABLE_JIT it is a plain np.zeros array.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, types
from numba.core import cgutils
from numba.extending import intrinsic, overload


def register_block(n: int) -> np.ndarray:
    """A zeroed float32 array of n elements; n must be a constant."""
    return np.zeros(n, dtype=np.float32)


@intrinsic
def _stack_floats(typingctx, n):
    """A pointer to n float32 on the stack of the function being compiled (its entry block)."""
    if not isinstance(n, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        block = cgutils.alloca_once(builder, ir.ArrayType(ir.FloatType(), n.literal_value))
        return builder.bitcast(block, ir.FloatType().as_pointer())

    return types.CPointer(types.float32)(n), codegen


# inline="always": the intrinsic must land in the caller's own frame, not in a helper that returns
@overload(register_block, inline="always")
def _register_block_jit(n):
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = n.literal_value

    def impl(n):
        block = carray(_stack_floats(n), (size,))  # [n]
        for i in range(size):
            block[i] = np.float32(0.0)
        return block

    return impl
