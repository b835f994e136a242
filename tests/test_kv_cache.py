"""The KV cache in float32, bfloat16 or float16 (qwen_ref.kv_cache): what it stores, costs, and gives attention.

A 16-bit cache rounds each key and value to nearest even when it is written, so a stored value is off by at
most u = 2^-p of itself, p its significant bits (the unit roundoff: half a unit in the last place, relative):
2^-8 for bfloat16 (7 stored bits and the implicit one), 2^-11 for float16 (10 and 1). Attention widens the
words exactly. The bounds below follow from that alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FIXTURES, bf16_words, small_config
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_ref.attention import attention
from qwen_ref.config import QwenConfig
from qwen_ref.errors import QwenRefError
from qwen_ref.kv_cache import KV_DTYPES, KVCache, kv_bytes_per_token, round_to_kv_dtype
from qwen_ref.model import load_model
from qwen_ref.weights import to_float32

U = 2.0**-24  # float32 unit roundoff
UNIT = {"bfloat16": 2.0**-8, "float16": 2.0**-11}  # the 16-bit caches' unit roundoff
SIXTEEN_BIT = sorted(UNIT)


# ---------------------------------------------------------------------------------------------
# Rounding


def test_bfloat16_rounding_is_round_to_nearest_even_at_every_word_and_halfway_point():
    # every high half with the low halves that decide rounding: none, the least, just below, at and
    # just above halfway, the most; helpers.bf16_words (which writes the test checkpoints) is the reference
    high = np.arange(2**16, dtype=np.uint32)[:, None] << 16  # [65536, 1]
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)  # [6]
    x = (high | low).reshape(-1).view(np.float32)  # [393216]
    got = round_to_kv_dtype(x, "bfloat16")
    assert got.dtype == np.uint16
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], bf16_words(x[~nan]))  # largest finite + half: inf, as it should
    # bf16_words' carry would turn a nan into inf or -0: the cache keeps it a nan of the same sign
    nans = to_float32(got[nan])
    assert np.all(np.isnan(nans)) and np.array_equal(np.signbit(nans), np.signbit(x[nan]))


@settings(max_examples=50, deadline=None)
@given(kv_dtype=st.sampled_from(SIXTEEN_BIT), seed=st.integers(0, 2**32 - 1))
def test_16_bit_rounding_is_off_by_at_most_half_a_unit_in_the_last_place(kv_dtype, seed):
    rng = np.random.default_rng(seed)
    # float16's normal range (subnormals lose relative precision, beyond 65504 it overflows); bfloat16's is
    # float32's, sampled over many exponents
    low, high = (-14, 15.99) if kv_dtype == "float16" else (-120, 120)
    x = (rng.choice([-1, 1], 4096) * 2.0 ** rng.uniform(low, high, 4096)).astype(np.float32)  # [4096]
    stored = to_float32(round_to_kv_dtype(x, kv_dtype)).astype(np.float64)
    assert np.all(np.abs(stored - x) <= UNIT[kv_dtype] * np.abs(x))


def test_float16_rounding_overflows_to_inf_from_halfway_past_the_largest_value():
    x = np.array([65504, 65519.99, 65520, 1e6, -65520, np.inf], dtype=np.float32)
    want = [65504, 65504, np.inf, np.inf, -np.inf, np.inf]
    np.testing.assert_array_equal(to_float32(round_to_kv_dtype(x, "float16")), want)


def test_float32_cache_stores_the_values_themselves():
    x = np.random.default_rng(0).standard_normal((2, 3, 4), dtype=np.float32)
    assert round_to_kv_dtype(x, "float32") is x


# ---------------------------------------------------------------------------------------------
# Memory


@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
def test_cache_memory_is_what_kv_bytes_per_token_says_and_16_bit_halves_it(kv_dtype):
    config = QwenConfig.from_dict(small_config(num_hidden_layers=3, num_key_value_heads=2, hidden_size=64))
    capacity = 37
    cache = KVCache(config, capacity, kv_dtype)
    f32 = KVCache(config, capacity, "float32")
    nbytes = cache.keys.nbytes + cache.values.nbytes
    assert nbytes == capacity * kv_bytes_per_token(config, kv_dtype)
    assert nbytes * {"float32": 1, "bfloat16": 2, "float16": 2}[kv_dtype] == f32.keys.nbytes + f32.values.nbytes
    assert cache.keys.dtype == KV_DTYPES[kv_dtype] and cache.keys.shape == (3, 2, capacity, config.head_dim)


def test_an_unknown_kv_dtype_is_one_clear_error():
    config = QwenConfig.from_dict(small_config())
    with pytest.raises(QwenRefError, match=r"unknown KV cache dtype 'int8' \(choose from float32, bfloat16, float16\)"):
        KVCache(config, 4, "int8")
    with pytest.raises(QwenRefError, match="unknown KV cache dtype"):
        kv_bytes_per_token(config, "fp8")
    with pytest.raises(QwenRefError, match="unknown KV cache dtype 'f16'"):
        load_model(FIXTURES / "mha_f32_untied", kv_dtype="f16")


# ---------------------------------------------------------------------------------------------
# Writing and reading


@pytest.mark.parametrize("kv_dtype", SIXTEEN_BIT)
def test_cache_stores_rounded_words_and_attention_reads_them_to_float32(kv_dtype):
    config = QwenConfig.from_dict(small_config())  # 2 kv heads of hd 8, 4 query heads
    Hkv, hd = config.num_key_value_heads, config.head_dim
    rng = np.random.default_rng(1)
    k, v = rng.standard_normal((2, Hkv, 7, hd), dtype=np.float32)  # [Hkv, T, hd] each
    cache = KVCache(config, 10, kv_dtype)
    cache.write(1, 2, k, v)
    np.testing.assert_array_equal(cache.keys[1, :, 2:9], round_to_kv_dtype(k, kv_dtype))
    np.testing.assert_array_equal(cache.values[1, :, 2:9], round_to_kv_dtype(v, kv_dtype))
    assert not cache.keys[0].any() and not cache.keys[1, :, :2].any()  # nothing else was written
    # attention on the words is attention on their float32 values: the same float32 arithmetic, bit for bit
    q = rng.standard_normal((3, 4, hd), dtype=np.float32)  # [T, H, hd]
    np.testing.assert_array_equal(attention(q, cache.keys[1], cache.values[1], 9),
                                  attention(q, to_float32(cache.keys[1]), to_float32(cache.values[1]), 9))


@settings(max_examples=60, deadline=None)
@given(
    T=st.sampled_from([1, 1, 2, 7, 20]),
    past=st.integers(0, 200),
    Hkv=st.integers(1, 3),
    G=st.sampled_from([1, 2, 5]),  # with Hkv = 1 and G > 1: multi-query attention
    hd=st.sampled_from([2, 8, 64]),
    score_scale=st.sampled_from([0.1, 1.0, 3.0]),
    kv_dtype=st.sampled_from(SIXTEEN_BIT),
    seed=st.integers(0, 2**32 - 1),
)
def test_attention_over_a_16_bit_cache_stays_within_its_rounding_bound(T, past, Hkv, G, hd, score_scale, kv_dtype,
                                                                        seed):
    rng = np.random.default_rng(seed)
    S = past + T
    k, v = rng.standard_normal((2, Hkv, S, hd), dtype=np.float32)  # [Hkv, S, hd] each
    q = (score_scale * rng.standard_normal((T, Hkv * G, hd))).astype(np.float32)  # [T, H, hd]
    got = attention(q, round_to_kv_dtype(k, kv_dtype), round_to_kv_dtype(v, kv_dtype), S)
    want = attention(q, k, v, S)
    # A key off by u relatively moves a score s = q.k / sqrt(hd) by at most u a, a = |q|.|k| / sqrt(hd);
    # each side's float32 dot product adds (hd + 1) U a. Scores all moved by at most e change every softmax
    # weight by a factor within e^(+-2e), so the output by at most expm1(2e) max|v'| (v' the stored values,
    # within (1 + u) max|v|); the values' own rounding adds u max|v|, and the float32 softmax and weighted sum
    # on either side at most (3 S + 16) U max|v| each (tests/test_kernels.py, attention_bound).
    u = UNIT[kv_dtype]
    a = np.abs(q.astype(np.float64)).transpose(1, 0, 2) @ np.abs(k.astype(np.float64)).repeat(G, 0).transpose(0, 2, 1)
    e = (u + 2 * (hd + 1) * U) * a.max(axis=-1) * hd**-0.5  # [H, T]
    v_max = np.abs(v).max(axis=(1, 2)).repeat(G)[:, None]  # [H, 1]
    bound = (np.expm1(2 * e) * (1 + u) + u + 2 * (3 * S + 16) * U) * v_max  # [H, T]
    assert np.all(np.abs(got - want) <= bound.T.repeat(hd, axis=1))
