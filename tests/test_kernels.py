"""The Numba kernels agree with their NumPy twins in qwen_ref, which are the specification.

Float32 results that are summed in a different order cannot agree bit for bit, so each comparison
carries an error bound derived from float32 rounding (unit roundoff U = 2^-24 per operation):
summing n terms in any order is off by at most n U sum|terms|, and the two implementations can
each be off by that much. Where both sides round the same operations in the same order (widening,
RoPE) the test demands bit equality.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

import jitkernels
import jitkernels.widen as widen_module
from jitkernels import blas, gemm_blas
from jitkernels.exp import exp32
from jitkernels.matmul import GEMMS
from jitkernels.narrow import narrow
from qwen_ref.attention import attention as attention_twin
from qwen_ref.kv_cache import KV_DTYPES, round_to_kv_dtype
from qwen_ref.linear import linear as linear_twin
from qwen_ref.linear import linears as linears_twin
from qwen_ref.mlp import silu_mul as silu_mul_twin
from qwen_ref.mlp import swiglu as swiglu_twin
from qwen_ref.rms_norm import rms_norm as rms_norm_twin
from qwen_ref.rope import apply_rope as apply_rope_twin
from qwen_ref.rope import rope_cos_sin, rope_inv_freq
from qwen_ref.weights import to_float32

REPO = Path(__file__).resolve().parent.parent
U = 2.0**-24  # float32 unit roundoff
STORED_DTYPES = ["F32", "F16", "BF16"]
seeds = st.integers(0, 2**32 - 1)
# every prefill GEMM (jitkernels.matmul.GEMMS); the blas one needs NumPy's OpenBLAS, which its wheels ship
EVERY_GEMM = pytest.mark.parametrize("gemm", [
    pytest.param(g, marks=pytest.mark.skipif(g == "blas" and not blas.available(), reason=blas.UNAVAILABLE))
    for g in GEMMS])
AVAILABLE_GEMMS = [g for g in GEMMS if g != "blas" or blas.available()]


def stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as a read-only checkpoint tensor: float32, float16, or bfloat16 words (truncated)."""
    if dtype == "F32":
        out = values.astype(np.float32)
    elif dtype == "F16":
        out = values.astype(np.float16)
    else:
        out = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    out.setflags(write=False)  # as the memory-mapped weights of a checkpoint are
    return out


# ---------------------------------------------------------------------------------------------
# Widening: every 16-bit pattern


def test_bfloat16_widening_is_exact_for_all_65536_words():
    words = np.arange(2**16, dtype=np.uint16).reshape(1, -1)  # [1, 65536]
    out = np.empty(words.shape, dtype=np.float32)
    jitkernels.widen_rows(words, out)
    # bit comparison, so nan payloads, signed zeros and infinities count too
    np.testing.assert_array_equal(out.view(np.uint32), words.astype(np.uint32) << 16)


def test_float16_widening_matches_numpy_for_all_65536_words_including_subnormals_inf_and_nan():
    words = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(1, -1)  # [1, 65536]
    out = np.empty(words.shape, dtype=np.float32)
    jitkernels.widen_rows(words.view(np.int16), out)  # float16 reaches the kernels as int16 words
    # bit comparison, except that the F16C conversion sets the quiet bit of a signalling nan (payload
    # and sign stay)
    nan = np.isnan(words)
    quiet = np.where(nan, np.uint32(1 << 22), np.uint32(0))
    np.testing.assert_array_equal(out.view(np.uint32) | quiet, words.astype(np.float32).view(np.uint32) | quiet)
    if widen_module._HAS_F16C:
        assert np.all(out.view(np.uint32)[nan] & np.uint32(1 << 22))


def test_float16_widening_without_f16c_matches_numpy_bit_for_bit():
    # the bit manipulation that runs where the CPU has no F16C (or Numba targets a generic CPU)
    words = np.arange(2**16, dtype=np.uint16).view(np.int16)  # [65536] float16 words
    f16_to_f32 = njit(widen_module._f16_to_f32)

    @njit
    def widen_all(w, out):
        for i in range(w.shape[0]):
            out[i] = f16_to_f32(w[i])

    out = np.empty(words.shape, dtype=np.float32)
    widen_all(words, out)
    np.testing.assert_array_equal(out.view(np.uint32), words.view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or os.environ.get("NUMBA_CPU_NAME") is not None,
                    reason="needs /proc/cpuinfo and Numba targeting the host CPU")
def test_f16c_detection_agrees_with_the_cpu():
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    assert widen_module._HAS_F16C == ("f16c" in flags.split())


# ---------------------------------------------------------------------------------------------
# Narrowing: what the decode step writes into a 16-bit KV cache


@njit
def _narrow_all(x, out):
    for i in range(x.shape[0]):
        out[i] = narrow(x[i], out.dtype)


