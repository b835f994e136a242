"""jitkernels.decode.DecoderStack: a decode step's layers in one call give the logits of the op-by-op path, bit for bit.

Both run the same kernels in the same order on the same float32 values, so there is no tolerance:
any difference means the stack computes something else (a missed bias, a wrong cache slot, other
attention key splits). With a 16-bit cache the stack rounds the step's keys and values itself
(`jitkernels.narrow`), the operations through `qwen_ref.kv_cache`: the caches must hold the same words.
"""

from __future__ import annotations

import dataclasses

import numba
import numpy as np
import pytest
from helpers import random_checkpoint, small_config

from qwen_ref.backends import get_backend
from qwen_ref.kv_cache import KV_DTYPES
from qwen_ref.model import LAST_ROW, QwenModel, load_model
from qwen_ref.trace import Recorder


@pytest.mark.parametrize(
    "dtype, shape, context",
    [
        ("BF16", {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4}, 5),  # hd 64, no GQA, as Qwen1.5 below 32B: attention a row at a time
        # G = 4: tiled attention; 1101+ keys on 2 kv heads: 2 key ranges per item on 1 thread, 4 on 2
        ("BF16", {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2}, 1100),
        ("BF16", {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 81}, 0),  # odd F: down_proj not read in pairs; a first step with no past
        ("F16", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2}, 9),  # G = 3, hd 16
        ("F32", {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 24}, 17),  # H hd != D
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
def test_decoder_stack_matches_the_operations_bit_for_bit(tmp_path, dtype, shape, context, threads, kv_dtype):
    config = small_config(**{"intermediate_size": 2 * shape["hidden_size"] + 16, **shape}, max_position_embeddings=2048)
    random_checkpoint(tmp_path, config, dtype=dtype)
    numba_backend = get_backend("numba")
    stacked = load_model(tmp_path, numba_backend, kv_dtype)
    op_by_op = QwenModel(stacked.config, stacked.weights, dataclasses.replace(numba_backend, decoder_stack=None),
                         kv_dtype)
    calls = []
    stack = stacked.decoder_stack
    stacked.decoder_stack = lambda *args: calls.append(1) or stack(*args)  # counts the steps it runs

    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], context)
    caches = [model.new_cache(context + 3) for model in (stacked, op_by_op)]
    if context:
        for model, cache in zip((stacked, op_by_op), caches):
            model.forward(tokens, cache)  # the prompt: op by op in both
    before = numba.get_num_threads()
    numba.set_num_threads(threads)  # after the stack was made: it must read the count at each call
    try:
        for token in (7, 3, 11):  # decode steps: the stack in one model, the operations in the other
            a = stacked.forward(np.array([token]), caches[0], LAST_ROW)
            b = op_by_op.forward(np.array([token]), caches[1], LAST_ROW)
            np.testing.assert_array_equal(a, b)
    finally:
        numba.set_num_threads(before)
    assert len(calls) == 3
    assert caches[0].length == caches[1].length == context + 3
    bits = f"u{caches[0].keys.itemsize}"  # the stored words, signed zeros included
    assert caches[0].keys.dtype == KV_DTYPES[kv_dtype]
    np.testing.assert_array_equal(caches[0].keys.view(bits), caches[1].keys.view(bits))
    np.testing.assert_array_equal(caches[0].values.view(bits), caches[1].values.view(bits))


def test_decoder_stack_steps_aside_for_a_wrapping_backend_or_a_recorder(tmp_path):
    """A backend that wraps the operations (decoder_stack=None) and a recorder must each see every operation."""
    random_checkpoint(tmp_path, small_config())
    model = load_model(tmp_path, get_backend("numba"))
    assert model.fused_decode
    seen = []
    model.backend = dataclasses.replace(model.backend, decoder_stack=None,
                                        rms_norm=lambda *args: seen.append(1) or get_backend("numba").rms_norm(*args))
    assert not model.fused_decode
    model.forward(np.array([1]), model.new_cache(4))
    assert len(seen) == 2 * model.config.num_hidden_layers + 1  # two per layer and the final norm

    model = load_model(tmp_path, get_backend("numba"))
    model.recorder = Recorder(names=["l_out"])
    assert not model.fused_decode
    model.forward(np.array([1]), model.new_cache(4))
    assert list(model.recorder.tensors()) == [f"blk.{i}.l_out" for i in range(model.config.num_hidden_layers)]
