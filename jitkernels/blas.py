"""NumPy's own BLAS (OpenBLAS) called from inside Numba kernels: `sgemm_nt`, `sgemm_nn_add`, one thread per call.

The prefill GEMM's second path (`jitkernels.gemm_blas`) runs OpenBLAS's float32 GEMM on blocks of
widened weight rows from within a Numba parallel loop, each Numba thread calling it for its own
blocks. OpenBLAS then must not start threads of its own: `one_blas_thread` holds its thread count at
1 while such a kernel runs (a setter call of well under a microsecond; the count is put back after).
That is how the two thread pools stop stalling each other: OpenBLAS's workers never wake, so they
never spin on a core that a Numba thread needs (see benchmarks/hosts/intel-xeon-avx512-amx/prefill_paths.md).

The library is the OpenBLAS that NumPy loaded (found with threadpoolctl, like `--threads`); its
`sgemm` is given to the JIT under one name of ours (`llvmlite.binding.add_symbol`), so compiled
kernels are cached as usual and bound to it again in each process. Its integer width (64-bit in
NumPy's wheels, "USE64BITINT") is read from the library's own configuration string. Where NumPy
uses another BLAS, or none can be found, `SGEMM` is None, `UNAVAILABLE` says why, and the
kernels that need it are never compiled.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import llvmlite.binding
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_SYMBOL = "qwen_ref_cblas_sgemm"  # the name compiled kernels call; bound to OpenBLAS's sgemm at import
# CBLAS enum values: row-major storage, A or B as it is, B transposed (C = A @ B.T)
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@dataclass(frozen=True)
class OpenBLAS:
    """NumPy's OpenBLAS: where it is, its cblas_sgemm's name and integer width, its thread count setter."""

    path: str
    sgemm: str  # e.g. scipy_cblas_sgemm64_ (NumPy 2 wheels) or cblas_sgemm
    int_bits: int  # 64 for an ILP64 build
    set_threads: ctypes._CFuncPtr
    get_threads: ctypes._CFuncPtr
    address: int  # of sgemm


def _find_openblas() -> tuple[OpenBLAS | None, str]:
    """(NumPy's OpenBLAS, "") or (None, why not)."""
    from threadpoolctl import threadpool_info

    found = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    found.sort(key=lambda i: "numpy" not in i["filepath"])  # NumPy's own first, if several are loaded
    if not found:
        apis = sorted({i.get("internal_api", "?") for i in threadpool_info() if i.get("user_api") == "blas"})
        return None, f"NumPy's BLAS is not OpenBLAS ({', '.join(apis) or 'none found'})"
    path = found[0]["filepath"]
    lib = ctypes.CDLL(path)  # the library already loaded: the same handle, the same thread pool
    # NumPy 2 wheels prefix their OpenBLAS's names with scipy_ and suffix them with 64_; NumPy 1.26's carry
    # the suffix only; a system OpenBLAS carries neither
    for prefix, suffix in (("scipy_", "64_"), ("", "64_"), ("", "")):
        try:
            sgemm = getattr(lib, f"{prefix}cblas_sgemm{suffix}")
            config = getattr(lib, f"{prefix}openblas_get_config{suffix}")
            set_threads = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}")
            get_threads = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}")
        except AttributeError:
            continue
        config.restype = ctypes.c_char_p
        get_threads.restype = ctypes.c_int
        set_threads.argtypes = [ctypes.c_int]
        int_bits = 64 if b"USE64BITINT" in config() else 32
        address = ctypes.cast(sgemm, ctypes.c_void_p).value
        return OpenBLAS(path, sgemm.__name__, int_bits, set_threads, get_threads, address), ""
    return None, f"no cblas_sgemm with a thread setter in {path}"


SGEMM, UNAVAILABLE = _find_openblas()
if SGEMM is not None:
    llvmlite.binding.add_symbol(_SYMBOL, SGEMM.address)