def rounding_cases() -> np.ndarray:
    """float32 values that decide round-to-nearest-even into float16 or bfloat16: each 16-bit value, each
    halfway point between neighbours (float16's from 0 up to 65520, halfway to 2^16) and the float32 values
    on either side of it, both signs; and a million random bit patterns (nan, inf, subnormals included)."""
    f16 = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)  # [31744] every finite value >= 0
    f16_next = np.append(f16[1:], 2.0**16)
    f16_half = ((f16 + f16_next) / 2).astype(np.float32)  # exact: 12 significant bits at most
    bf16_half = ((np.arange(2**16, dtype=np.uint32) << 16) | 0x8000).view(np.float32)  # [65536]
    halves = np.concatenate([f16_half, bf16_half[~np.isnan(bf16_half)]])
    near = np.concatenate([f16.astype(np.float32), halves, np.nextafter(halves, np.float32(np.inf)),
                           np.nextafter(halves, np.float32(0))])
    noise = np.random.default_rng(0).integers(0, 2**32, 2**20, dtype=np.uint32).view(np.float32)
    return np.concatenate([near, -near, noise])


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_narrowing_matches_the_cache_rounding_of_the_numpy_twin_bit_for_bit(kv_dtype):
    x = rounding_cases()
    want = round_to_kv_dtype(x, kv_dtype)  # qwen_ref.kv_cache: the specification
    got = np.empty(x.shape, dtype=np.int16 if kv_dtype == "float16" else np.uint16)  # as the kernels hold the words
    _narrow_all(x, got)
    got = got.view(want.dtype)
    nan = np.isnan(x)
    if kv_dtype == "float16":
        # NumPy's float16 nan (payload and quiet bit) differs between its own builds and CPUs: a nan of the same sign
        assert np.all(np.isnan(got[nan])) and np.array_equal(np.signbit(got[nan]), np.signbit(x[nan]))
        got, want = got[~nan], want[~nan]
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


# ---------------------------------------------------------------------------------------------
# exp, used by attention and the SwiGLU gate


@njit(fastmath={"reassoc", "contract"})  # the kernels' flags: exp32 must not inherit them
def _exp32_all(x, out):
    for i in range(x.shape[0]):
        out[i] = exp32(x[i])  # in a loop, as the kernels call it, so the vectorised code is what is tested


def test_exp32_is_within_one_ulp_of_float64_exp_from_underflow_to_overflow():
    specials = [np.nan, np.inf, -np.inf, 0.0, -0.0, 88.72283, 88.7229, -87.33655, -103.97, -103.98, 1e-30, -1e-30]
    x = np.concatenate([np.linspace(-104, 89, 20_000_001, dtype=np.float32), np.array(specials, dtype=np.float32)])
    got = np.empty_like(x)
    _exp32_all(x, got)
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64)).astype(np.float32)  # correctly rounded to float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))  # overflow at the same x
    finite = np.isfinite(want)
    ulps = np.abs(got[finite].view(np.int32).astype(np.int64) - want[finite].view(np.int32).astype(np.int64))
    assert ulps.max() <= 1  # subnormal results count in ulps of the subnormal spacing


# ---------------------------------------------------------------------------------------------
# linear


def sum_order_bound(abs_x: np.ndarray, abs_w: np.ndarray, abs_b: np.ndarray | float) -> np.ndarray:
    """Largest gap between two float32 evaluations of x @ w.T + b that sum in different orders.

    Each is within (n_in + 1) U (|x| @ |w|.T + |b|) of the exact value (recursive summation bound;
    blocked, pairwise and fused sums do no worse), so they are within twice that of each other.
    """
    n_in = abs_x.shape[1]
    return 2 * (n_in + 1) * U * (abs_x.astype(np.float64) @ abs_w.T.astype(np.float64) + abs_b)


@EVERY_GEMM
@settings(max_examples=60, deadline=None)
@given(
    T=st.sampled_from([1, 1, 2, 3, 4, 5, 7, 9, 33]),
    n_in=st.integers(1, 300),
    n_out=st.integers(1, 200),
    dtype=st.sampled_from(STORED_DTYPES),
    with_bias=st.booleans(),
    seed=seeds,
)
def test_linear_matches_numpy_twin(gemm, T, n_in, n_out, dtype, with_bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, n_in), dtype=np.float32)
    weight = stored(rng.standard_normal((n_out, n_in)), dtype)
    bias = stored(rng.standard_normal(n_out), dtype) if with_bias else None
    got = jitkernels.linear(x, weight, bias, gemm)
    want = linear_twin(x, weight, bias)
    assert got.dtype == np.float32 and got.shape == (T, n_out)
    w32, b32 = to_float32(weight), (np.abs(to_float32(bias)) if with_bias else 0.0)
    # float32 dot products of length n_in summed in different orders (SIMD lanes vs BLAS blocks)
    assert np.all(np.abs(got - want) <= sum_order_bound(np.abs(x), np.abs(w32), b32))


@EVERY_GEMM
@pytest.mark.parametrize("dtype", STORED_DTYPES)
@pytest.mark.parametrize("T", [1, 2, 6])
def test_linear_propagates_inf_and_nan_like_numpy_twin(T, dtype, gemm):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, 16), dtype=np.float32)
    w = rng.standard_normal((5, 16), dtype=np.float32)
    w[1, 3], w[2, 4], w[3, 0], w[3, 1] = np.inf, np.nan, np.inf, -np.inf
    x[0, 7] = np.inf
    weight = stored(w, dtype)
    got = jitkernels.linear(x, weight, None, gemm)
    with np.errstate(invalid="ignore"):
        want = linear_twin(x, weight, None)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))


def test_linear_of_a_long_matrix_reduces_in_column_blocks_over_many_weight_tiles():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((13, 2100), dtype=np.float32)  # n_in over two column blocks of the GEMM
    weight = stored(rng.standard_normal((301, 2100)), "BF16")  # many tiles, the last one ragged
    bias = stored(rng.standard_normal(301), "BF16")
    for rows in (x[:1], x[:2], x[:12], x):  # GEMV twice, then GEMM with full and ragged blocks of 4 rows
        got = jitkernels.linear(rows, weight, bias)
        bound = sum_order_bound(np.abs(rows), np.abs(to_float32(weight)), np.abs(to_float32(bias)))
        assert np.all(np.abs(got - linear_twin(rows, weight, bias)) <= bound)  # dot products of 2100 terms


