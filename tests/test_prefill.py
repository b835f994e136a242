"""prefill: a prompt in chunks, with logits for the rows asked for and no others."""

import numpy as np
import pytest
from helpers import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_ref.backends import BACKEND_NAMES, get_backend
from qwen_ref.generation import prefill
from qwen_ref.model import ALL_ROWS, LAST_ROW, NO_ROWS, load_model

PROMPT = np.load(FIXTURES / "long_seq_bf16" / "reference.npz")["prompt_tokens"][:100]
ends = st.none() | st.integers(-len(PROMPT) - 2, len(PROMPT) + 2)


@pytest.fixture(scope="module", params=BACKEND_NAMES)
def model(request):
    return load_model(FIXTURES / "long_seq_bf16", get_backend(request.param))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=ends, stop=ends, chunk=st.sampled_from([1, 3, 8, 37, 512]))
def test_any_slice_of_rows_is_the_same_rows_of_all_logits_bit_for_bit(model, start, stop, chunk):
    full = prefill(model, PROMPT, model.new_cache(len(PROMPT)), ALL_ROWS, chunk)  # [T, V]
    part = prefill(model, PROMPT, model.new_cache(len(PROMPT)), slice(start, stop), chunk)  # [n, V]
    assert np.array_equal(part, full[start:stop])


def test_no_rows_fills_the_cache_without_logits_and_decoding_goes_on_from_it(model):
    cache = model.new_cache(len(PROMPT) + 1)
    assert prefill(model, PROMPT, cache, NO_ROWS, 32).shape == (0, model.config.vocab_size)
    assert cache.length == len(PROMPT)
    with_logits = model.new_cache(len(PROMPT) + 1)
    prefill(model, PROMPT, with_logits, LAST_ROW, 32)
    step = model.forward(np.array([5]), cache, LAST_ROW)  # [1, V]
    assert np.array_equal(step, model.forward(np.array([5]), with_logits, LAST_ROW))
