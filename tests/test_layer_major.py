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
from qwen_ref.model import load_model
from qwen_ref.paging import _mapping, advise


def _chunk_by_chunk(model, tokens, chunk):
    cache = model.new_cache(len(tokens))
    return np.concatenate([model.forward(tokens[s : s + chunk], cache) for s in range(0, len(tokens), chunk)])


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
@pytest.mark.parametrize("case, chunk", [("long_seq_bf16", 96), ("mqa_f16", 5), ("mha_f32_untied", 3)])
def test_layer_major_logits_equal_chunk_by_chunk_bit_for_bit(backend_name, case, chunk):
    model = load_model(FIXTURES / case, get_backend(backend_name), layer_major=True)
    tokens = np.load(FIXTURES / case / "reference.npz")["prompt_tokens"]
    expected = _chunk_by_chunk(model, tokens, chunk)  # [T, V]
    cache = model.new_cache(len(tokens))
    progress = []
    got = model.forward_layer_major(tokens, cache, chunk, on_chunk=progress.append)
    assert np.array_equal(got, expected)
    assert sum(progress) == len(tokens) and cache.length == len(tokens)
    # the cache holds what the chunk-by-chunk run leaves, so decoding after either agrees too
    again = model.new_cache(len(tokens))
    for s in range(0, len(tokens), chunk):
        model.forward(tokens[s : s + chunk], again)
    assert np.array_equal(cache.keys, again.keys) and np.array_equal(cache.values, again.values)
    last = model.forward_layer_major(tokens, model.new_cache(len(tokens)), chunk, last_only=True)  # [1, V]
    cache = model.new_cache(len(tokens))
    for s in range(0, len(tokens), chunk):
        want = model.forward(tokens[s : s + chunk], cache, last_only=True)
    assert np.array_equal(last, want)


def test_prefill_runs_layer_major_when_the_model_is_set_to():
    case = "long_seq_bf16"
    tokens = np.load(FIXTURES / case / "reference.npz")["prompt_tokens"]
    chunk_major = load_model(FIXTURES / case, get_backend("numpy"), layer_major=False)
    layer_major = load_model(FIXTURES / case, get_backend("numpy"), layer_major=True)
    assert chunk_major.pager is None and layer_major.pager is not None
    want = prefill(chunk_major, tokens, chunk_major.new_cache(len(tokens)), last_only=False)
    got = prefill(layer_major, tokens, layer_major.new_cache(len(tokens)), last_only=False)
    assert np.array_equal(got, want)


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
