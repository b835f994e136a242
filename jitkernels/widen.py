"""Widening stored weights and KV caches to float32, one element at a time, exactly.

Kernels take weights and caches in their stored 16-bit form and widen them in registers, so a
checkpoint or a cache is never copied into float32. Numba has no float16 (or bfloat16) type on the
CPU, so the dtype of an array says how to read its words:

    float32  the value itself
    uint16   a bfloat16 word: the high half of a float32, so widening is a 16-bit shift
    int16    a float16 word (a float16 array viewed as int16 by the caller, see `kernel_words`):
             LLVM's `fpext half to float` on a CPU with F16C (vcvtph2ps, 8 words per instruction,
             benchmarks/KERNELS.md, widen), else the bit manipulation of `_f16_to_f32`

Numba cannot reinterpret a scalar's bits (`x.view` works on arrays only): the bit-casts below are
LLVM `bitcast`s. Under NUMBA_DISABLE_JIT the Python bodies of `widen` and `widen_bf16_pair` run.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import config
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic, overload

from jitkernels.cache import CACHE


def kernel_words(a: np.ndarray, what: str) -> np.ndarray:
    """`a` with the dtype that tells the kernels how to widen it: float16 viewed as int16 words, float32
    and uint16 (bfloat16 words) as they are; `what` names the array in the error for any other dtype."""
    kind = a.dtype.char  # f: float32, H: uint16 (bfloat16 words), e: float16
    if kind == "e":
        return a.view(np.int16)
    if kind != "f" and kind != "H":
        raise TypeError(f"{what} must be float32, float16 or bfloat16 words (uint16), not {a.dtype}")
    return a


def as_kernel_dtype(w: np.ndarray) -> np.ndarray:
    """A C-contiguous, read-only view of a stored weight that the kernels accept: float16 becomes int16 words.

    Read-only always, as memory-mapped weights are: Numba compiles writable and read-only arrays
    separately, and one signature per dtype is enough. A memory-mapped weight comes back as it is:
    this runs for every weight of every token, so it tests the cheap attributes first.
    """
    w = kernel_words(w, "weights")
    flags = w.flags
    if flags.writeable or not flags.c_contiguous:
        w = np.ascontiguousarray(w).view()
        w.flags.writeable = False
    return w


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of an integer."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        word = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        if bits.bitwidth < 32:
            word = builder.zext(word, ir.IntType(32))
        return builder.bitcast(word, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _bits_from_f32(typingctx, value):
    """The IEEE bits of a float32, as uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


def widen(word: np.generic) -> np.float32:
    """The float32 value of one stored weight element (float32, bfloat16 uint16 word, float16 int16 word)."""
    if isinstance(word, np.uint16):
        return (np.uint32(word) << np.uint32(16)).view(np.float32)
    if isinstance(word, np.int16):
        return np.float32(word.view(np.float16))
    return np.float32(word)


# Integer constants are spelled np.uint32 so that Numba keeps the arithmetic in 32-bit lanes (an int
# literal would promote it to int64 and halve the SIMD width of the float16 path).
_U = np.uint32


def _bf16_to_f32(word):
    return f32_from_bits(_U(word) << _U(16))


def _f16_to_f32(word):
    h = _U(np.uint16(word))
    magnitude = h & _U(0x7FFF)  # exponent (5 bits) and mantissa (10 bits)
    if magnitude >= _U(0x7C00):
        # inf and nan: the exponent becomes all ones and the mantissa (nan payload) is kept, as in NumPy
        value = f32_from_bits((magnitude << _U(13)) | _U(0x7F800000))
    elif magnitude >= _U(0x0400):
        value = f32_from_bits((magnitude << _U(13)) + _U((127 - 15) << 23))  # normal: rebias the exponent
    else:
        # zero and subnormals, m * 2^-24: read the mantissa as the normal float32 2^-14 * (1 + m/1024),
        # then subtract 2^-14 (exact by Sterbenz). No float32 subnormal is ever formed, so the result
        # does not depend on flush-to-zero or denormals-are-zero modes.
        value = f32_from_bits((magnitude << _U(13)) | _U((127 - 14) << 23)) - np.float32(2.0**-14)
    return f32_from_bits(_bits_from_f32(value) | ((h & _U(0x8000)) << _U(16)))


@intrinsic
def _f16_to_f32_convert(typingctx, word):
    """A float16 word converted by LLVM (`fpext half to float`): vcvtph2ps on a CPU with F16C,
    8 words per instruction once vectorised. Exact, like the bit manipulation above; a signalling
    nan comes back quiet."""
    if word != types.int16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(word), codegen


def _target_has_f16c() -> bool:
    """Whether the CPU Numba compiles for has F16C: NUMBA_CPU_FEATURES if set (NUMBA_CPU_NAME=generic
    sets none), else the host's, as Numba itself decides. x86 only; other CPUs take the bit path."""
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return "+f16c" in features.split(",")


# Without F16C, LLVM would call a helper function for `fpext half` that Numba does not link.
_HAS_F16C = _target_has_f16c()


@overload(widen)
def _widen_jit(word):
    if word == types.float32:
        return lambda word: word
    if word == types.uint16:
        return _bf16_to_f32
    if word == types.int16:
        return (lambda word: _f16_to_f32_convert(word)) if _HAS_F16C else _f16_to_f32
    return None


def widen_bf16_pair(pair: np.uint32) -> tuple[np.float32, np.float32]:
    """The two float32 values of a uint32 that holds bfloat16 words 2j (low half) and 2j + 1 (high half)."""
    pair = np.uint32(pair)
    return (pair << np.uint32(16)).view(np.float32), (pair & np.uint32(0xFFFF0000)).view(np.float32)


@overload(widen_bf16_pair)
def _widen_bf16_pair_jit(pair):
    if pair == types.uint32:
        return lambda pair: (f32_from_bits(pair << _U(16)), f32_from_bits(pair & _U(0xFFFF0000)))
    return None


@njit(parallel=True, cache=CACHE)
def widen_rows(w: np.ndarray, out: np.ndarray) -> None:
    """out[r, :] = float32 value of w[r, :] for every row; w [R, C] stored dtype, out [R, C] float32.

    NumPy twin: `qwen_ref.weights.to_float32` (which widens the whole tensor at once).
    """
    for r in prange(w.shape[0]):
        for c in range(w.shape[1]):
            out[r, c] = widen(w[r, c])