@EVERY_GEMM
@settings(max_examples=40, deadline=None)
@given(
    T=st.sampled_from([1, 1, 2, 3, 4, 9]),
    n_in=st.integers(1, 130),
    n_outs=st.lists(st.integers(1, 70), min_size=1, max_size=4),
    dtype=st.sampled_from(STORED_DTYPES),
    with_bias=st.booleans(),
    seed=seeds,
)
def test_linears_match_numpy_twin_for_every_projection(gemm, T, n_in, n_outs, dtype, with_bias, seed):
    # q, k and v in one pass: the rows of all weights are numbered one after another and split
    # across threads, so every row of every output must land in the right place
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, n_in), dtype=np.float32)
    weights = tuple(stored(rng.standard_normal((n, n_in)), dtype) for n in n_outs)
    biases = tuple(stored(rng.standard_normal(n), dtype) if with_bias else None for n in n_outs)
    got = jitkernels.linears(x, weights, biases, gemm)
    want = linears_twin(x, weights, biases)
    assert len(got) == len(n_outs)
    for g, w_, weight, bias in zip(got, want, weights, biases):
        assert g.shape == w_.shape == (T, weight.shape[0])
        b32 = np.abs(to_float32(bias)) if with_bias else 0.0
        assert np.all(np.abs(g - w_) <= sum_order_bound(np.abs(x), np.abs(to_float32(weight)), b32))


def test_linears_refuse_weights_of_different_dtypes_or_a_missing_bias():
    x = np.ones((1, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="share a dtype"):
        jitkernels.linears(x, (stored(np.ones((2, 4)), "F32"), stored(np.ones((2, 4)), "BF16")), (None, None))
    for rows in (x, np.ones((5, 4), dtype=np.float32)):  # the GEMV and the GEMM path
        with pytest.raises(ValueError, match="2 weights but 1 biases"):
            jitkernels.linears(rows, (stored(np.ones((2, 4)), "BF16"), stored(np.ones((2, 4)), "BF16")), (None,))


def test_linear_reads_bfloat16_weights_at_any_alignment():
    # a bfloat16 weight 2 bytes past a 4-byte boundary cannot be viewed as uint32 pairs in place
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 8), dtype=np.float32)
    buffer = stored(rng.standard_normal(1 + 6 * 8), "BF16")
    weight = buffer[1:].reshape(6, 8)  # [6, 8] at an odd word offset
    assert weight.ctypes.data % 4 == 2
    got = jitkernels.linear(x, weight, None)
    assert np.all(np.abs(got - linear_twin(x, weight, None)) <= sum_order_bound(np.abs(x), np.abs(to_float32(weight)), 0.0))


@EVERY_GEMM
@settings(max_examples=40, deadline=None)
@given(
    T=st.sampled_from([1, 1, 2, 3, 4, 7]),
    D=st.integers(1, 130),
    F=st.integers(1, 150),
    dtype=st.sampled_from(STORED_DTYPES),
    seed=seeds,
)
def test_swiglu_matches_numpy_twin(gemm, T, D, F, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D), dtype=np.float32)
    w_gate, w_up = stored(rng.standard_normal((F, D)), dtype), stored(rng.standard_normal((F, D)), dtype)
    got = jitkernels.swiglu(x, w_gate, w_up, gemm)
    want = swiglu_twin(x, w_gate, w_up)
    assert got.shape == (T, F)
    # gate g and up u each carry the dot-product bound e_g, e_u; |silu'| <= 1.1, so the product is off
    # by at most 1.1 e_g |u| + |silu(g)| e_u (+ e_g e_u), plus the exp/division/product rounding and
    # the one-sided overflow of the gate test below (16 U relative, 3e-37 |u| absolute)
    abs_x = np.abs(x)
    e_g = sum_order_bound(abs_x, np.abs(to_float32(w_gate)), 0.0)
    e_u = sum_order_bound(abs_x, np.abs(to_float32(w_up)), 0.0)
    gate = linear_twin(x, w_gate)
    up = linear_twin(x, w_up)
    silu = np.abs(gate) + e_g  # |silu(g)| <= |g|
    bound = 1.1 * e_g * (np.abs(up) + e_u) + silu * e_u + 16 * U * np.abs(want) + 3e-37 * (np.abs(up) + e_u)
    assert np.all(np.abs(got - want) <= bound)


@pytest.mark.parametrize("D", [1100, 2100, 5000])
def test_swiglu_of_wide_inputs_groups_fewer_tiles_and_ends_on_a_ragged_tile(D):
    # n_in 1100, 2100 and 5000: 3, 1 and 1 tiles per group of the GEMM (the last wider than its
    # budget), F = 37 ends on a tile of 5 gate and 5 up rows; T = 13 on ragged blocks of 4 rows
    rng = np.random.default_rng(D)
    x = rng.standard_normal((13, D), dtype=np.float32)
    w_gate, w_up = stored(rng.standard_normal((37, D)), "BF16"), stored(rng.standard_normal((37, D)), "BF16")
    abs_x = np.abs(x)
    e_g = sum_order_bound(abs_x, np.abs(to_float32(w_gate)), 0.0)
    e_u = sum_order_bound(abs_x, np.abs(to_float32(w_up)), 0.0)
    for rows in (x[:2], x):  # GEMV, then GEMM
        got = jitkernels.swiglu(rows, w_gate, w_up)
        want = swiglu_twin(rows, w_gate, w_up)
        up = np.abs(linear_twin(rows, w_up))
        n = len(rows)
        bound = 1.1 * e_g[:n] * (up + e_u[:n]) + (np.abs(linear_twin(rows, w_gate)) + e_g[:n]) * e_u[:n]
        assert np.all(np.abs(got - want) <= bound + 16 * U * np.abs(want) + 3e-37 * (up + e_u[:n]))