_INT_BITS = 64 if SGEMM is None else SGEMM.int_bits  # frozen into compiled kernels; the cache key has NumPy's version


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """OpenBLAS runs every call on its calling thread while this lasts (for kernels that call `sgemm_nt`)."""
    if SGEMM is None:
        raise RuntimeError(f"the BLAS GEMM is unavailable: {UNAVAILABLE}")
    before = SGEMM.get_threads()
    SGEMM.set_threads(1)
    try:
        yield
    finally:
        SGEMM.set_threads(before)


@intrinsic
def _cblas_sgemm(typingctx, trans_b, beta, m, n, k, a, lda, b, ldb, c, c_offset, ldc):
    """cblas_sgemm(row-major, A, B as it is or transposed by trans_b, a CBLAS enum): c[c_offset:] as
    [m, n] with row stride ldc = a [m, k] @ (b [k, n] or b[:n].T) + beta c."""
    arrays = (a, b, c)
    if not all(isinstance(t, types.Array) and t.dtype == types.float32 for t in arrays):
        return None

    def codegen(context, builder, signature, args):
        integer, f32 = ir.IntType(_INT_BITS), ir.FloatType()
        pointer = f32.as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [integer] * 6 + [f32, pointer, integer, pointer, integer, f32, pointer,
                                                                integer])
        fn = builder.module.globals.get(_SYMBOL) or ir.Function(builder.module, fnty, _SYMBOL)
        tb, bt, am, an, ak, av, alda, bv, aldb, cv, coff, aldc = args
        sig = signature.args

        def data(i, value):
            return context.make_array(sig[i])(context, builder, value).data

        def as_int(i, value):
            wide = context.cast(builder, value, sig[i], types.int64)
            return wide if _INT_BITS == 64 else builder.trunc(wide, integer)

        c_ptr = builder.gep(data(9, cv), [context.cast(builder, coff, sig[10], types.int64)])
        const = ir.Constant
        builder.call(fn, [const(integer, _ROW_MAJOR), const(integer, _NO_TRANS), as_int(0, tb),
                          as_int(2, am), as_int(3, an), as_int(4, ak), const(f32, 1.0), data(5, av), as_int(6, alda),
                          data(7, bv), as_int(8, aldb), context.cast(builder, bt, sig[1], types.float32), c_ptr,
                          as_int(11, aldc)])
        return context.get_dummy_value()

    return types.void(trans_b, beta, m, n, k, a, lda, b, ldb, c, c_offset, ldc), codegen


def sgemm_nt(x, w, n, y, col):
    """y[:, col:col+n] = x @ w[:n].T by OpenBLAS's sgemm on the calling thread (inside `one_blas_thread`).

    x [T, K], w [>= n, K] and y [T, >= col + n]: float32, rows contiguous (C order). The caller checks
    the shapes: this is the innermost call of a kernel. Under NUMBA_DISABLE_JIT, NumPy's matmul.
    """
    y[:, col : col + n] = x @ w[:n].T


@overload(sgemm_nt)
def _sgemm_nt_jit(x, w, n, y, col):
    def impl(x, w, n, y, col):
        T, K = x.shape
        _cblas_sgemm(_TRANS, 0.0, T, n, K, x, x.strides[0] // 4, w, w.strides[0] // 4, y, col, y.strides[0] // 4)

    return impl


def sgemm_nn_add(x, w, y):
    """y += x @ w by OpenBLAS's sgemm on the calling thread (inside `one_blas_thread`): x [T, K], w [K, n],
    y [T, n], float32 with contiguous rows, shapes checked by the caller. Under NUMBA_DISABLE_JIT, NumPy's."""
    y += x @ w


@overload(sgemm_nn_add)
def _sgemm_nn_add_jit(x, w, y):
    def impl(x, w, y):
        T, K = x.shape
        _cblas_sgemm(_NO_TRANS, 1.0, T, w.shape[1], K, x, x.strides[0] // 4, w, w.strides[0] // 4, y, 0,
                     y.strides[0] // 4)

    return impl


def available() -> bool:
    """Whether `sgemm_nt` can run here."""
    return SGEMM is not None
