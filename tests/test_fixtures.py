"""qwen-ref against logits and greedy generations that transformers (float32, eager) wrote to tests/fixtures.

Regenerate the fixtures with `python tools/make_fixtures.py` (needs the `reference` extra).
"""

import numpy as np
import pytest
from helpers import FIXTURES

from qwen_ref.backends import BACKEND_NAMES, get_backend
from qwen_ref.compare import compare_logits
from qwen_ref.config import load_generation_config
from qwen_ref.generation import generate
from qwen_ref.model import load_model
from qwen_ref.sampling import Sampler, SamplingParams

CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.npz").is_file())


def test_every_fixture_case_is_present():
    # the suite must not pass vacuously if the fixtures go missing
    assert len(CASES) >= 10, CASES


def _load(case, backend_name):
    model = load_model(FIXTURES / case, get_backend(backend_name))
    return model, np.load(FIXTURES / case / "reference.npz")


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, backend_name):
    model, ref = _load(case, backend_name)
    prompt = ref["prompt_tokens"]
    logits = model.forward(prompt, model.new_cache(len(prompt)))[ref["logit_positions"]]  # [P, V]
    report = compare_logits(ref["logits"], logits)
    assert report.ok, report.summary()


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_transformers_token_for_token(case, backend_name):
    model, ref = _load(case, backend_name)
    gen = load_generation_config(FIXTURES / case, model.config)
    sampler = Sampler(SamplingParams.from_generation_config(gen))  # do_sample false: greedy, as transformers
    expected = ref["greedy_tokens"].tolist()
    generated = list(generate(model, ref["prompt_tokens"].tolist(), int(ref["max_new_tokens"]), gen.eos_token_ids, sampler))
    assert generated == expected


def test_eos_fixture_really_stops_early_on_an_eos_id():
    model, ref = _load("eos_stop_f32", "numpy")
    eos = load_generation_config(FIXTURES / "eos_stop_f32", model.config).eos_token_ids
    tokens = ref["greedy_tokens"].tolist()
    assert len(tokens) < int(ref["max_new_tokens"]) and tokens[-1] in eos


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
def test_kv_cache_decode_equals_full_recompute_on_long_sequence(backend_name):
    model, ref = _load("long_seq_bf16", backend_name)
    prompt = ref["prompt_tokens"]
    full = model.forward(prompt, model.new_cache(len(prompt)))  # [T, V]
    cache = model.new_cache(len(prompt))
    # uneven chunks, then single tokens: every path through the cache must give the same numbers
    steps = [model.forward(prompt[:100], cache), model.forward(prompt[100:237], cache)]
    steps += [model.forward(prompt[t : t + 1], cache) for t in range(237, len(prompt))]
    report = compare_logits(full, np.concatenate(steps))
    assert report.ok, report.summary()