@pytest.mark.skipif(not blas.available(), reason=blas.UNAVAILABLE)
@pytest.mark.parametrize("dtype", STORED_DTYPES)
def test_blas_gemm_spans_many_blocks_of_rows_and_gives_the_same_bits_on_any_thread_count(dtype):
    import numba

    # n_out 3 blocks and a ragged one of linears_blas's rows per block (q, k, v of different sizes);
    # F = 2.5 blocks of swiglu_blas's; every output row must land in its place whichever thread made it
    rng = np.random.default_rng(3)
    D = 200
    rows = gemm_blas._rows_per_block(D)
    x = rng.standard_normal((37, D), dtype=np.float32)
    weights = tuple(stored(rng.standard_normal((n, D)), dtype) for n in (3 * rows + 5, rows, 7))
    biases = tuple(stored(rng.standard_normal(len(w)), dtype) for w in weights)
    w_gate, w_up = (stored(rng.standard_normal((5 * rows // 4 + 3, D)), dtype) for _ in range(2))
    runs = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            runs.append((jitkernels.linears(x, weights, biases, "blas"), jitkernels.swiglu(x, w_gate, w_up, "blas")))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    (ys, act), (ys_again, act_again) = runs
    for y, y_again, w, b in zip(ys, ys_again, weights, biases):
        np.testing.assert_array_equal(y, y_again)  # fixed block boundaries: the same sgemm calls
        bound = sum_order_bound(np.abs(x), np.abs(to_float32(w)), np.abs(to_float32(b)))
        assert np.all(np.abs(y - linear_twin(x, w, b)) <= bound)
    np.testing.assert_array_equal(act, act_again)
    gate, up = linear_twin(x, w_gate), linear_twin(x, w_up)
    e_g = sum_order_bound(np.abs(x), np.abs(to_float32(w_gate)), 0.0)
    e_u = sum_order_bound(np.abs(x), np.abs(to_float32(w_up)), 0.0)
    want = swiglu_twin(x, w_gate, w_up)
    # as in test_swiglu_matches_numpy_twin: the dot-product bounds through silu(g) * u, plus its rounding
    bound = 1.1 * e_g * (np.abs(up) + e_u) + (np.abs(gate) + e_g) * e_u + 16 * U * np.abs(want)
    assert np.all(np.abs(act - want) <= bound)


@pytest.mark.skipif(not blas.available(), reason=blas.UNAVAILABLE)
def test_blas_gemm_leaves_numpys_blas_thread_count_as_it_found_it():
    before = blas.SGEMM.get_threads()
    x = np.ones((8, 16), dtype=np.float32)
    jitkernels.linear(x, stored(np.ones((40, 16)), "BF16"), None, "blas")
    assert blas.SGEMM.get_threads() == before


def test_gemm_choice_is_forced_by_name_or_environment_and_refuses_unknown_names(monkeypatch):
    from jitkernels.choice import ENV, KERNEL_CHOICES, choose_gemm
    from qwen_ref.backends import KERNEL_CHOICES as CLI_CHOICES

    assert KERNEL_CHOICES == CLI_CHOICES  # qwen_ref names them without importing jitkernels
    monkeypatch.setenv(ENV, "numba-gemm")
    forced = choose_gemm("auto")
    assert forced.gemm == forced.attention == "numba" and ENV in forced.reason  # a name forces both
    if blas.available():
        forced = choose_gemm("blas-gemm")  # the command line's choice wins over the environment
        assert forced.gemm == forced.attention == "blas"
    monkeypatch.setenv(ENV, "fastest")
    with pytest.raises(ValueError, match=ENV):
        choose_gemm("auto")
    monkeypatch.delenv(ENV)
    auto = choose_gemm("auto")
    assert auto.gemm in GEMMS  # measured, or read from the cache
    # attention's prefill items take sgemm tiles wherever OpenBLAS is callable, whichever GEMM won
    assert auto.attention == ("blas" if blas.available() else "numba")
    assert str(auto).endswith("prefill attention on " + ("sgemm tiles" if blas.available() else "the Numba micro-kernel"))


def test_a_gemm_measurement_beside_busy_processes_waits_and_is_taken_again(monkeypatch, tmp_path):
    from jitkernels import choice

    monkeypatch.setattr(choice, "CACHE_DIR", tmp_path)
    timings = iter([(1.0, 2.0), (2.0, 1.0)])  # busy: blas looks slower; then quiet: blas twice as fast
    monkeypatch.setattr(choice, "_time_both", lambda: next(timings))
    # (wall, CPU seconds of all processes, of this one): 1 other core busy during the first, 0.1 the second
    readings = iter([(0.0, 0.0, 0.0), (1.0, 2.0, 1.0), (5.0, 5.0, 1.0), (6.0, 6.1, 2.0)])
    monkeypatch.setattr(choice, "_busy_seconds", lambda: next(readings))
    waited = []
    monkeypatch.setattr(choice, "_wait_for_quiet", waited.append)
    measured = choice._measured_locked(2)
    assert waited == [choice._QUIET_WAIT] and measured.gemm == "blas" and "busy" not in measured.reason
    assert choice.cached_choice(2).gemm == "blas"

    # busy both times: the second result is kept, and says so
    (tmp_path / "gemm-choice.json").unlink()
    timings = iter([(1.0, 2.0), (1.0, 2.0)])
    readings = iter([(0.0, 0.0, 0.0), (1.0, 2.0, 1.0), (5.0, 5.0, 1.0), (6.0, 7.0, 2.0)])
    measured = choice._measured_locked(2)
    assert measured.gemm == "numba" and "1.0 other cores busy" in measured.reason
    assert choice.cached_choice(2).reason == measured.reason.replace("measured now", "measured on this CPU before")


def test_other_cores_reads_this_machine():
    from jitkernels.choice import _busy_seconds, _other_cores

    before = _busy_seconds()
    sum(i * i for i in range(2_000_000))  # this process's own work is not counted
    after = _busy_seconds()
    assert before is not None and 0.0 <= _other_cores(before, after) <= len(os.sched_getaffinity(0))
    assert _other_cores(None, after) == 0.0


# ---------------------------------------------------------------------------------------------
# rms_norm, apply_rope, the SwiGLU gate


@settings(max_examples=40, deadline=None)
@given(
    T=st.sampled_from([1, 2, 5, 17, 70, 130]),
    D=st.sampled_from([1, 3, 32, 64, 100, 1024]),
    dtype=st.sampled_from(STORED_DTYPES),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=seeds,
)
def test_rms_norm_matches_numpy_twin(T, D, dtype, scale, seed):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((T, D))).astype(np.float32)
    weight = stored(1.0 + 0.3 * rng.standard_normal(D), dtype)
    got = jitkernels.rms_norm(x, weight, 1e-6)
    want = rms_norm_twin(x, weight, 1e-6)
    # the sum of D positive squares is off by at most D U relative on each side, halved by the square
    # root: the sides differ by D U; mean, + eps, sqrt, reciprocal and two products add 6 U per side
    assert np.all(np.abs(got - want) <= (D + 12) * U * np.abs(want))


@settings(max_examples=40, deadline=None)
@given(
    T=st.sampled_from([1, 2, 7, 40, 200]),
    n_heads=st.sampled_from([1, 2, 3, 16]),
    hd=st.sampled_from([2, 4, 6, 64, 128]),
    past=st.integers(0, 40000),
    seed=seeds,
)
def test_apply_rope_matches_numpy_twin_bit_for_bit(T, n_heads, hd, past, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, n_heads, hd), dtype=np.float32)
    cos, sin = rope_cos_sin(np.arange(past, past + T), rope_inv_freq(hd, 1e6))
    x_before = x.copy()
    got = jitkernels.apply_rope(x, cos, sin)
    # the same two float32 products and one sum per element, in the same order: no tolerance
    np.testing.assert_array_equal(got, apply_rope_twin(x, cos, sin))
    np.testing.assert_array_equal(x, x_before)


@settings(max_examples=40, deadline=None)
@given(
    T=st.sampled_from([1, 3, 30, 64]),
    F=st.sampled_from([1, 5, 48, 300]),
    scale=st.sampled_from([0.1, 3.0, 100.0]),
    seed=seeds,
)
def test_swiglu_gate_matches_numpy_silu_over_its_range(T, F, scale, seed):
    # identity weights make gate and up x itself, exactly (one product by 1, the others by 0), so the
    # outputs are silu(x) * x as the kernels' epilogues compute it (the GEMV for T <= 3, else the GEMM)
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((T, F))).astype(np.float32)
    eye = np.eye(F, dtype=np.float32)
    got = jitkernels.swiglu(x, eye, eye)
    want = silu_mul_twin(x, x)
    # exp32 is within 1 ulp (test above), NumPy's SIMD float32 exp within 3 ulp, so they differ by at
    # most 4 ulp = 8 U relative; 1 + e, the division and the product round once on each side: 14 U,
    # and 16 U leaves a margin. Where exp(-g) overflows on one side only (-g ~ ln FLT_MAX = 88.72)
    # one side gives -0 and the other g / FLT_MAX, below 3e-37 in magnitude.
    assert np.all(np.abs(got - want) <= 16 * U * np.abs(want) + 3e-37 * np.abs(x))


# ---------------------------------------------------------------------------------------------
# attention, on keys and values sliced out of a preallocated cache exactly as model.py slices them


def attention_case(rng, T, past, Hkv, G, hd, spare, score_scale, kv_dtype="float32"):
    """q [T, H, hd], layer 1 of a [2, Hkv, capacity, hd] keys and values cache of kv_dtype, and S = past + T."""
    S = past + T
    capacity = S + spare
    shape = (2, Hkv, capacity, hd)  # [L, Hkv, capacity, hd]
    keys = round_to_kv_dtype(rng.standard_normal(shape, dtype=np.float32), kv_dtype)
    values = round_to_kv_dtype(rng.standard_normal(shape, dtype=np.float32), kv_dtype)
    q = (score_scale * rng.standard_normal((T, Hkv * G, hd))).astype(np.float32)  # [T, H, hd]
    return q, keys[1], values[1], S


def attention_bound(q, keys, values, S):
    """Largest gap, per output element, between two float32 evaluations of causal softmax(q k^T s) v.

    A score is a dot product of hd terms, off by at most (hd + 1) U s |q|.|k| on each side. An error
    e in the scores moves every softmax weight by at most 2e relative, so the output by 2e max|v|,
    from each side. Subtracting the maximum, exp, the normalisation and the weighted sum over S
    values (recursive, with online rescaling every key block) add at most (3 S + 16) U max|v|. Both
    sides widen a 16-bit cache exactly, so the bound is that of its float32 values.
    """
    k, v = to_float32(keys[:, :S]), to_float32(values[:, :S])  # [Hkv, S, hd]
    T, H, hd = q.shape
    Hkv = k.shape[0]
    G = H // Hkv
    scale = hd**-0.5
    abs_q = np.abs(q.astype(np.float64)).transpose(1, 0, 2)  # [H, T, hd]
    abs_k = np.abs(k.astype(np.float64)).repeat(G, axis=0)  # [H, S, hd]: head h reads kv head h // G
    abs_scores = abs_q @ abs_k.transpose(0, 2, 1)  # [H, T, S]
    score_error = (hd + 1) * U * scale * abs_scores.max(axis=-1)  # [H, T], worst key (masked ones too: looser)
    v_max = np.abs(v).max(axis=(1, 2)).repeat(G)  # [H]
    per_head = (4 * score_error + (3 * S + 16) * U) * v_max[:, None]  # [H, T]
    return per_head.T.repeat(hd, axis=1)  # [T, H*hd]


@settings(max_examples=90, deadline=None)
@given(
    T=st.sampled_from([1, 1, 2, 3, 8, 17, 40]),
    past=st.one_of(st.integers(0, 10), st.integers(0, 300)),
    Hkv=st.integers(1, 3),
    G=st.sampled_from([1, 2, 4, 5, 8]),  # G = 1: multi-head; Hkv = 1 and G > 1: multi-query
    hd=st.sampled_from([1, 2, 8, 16, 64, 66, 128]),  # 64 and 128 take the literal head-size path
    spare=st.integers(0, 9),
    score_scale=st.sampled_from([0.1, 1.0, 4.0]),
    kv_dtype=st.sampled_from(list(KV_DTYPES)),
    gemm=st.sampled_from(AVAILABLE_GEMMS),  # blas: item_gemm where T * G >= GEMM_ROWS
    seed=seeds,
)
def test_attention_matches_numpy_twin_on_cache_layers(T, past, Hkv, G, hd, spare, score_scale, kv_dtype, gemm, seed):
    q, keys, values, S = attention_case(np.random.default_rng(seed), T, past, Hkv, G, hd, spare, score_scale, kv_dtype)
    got = jitkernels.attention(q, keys, values, S, gemm)
    want = attention_twin(q, keys, values, S)
    assert got.shape == (T, Hkv * G * hd)
    assert np.all(np.abs(got - want) <= attention_bound(q, keys, values, S))


# hd 64 or 128 with T * G >= 4 query rows per kv head goes through the tiled item, fewer rows or hd 66 a row at a time;
# hd 192, a multiple of 64 that is not a literal head size, sums its values 64 columns at a time like 64 and 128
@pytest.mark.parametrize(
    ("T", "past", "Hkv", "G", "hd"),
    [(1, 1500, 1, 8, 64), (1, 3000, 2, 1, 64), (2, 1200, 1, 4, 64), (3, 700, 1, 2, 64), (3, 700, 1, 1, 64),
     (2, 1200, 1, 4, 66), (1, 3000, 2, 1, 128), (2, 1200, 1, 4, 128), (1, 1300, 1, 1, 192)],
)
@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
def test_attention_splits_long_caches_across_threads_and_merges_them(T, past, Hkv, G, hd, kv_dtype):
    # few (row, kv head) items and long caches: the keys are split into ranges merged at the end,
    # with any number of threads (2 to 4 ranges here even on one thread)
    q, keys, values, S = attention_case(np.random.default_rng(past), T, past, Hkv, G, hd, 5, 2.0, kv_dtype)
    got = jitkernels.attention(q, keys, values, S)
    assert np.all(np.abs(got - attention_twin(q, keys, values, S)) <= attention_bound(q, keys, values, S))


# Prefill chunks of GEMM_ROWS (128) or more query rows per kv head: with the blas GEMM, items of 128 rows
# through OpenBLAS's sgemm over blocks of GEMM_KEYS (256) keys, ragged in both (300 rows, S not a
# multiple of 256); past > 0 puts the causal diagonal mid-block, where an item's first rows see no key of
# the block and are left out of both products; G > 1 interleaves heads in the rows; hd 66 is no
# multiple of any SIMD width. With the numba GEMM the same chunks take the tiled item.
@pytest.mark.parametrize(("T", "past", "Hkv", "G", "hd"),
                         [(128, 0, 1, 1, 64), (300, 1000, 2, 1, 64), (129, 3000, 1, 1, 64), (130, 517, 1, 5, 128),
                          (200, 300, 2, 2, 128), (40, 700, 1, 4, 66)])
@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
@EVERY_GEMM
def test_attention_of_long_prefill_chunks_matches_numpy_twin(T, past, Hkv, G, hd, kv_dtype, gemm):
    q, keys, values, S = attention_case(np.random.default_rng(T + past), T, past, Hkv, G, hd, 7, 2.0, kv_dtype)
    got = jitkernels.attention(q, keys, values, S, gemm)
    assert np.all(np.abs(got - attention_twin(q, keys, values, S)) <= attention_bound(q, keys, values, S))


def test_attention_rejects_an_unknown_gemm():
    q, keys, values, S = attention_case(np.random.default_rng(0), 4, 4, 1, 1, 8, 0, 1.0)
    with pytest.raises(ValueError, match="unknown GEMM"):
        jitkernels.attention(q, keys, values, S, "cublas")


@pytest.mark.parametrize("hd", [64, 8])
@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
def test_attention_merges_key_ranges_that_some_query_rows_never_reach(hd, kv_dtype):
    # More key ranges than a 2-core machine asks for (many threads would): with 4 ranges of 9 keys
    # over S = 36, the early query rows see nothing in the later ranges (their m stays -inf, l and
    # acc 0) and whole items lie past their rows; the merge must weigh those ranges by 0.
    import importlib

    impl = importlib.import_module("jitkernels.attention")  # the module, shadowed by the function in kernels
    q, keys, values, S = attention_case(np.random.default_rng(11), 16, 20, 1, 1, hd, 2, 1.0, kv_dtype)
    T, H, _ = q.shape
    n_splits = 4
    m = np.empty((n_splits, T, H), dtype=np.float32)
    l = np.empty((n_splits, T, H), dtype=np.float32)
    acc = np.empty((n_splits, T, H, hd), dtype=np.float32)
    k, v = widen_module.kernel_words(keys, "keys"), widen_module.kernel_words(values, "values")  # float16 as int16
    impl._attend(q, k, v, S, m, l, acc, 2)
    got = np.empty((T, H * hd), dtype=np.float32)
    impl._merge(m, l, acc, got)
    assert np.all(np.abs(got - attention_twin(q, keys, values, S)) <= attention_bound(q, keys, values, S))


@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
def test_attention_accepts_caches_that_are_not_contiguous(kv_dtype):
    rng = np.random.default_rng(4)
    q = rng.standard_normal((5, 4, 8), dtype=np.float32)
    k = round_to_kv_dtype(rng.standard_normal((2, 8, 14), dtype=np.float32), kv_dtype)
    v = round_to_kv_dtype(rng.standard_normal((14, 2, 8), dtype=np.float32), kv_dtype)
    k = k.transpose(0, 2, 1)  # [Hkv, capacity, hd], hd strided
    v = v.transpose(1, 0, 2)[::-1]  # [Hkv, capacity, hd], heads reversed
    got = jitkernels.attention(q, k, v, 11)
    assert np.all(np.abs(got - attention_twin(q, k, v, 11)) <= attention_bound(q, k, v, 11))


# hd 8 goes a query row at a time; hd 64 with 4 or more query rows per kv head through the tiled
# item, in full and partial blocks of 256 keys (at past 198 a block of rows straddles key 256: its
# first rows see none of the second block), and split into key ranges for the decode step; hd 64
# and 128 with one query row per kv head a row at a time, values summed 64 columns at a time
@pytest.mark.parametrize(("T", "past", "G", "hd"),
                         [(4, 20, 2, 8), (8, 20, 2, 64), (100, 198, 2, 64), (1, 1500, 8, 64), (1, 1500, 1, 64),
                          (1, 1500, 1, 128)])
@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
def test_attention_ignores_cache_positions_past_S_and_does_not_write_into_the_cache(T, past, G, hd, kv_dtype):
    q, keys, values, S = attention_case(np.random.default_rng(3), T, past, 2, G, hd, 3, 1.0, kv_dtype)
    nan = round_to_kv_dtype(np.float32(np.nan), kv_dtype)
    keys[:, S:], values[:, S:] = nan, nan  # unused capacity: must never be read into the result
    k_before, v_before = keys.copy(), values.copy()
    got = jitkernels.attention(q, keys, values, S)
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got - attention_twin(q, keys, values, S)) <= attention_bound(q, keys, values, S))
    np.testing.assert_array_equal(keys, k_before)
    np.testing.assert_array_equal(values, v_before)


