"""The distribution qwen-ref samples from equals the one transformers' logits processors produce."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_ref.config import GenerationConfig
from qwen_ref.errors import QwenRefError
from qwen_ref.sampling import Sampler, SamplingParams, next_token_distribution


@st.composite
def sampling_cases(draw):
    vocab = draw(st.integers(2, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(vocab) * draw(st.sampled_from([0.5, 3.0, 10.0]))).astype(np.float32)
    history = rng.integers(0, vocab, draw(st.integers(0, 30))).tolist()
    params = SamplingParams(
        temperature=draw(st.sampled_from([0.3, 0.7, 1.0, 1.5])),
        top_k=draw(st.sampled_from([0, 1, 3, 50, 1000])),
        top_p=draw(st.sampled_from([0.1, 0.5, 0.8, 0.95, 1.0])),
        min_p=draw(st.sampled_from([None, 0.0, 0.05, 0.3])),
        repetition_penalty=draw(st.sampled_from([0.8, 1.0, 1.1, 1.5])),
    )
    return logits, history, params


def _transformers_distribution(torch, transformers, logits, history, params):
    """The processors generate() would build for these settings, in its order, then softmax."""
    from transformers.generation import logits_process as lp

    processors = []
    if params.repetition_penalty != 1.0:
        processors.append(lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature != 1.0:
        processors.append(lp.TemperatureLogitsWarper(params.temperature))
    if params.top_k != 0:
        processors.append(lp.TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(lp.TopPLogitsWarper(params.top_p))
    if params.min_p is not None:
        processors.append(lp.MinPLogitsWarper(params.min_p))
    input_ids = torch.tensor([history or [0]])[:, : len(history) or 0]
    scores = torch.tensor(logits)[None]
    for processor in processors:
        scores = processor(input_ids, scores)
    return torch.softmax(scores, dim=-1)[0].double().numpy()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=sampling_cases())
def test_sampling_distribution_equals_transformers_processors(torch_reference, case):
    torch, transformers = torch_reference
    logits, history, params = case
    expected = _transformers_distribution(torch, transformers, logits, history, params)
    ours = next_token_distribution(logits, history, params)
    # the same tokens survive the filters ...
    assert np.array_equal(ours > 0, expected > 0)
    # ... with the same probabilities: float32 softmax rounding (~1e-7 relative) is all that differs
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-7)


def test_greedy_applies_the_repetition_penalty_as_transformers_greedy_does():
    logits = np.array([2.0, 1.9, -1.0], np.float32)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.1)
    # token 0 was seen: 2.0 / 1.1 = 1.82 < 1.9, so greedy moves to token 1
    assert Sampler(params)(logits, [0]) == 1
    assert Sampler(SamplingParams(temperature=0.0))(logits, [0]) == 0


def test_same_seed_same_tokens_and_different_seed_differs():
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal(100).astype(np.float32) for _ in range(50)]
    params = SamplingParams(temperature=1.0, top_k=0)
    first_run, second_run = Sampler(params, seed=7), Sampler(params, seed=7)
    first = [first_run(x, []) for x in logits]
    assert first == [second_run(x, []) for x in logits]
    other = Sampler(params, seed=8)
    assert first != [other(x, []) for x in logits]


def test_draws_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0), seed=1)
    counts = np.bincount([sampler(logits, []) for _ in range(20000)], minlength=3) / 20000
    # 20000 draws: the standard error of each frequency is below 0.004, so 0.02 is a 5-sigma bound
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.02)


def test_qwen15_chat_generation_config_samples_like_transformers_defaults():
    # Qwen1.5-Chat ships do_sample, top_p 0.8, repetition_penalty 1.1 and no top_k or temperature
    gen = GenerationConfig(eos_token_ids=(151645, 151643), do_sample=True, top_p=0.8, repetition_penalty=1.1)
    assert SamplingParams.from_generation_config(gen) == SamplingParams(
        temperature=1.0, top_k=50, top_p=0.8, min_p=None, repetition_penalty=1.1
    )


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top-p"), ({"top_k": -2}, "top-k"),
     ({"min_p": 2}, "min-p"), ({"repetition_penalty": 0}, "repetition-penalty")],
)
def test_bad_sampling_values_name_the_flag(kwargs, field):
    with pytest.raises(QwenRefError, match=field):
        SamplingParams(**kwargs)
