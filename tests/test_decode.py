"""kernels.decode.DecoderStack: a decode step's layers in one call give the logits of the op-by-op path, bit for bit.

Both run the same kernels in the same order on the same float32 values, so there is no tolerance:
any difference means the stack computes something else (a missed bias, a wrong cache slot, other
attention key splits).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qwen_ref.backends import get_backend
from qwen_ref.model import QwenModel, load_model
from tests.helpers import random_checkpoint, small_config


@pytest.mark.parametrize(
    "dtype, hidden, heads, kv_heads, context",
    [
        ("BF16", 256, 4, 4, 5),  # hd 64 without GQA, as Qwen1.5 below 32B: attention a row at a time
        ("BF16", 128, 8, 2, 600),  # G = 4: tiled attention; 601 keys on 2 kv heads: split key ranges
        ("F16", 96, 6, 2, 9),  # G = 3, hd 16
        ("F32", 64, 4, 1, 17),
    ],
)
def test_decoder_stack_matches_the_operations_bit_for_bit(tmp_path, dtype, hidden, heads, kv_heads, context):
    config = small_config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          intermediate_size=2 * hidden + 16, max_position_embeddings=1024)
    random_checkpoint(tmp_path, config, dtype=dtype)
    numba = get_backend("numba")
    stacked = load_model(tmp_path, numba)
    op_by_op = QwenModel(stacked.config, stacked.weights, dataclasses.replace(numba, decoder_stack=None))
    assert stacked.decoder_stack is not None and op_by_op.decoder_stack is None
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], context)
    caches = [model.new_cache(context + 3) for model in (stacked, op_by_op)]
    for model, cache in zip((stacked, op_by_op), caches):
        model.forward(tokens, cache)  # the prompt: op by op in both
    for token in (7, 3, 11):  # decode steps: the stack in one model, the operations in the other
        a = stacked.forward(np.array([token]), caches[0], last_only=True)
        b = op_by_op.forward(np.array([token]), caches[1], last_only=True)
        np.testing.assert_array_equal(a, b)
    assert caches[0].length == caches[1].length == context + 3
    np.testing.assert_array_equal(caches[0].keys, caches[1].keys)
    np.testing.assert_array_equal(caches[0].values, caches[1].values)
