"""exp(x) in float32 with no branches, so that LLVM vectorises the loops that call it.

Numba lowers np.exp to a call into the C library, one element at a time: in attention (every
score) and the SwiGLU gate (every element of the MLP) that call was a large share of the time.
This one is Cody-Waite range reduction and a degree-6 polynomial (the coefficients of Cephes'
expf), every step a select, a multiply-add or an integer operation:

    n = round(x / ln 2),  r = x - n ln 2  (ln 2 split in two so that n ln 2 is exact),
    e^r = 1 + r + r^2 p(r)  for |r| <= ln2 / 2,    e^x = e^r 2^n

2^n is applied as two powers of two of half the size each, so that results down in the
subnormal range round once, like the C library's, and those above the float32 range are inf.
Within 1 ulp of float64 exp rounded to float32 over [-104, 89], subnormals included
(tests/test_kernels.py; NumPy's SIMD expf: 3 ulp); exp(nan) = nan, exp(-inf) = 0, exp(inf) = inf.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from jitkernels.widen import f32_from_bits

_F = np.float32
_LOG2E = _F(1.44269504088896341)
_LN2_HIGH = _F(0.693359375)  # 9 significant bits: n * _LN2_HIGH is exact for every n used here
_LN2_LOW = _F(-2.12194440e-4)  # ln 2 - _LN2_HIGH
_P = (_F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3), _F(4.1665795894e-2),
      _F(1.6666665459e-1), _F(5.0000001201e-1))
# Below _X_MIN, e^x is less than half the smallest subnormal (rounds to 0); above _X_MAX, more than
# the largest float32 (inf). Clamping to them keeps n within an int32 shift.
_X_MIN = _F(-104.0)
_X_MAX = _F(89.0)


def exp32(x: np.float32) -> np.float32:
    """e^x for a float32 x; this body, NumPy's exp (within 3 ulp, not 1), runs only under NUMBA_DISABLE_JIT."""
    with np.errstate(over="ignore"):  # overflow to inf is the right answer, as in the kernels
        return np.exp(np.float32(x))


# fastmath off whatever the caller's flags: reassociation would fold the two halves of ln 2 back
# together and multiply the two scale factors first (2^-150 underflows to 0).
@overload(exp32, jit_options={"fastmath": False})
def _exp32_jit(x):
    if x != types.float32:
        return None

    def impl(x):
        c = x if x == x else _F(0.0)  # nan: compute anything, return x below
        c = _X_MIN if c < _X_MIN else c
        c = _X_MAX if c > _X_MAX else c
        n = np.floor(c * _LOG2E + _F(0.5))
        r = (c - n * _LN2_HIGH) - n * _LN2_LOW
        p = _P[0]
        p = p * r + _P[1]
        p = p * r + _P[2]
        p = p * r + _P[3]
        p = p * r + _P[4]
        p = p * r + _P[5]
        e_r = p * (r * r) + r + _F(1.0)
        k = np.int32(n)
        half = k >> np.int32(1)  # floor(k / 2); k - half is the rest, both within the float32 exponents
        scale_a = f32_from_bits((half + np.int32(127)) << np.int32(23))
        scale_b = f32_from_bits((k - half + np.int32(127)) << np.int32(23))
        result = e_r * scale_a * scale_b
        return result if x == x else x

    return impl