# ---------------------------------------------------------------------------------------------
# The whole model: numba backend against numpy backend


@pytest.mark.parametrize("kernels", ["numba-gemm", pytest.param(
    "blas-gemm", marks=pytest.mark.skipif(not blas.available(), reason=blas.UNAVAILABLE))])
@pytest.mark.parametrize(("dtype", "tied"), [("BF16", True), ("F16", False), ("F32", False)])
def test_model_logits_on_numba_backend_match_numpy_backend_full_and_incremental(tmp_path, dtype, tied, kernels):
    from helpers import random_checkpoint, small_config

    from qwen_ref import load_model
    from qwen_ref.backends import get_backend

    # G = 3 query heads per kv head, head_dim 8, sizes that are not multiples of any SIMD width
    config = small_config(hidden_size=48, intermediate_size=72, num_attention_heads=6, num_key_value_heads=2,
                          num_hidden_layers=3, vocab_size=101, tie_word_embeddings=tied)
    random_checkpoint(tmp_path, config, dtype=dtype, seed=7)
    numpy_model = load_model(tmp_path, get_backend("numpy"))
    numba_model = load_model(tmp_path, get_backend("numba", kernels))
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], 23)

    want = numpy_model.forward(tokens, numpy_model.new_cache(64))  # [23, V]
    got = numba_model.forward(tokens, numba_model.new_cache(64))
    # float32 end to end; three layers of reordered sums stay far inside this
    tolerance = 1e-4 * max(1.0, np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)

    # a prompt, then one token at a time through the KV cache (the decode GEMV and attention path)
    cache = numba_model.new_cache(64)
    steps = [numba_model.forward(tokens[:15], cache)]
    steps += [numba_model.forward(tokens[i : i + 1], cache) for i in range(15, 23)]
    np.testing.assert_allclose(np.concatenate(steps), want, rtol=0, atol=tolerance)


