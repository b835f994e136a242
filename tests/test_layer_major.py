"""Layer-major prompts (for checkpoints larger than memory) give the chunk-by-chunk logits bit for bit.

Each chunk meets the same operations on the same float32 values in both orders, so there is no
tolerance: any difference means a chunk saw other keys, positions or inputs.
"""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from helpers import FIXTURES

from qwen_ref.backends import BACKEND_NAMES, get_backend
from qwen_ref.generation import prefill
from qwen_ref.model import ALL_ROWS, LAST_ROW, load_model
from qwen_ref.paging import _mapping, advise


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
@pytest.mark.parametrize("case, chunk", [("long_seq_bf16", 96), ("mqa_f16", 5), ("mha_f32_untied", 3)])
def test_layer_major_logits_and_cache_equal_chunk_by_chunk_bit_for_bit(backend_name, case, chunk):
    tokens = np.load(FIXTURES / case / "reference.npz")["prompt_tokens"]
    chunk_major = load_model(FIXTURES / case, get_backend(backend_name), layer_major=False)
    layer_major = load_model(FIXTURES / case, get_backend(backend_name), layer_major=True)
    assert chunk_major.pager is None and layer_major.pager is not None
    for rows in (ALL_ROWS, LAST_ROW, slice(chunk - 2, chunk + 3)):  # every row, the last, across a chunk end
        want_cache, got_cache = chunk_major.new_cache(len(tokens)), layer_major.new_cache(len(tokens))
        progress = []
        want = prefill(chunk_major, tokens, want_cache, rows, chunk)
        got = prefill(layer_major, tokens, got_cache, rows, chunk, on_chunk=progress.append)
        assert np.array_equal(got, want), rows
        assert sum(progress) == len(tokens) and got_cache.length == want_cache.length == len(tokens)
        # the caches agree too, so decoding after either gives the same tokens
        assert np.array_equal(got_cache.keys, want_cache.keys) and np.array_equal(got_cache.values, want_cache.values)


def test_the_pager_advises_the_checkpoint_file_pages_of_every_layer_weight():
    model = load_model(FIXTURES / "hd64_sharded_bf16", get_backend("numpy"), layer_major=True)
    for i in range(model.config.num_hidden_layers):
        for name, weight in model._layer_weights(i).items():
            found = _mapping(weight)
            assert found is not None, (i, name)
            mapping, offset = found
            # the offset is the weight's place in its file: the bytes there are the weight's
            assert mapping[offset : offset + 16] == weight.reshape(-1).view(np.uint8)[:16].tobytes()
        advise(model._layer_weights(i).values(), mmap.MADV_WILLNEED)  # accepted by the kernel: no error
    for i in range(model.config.num_hidden_layers):
        model.pager.start(i)
