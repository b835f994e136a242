"""Rounding float32 to the 16-bit words of `jitkernels.widen`, to nearest even: how a kernel writes a KV cache.

    float32  the value itself
    uint16   a bfloat16 word: the high half of the float32 bits, rounded on the low half
    int16    a float16 word: exponent rebiased, significand rounded; inf from 65520 up (halfway from
             the largest float16, 65504, to 2^16), subnormals below 2^-14, zero below 2^-25

Integer arithmetic only, never the CPU's conversion instructions: a decode step narrows a few
thousand values per layer, so speed does not matter, and the result is the same on every CPU, with
or without F16C. A nan stays a quiet nan of the same sign. Under NUMBA_DISABLE_JIT the same
arithmetic runs on NumPy scalars: only the bit-cast `f32_bits` has a NumPy body and a compiled one.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from jitkernels.cache import CACHE
from jitkernels.widen import _bits_from_f32

_U = np.uint32  # 32-bit constants keep Numba's arithmetic in uint32, as in jitkernels.widen


def f32_bits(value: np.float32) -> np.uint32:
    """The IEEE bits of a float32."""
    return np.float32(value).view(np.uint32)


@overload(f32_bits)
def _f32_bits_jit(value):
    if value == types.float32:
        return lambda value: _bits_from_f32(value)
    return None


@njit(cache=CACHE)
def _shift_to_nearest_even(bits, shift):
    """bits >> shift, rounded to nearest with ties to even (shift >= 1; no carry out of 32 bits)."""
    below_half = (_U(1) << (shift - _U(1))) - _U(1)
    return (bits + below_half + ((bits >> shift) & _U(1))) >> shift


@njit(cache=CACHE)
def _f32_to_bf16(value):
    bits = f32_bits(value)
    if bits & _U(0x7FFFFFFF) > _U(0x7F800000):  # nan: keep the sign and the payload's top, set the quiet bit
        return np.uint16((bits >> _U(16)) | _U(0x0040))
    return np.uint16(_shift_to_nearest_even(bits, _U(16)))  # the largest finite values carry into inf


@njit(cache=CACHE)
def _f32_to_f16(value):
    bits = f32_bits(value)
    magnitude = bits & _U(0x7FFFFFFF)
    if magnitude > _U(0x7F800000):  # nan
        half = _U(0x7E00) | ((magnitude >> _U(13)) & _U(0x01FF))
    elif magnitude >= _U(0x477FF000):  # 65520 and above
        half = _U(0x7C00)
    elif magnitude >= _U(0x38800000):  # 2^-14 and above: normal; the exponent bias goes from 127 to 15
        half = _shift_to_nearest_even(magnitude - _U(112 << 23), _U(13))
    elif magnitude >= _U(0x33000000):  # 2^-25 and above: a multiple of 2^-24, significand x 2^(exponent - 126)
        significand = (magnitude & _U(0x007FFFFF)) | _U(0x00800000)
        half = _shift_to_nearest_even(significand, _U(126) - (magnitude >> _U(23)))
    else:
        half = _U(0)
    return np.int16(np.uint16(((bits >> _U(16)) & _U(0x8000)) | half))


def narrow(value: np.float32, dtype: np.dtype) -> np.generic:
    """A float32 value as an element of an array of `dtype` (float32, uint16 or int16, see above); NumPy twin:
    `qwen_ref.kv_cache.round_to_kv_dtype`."""
    if dtype == np.uint16:
        return _f32_to_bf16(value)
    if dtype == np.int16:
        return _f32_to_f16(value)
    return np.float32(value)


@overload(narrow)
def _narrow_jit(value, dtype):
    if not isinstance(dtype, types.DType):
        return None
    if dtype.dtype == types.uint16:
        return lambda value, dtype: _f32_to_bf16(value)
    if dtype.dtype == types.int16:
        return lambda value, dtype: _f32_to_f16(value)
    if dtype.dtype == types.float32:
        return lambda value, dtype: value
    return None