# ---------------------------------------------------------------------------------------------
# Compilation cache and pure-Python mode, in fresh processes

# One small call of every kernel, with the argument types the model uses (float32 activations,
# read-only weights), so the signatures are those the tests above compiled and cached.
_SMOKE = textwrap.dedent(
    """
    import numpy as np
    import jitkernels
    from jitkernels import blas
    from qwen_ref.backends import NUMPY

    rng = np.random.default_rng(0)
    def ro(a):
        a.setflags(write=False)
        return a
    x = rng.standard_normal((5, 8), dtype=np.float32)  # 5 rows: the GEMM path
    worst = 0.0
    for w in (ro(rng.standard_normal((5, 8), dtype=np.float32)), ro(rng.standard_normal((5, 8)).astype(np.float16)),
              ro((rng.standard_normal((5, 8), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16))):
        b = ro(w[:, 0].copy())
        for rows in (x[:1], x):
            worst = max(worst, np.abs(jitkernels.linear(rows, w, b) - NUMPY.linear(rows, w, b)).max())
            for got, want in zip(jitkernels.linears(rows, (w, w), (b, None)), NUMPY.linears(rows, (w, w), (b, None))):
                worst = max(worst, np.abs(got - want).max())
            worst = max(worst, np.abs(jitkernels.swiglu(rows, w, w) - NUMPY.swiglu(rows, w, w)).max())
        if blas.available():  # the prefill GEMM through NumPy's BLAS: its kernels are cached like the others
            for got, want in zip(jitkernels.linears(x, (w, w), (b, None), "blas"), NUMPY.linears(x, (w, w), (b, None))):
                worst = max(worst, np.abs(got - want).max())
            worst = max(worst, np.abs(jitkernels.swiglu(x, w, w, "blas") - NUMPY.swiglu(x, w, w)).max())
        worst = max(worst, np.abs(jitkernels.rms_norm(x, w[0], 1e-6) - NUMPY.rms_norm(x, w[0], 1e-6)).max())
    q = rng.standard_normal((5, 4, 8), dtype=np.float32)
    cache = rng.standard_normal((2, 2, 9, 8), dtype=np.float32)
    k, v = cache[0], cache[1]
    worst = max(worst, np.abs(jitkernels.attention(q, k, v, 5) - NUMPY.attention(q, k, v, 5)).max())
    worst = max(worst, np.abs(jitkernels.attention(q[:1], k, v, 5) - NUMPY.attention(q[:1], k, v, 5)).max())
    q16 = rng.standard_normal((5, 4, 16), dtype=np.float32)  # 10 query rows per kv head of hd 16: the tiled item
    cache16 = rng.standard_normal((2, 2, 9, 16), dtype=np.float32)
    worst = max(worst, np.abs(jitkernels.attention(q16, cache16[0], cache16[1], 5) - NUMPY.attention(q16, cache16[0], cache16[1], 5)).max())
    from qwen_ref.kv_cache import round_to_kv_dtype
    for kv_dtype in ("bfloat16", "float16"):  # 16-bit caches: the tiled item, then a row at a time
        for rows, c in ((q16, round_to_kv_dtype(cache16, kv_dtype)), (q[:1], round_to_kv_dtype(cache, kv_dtype))):
            got, want = jitkernels.attention(rows, c[0], c[1], 5), NUMPY.attention(rows, c[0], c[1], 5)
            worst = max(worst, np.abs(got - want).max())
    if blas.available():  # attention of 130 query rows per kv head (G = 2): item_gemm, ragged, float32 and 16-bit
        q65 = rng.standard_normal((65, 4, 8), dtype=np.float32)
        cache70 = rng.standard_normal((2, 2, 70, 8), dtype=np.float32)
        for kv_dtype in ("float32", "bfloat16", "float16"):
            c = round_to_kv_dtype(cache70, kv_dtype)
            got, want = jitkernels.attention(q65, c[0], c[1], 67, "blas"), NUMPY.attention(q65, c[0], c[1], 67)
            worst = max(worst, np.abs(got - want).max())
    cos, sin = rng.standard_normal((5, 4), dtype=np.float32), rng.standard_normal((5, 4), dtype=np.float32)
    worst = max(worst, np.abs(jitkernels.apply_rope(q, cos, sin) - NUMPY.apply_rope(q, cos, sin)).max())
    # jitkernels.decode.DecoderStack: a one-token step of a 2-layer model, against the same step op by op
    import dataclasses
    from qwen_ref.backends import get_backend
    from qwen_ref.config import QwenConfig
    from qwen_ref.model import QwenModel
    from qwen_ref.weights import expected_shapes
    cfg = QwenConfig.from_dict({"model_type": "qwen2", "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "max_position_embeddings": 8, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                                "tie_word_embeddings": True})
    weights = {n: ro(rng.standard_normal(s, dtype=np.float32)) for n, s in expected_shapes(cfg).items()}
    from qwen_ref.weights import to_float32
    numba_backend = get_backend("numba")
    for kv_dtype in ("float32", "bfloat16", "float16"):
        steps = []
        for backend in (numba_backend, dataclasses.replace(numba_backend, decoder_stack=None)):
            model = QwenModel(cfg, weights, backend, kv_dtype)
            cache = model.new_cache(4)
            model.forward(np.array([1, 2]), cache)
            steps.append((model.forward(np.array([3]), cache), to_float32(cache.keys), to_float32(cache.values)))
        for a, b in zip(*steps):  # the same kernels in the same order, the same rounding into the cache: 0
            worst = max(worst, np.abs(a - b).max())
    print("worst", worst)
    """
)


def run_python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_kernels_run_as_plain_python_with_numba_disable_jit():
    out = run_python(_SMOKE, NUMBA_DISABLE_JIT="1")
    assert float(out.split()[-1]) < 1e-5  # float32 sums of at most 8 terms of size ~1


def test_a_second_process_loads_every_kernel_from_the_cache_without_compiling():
    count_misses = textwrap.dedent(
        """
        import sys
        from numba.core.dispatcher import Dispatcher
        dispatchers = [obj for name, module in list(sys.modules.items()) if name.startswith("jitkernels.")
                       for obj in vars(module).values() if isinstance(obj, Dispatcher)]
        print("dispatchers", len(dispatchers), "misses", sum(sum(d.stats.cache_misses.values()) for d in dispatchers))
        """
    )
    run_python(_SMOKE)  # compiles whatever is not cached yet (nothing, after the tests above)
    out = run_python(_SMOKE + count_misses).split()
    assert int(out[out.index("dispatchers") + 1]) >= 10 and int(out[out.index("misses") + 1]) == 0, out
