"""Live oracle: hypothesis draws small Qwen2 configs, transformers builds and runs each, qwen-ref must agree.

Runs wherever the `reference` extra is installed; CI requires it (QWEN_REF_REQUIRE_REFERENCE=1).
"""

import numpy as np
import pytest
from helpers import transformers_random_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_ref.backends import BACKEND_NAMES, get_backend
from qwen_ref.compare import compare_logits
from qwen_ref.generation import generate
from qwen_ref.model import load_model
from qwen_ref.sampling import GREEDY, Sampler

GREEDY_TOKENS = 24


@st.composite
def qwen2_configs(draw):
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 4, 5, 8]))  # 5 is the Qwen1.5-32B ratio (40 query : 8 kv heads)
    head_dim = draw(st.sampled_from([4, 6, 8, 14, 16, 32, 64, 128]))
    heads = kv_heads * group
    config = dict(
        vocab_size=draw(st.integers(17, 400)),
        intermediate_size=draw(st.integers(5, 120)),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
        rope_theta=draw(st.sampled_from([1e4, 1e6, 5e6])),
        tie_word_embeddings=draw(st.booleans()),
        max_position_embeddings=256,
    )
    if draw(st.booleans()):
        config["hidden_size"] = heads * head_dim
    else:  # head_dim given explicitly, independent of hidden_size, as transformers allows
        config |= {"hidden_size": draw(st.integers(4, 96)), "head_dim": head_dim}
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    n_tokens = draw(st.integers(1, 40))
    return config, dtype, n_tokens, draw(st.integers(0, 2**31 - 1))


def _margins(logits):
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=qwen2_configs())
def test_random_configs_agree_with_transformers_float32(torch_reference, tmp_path_factory, backend_name, case):
    torch, transformers = torch_reference
    config, dtype, n_tokens, seed = case
    model = transformers_random_model(torch, transformers, config, seed)
    model_dir = tmp_path_factory.mktemp("live")
    model.to(getattr(torch, dtype)).save_pretrained(model_dir)
    # The reference runs the stored (rounded) weights widened to float32. Reload rather than cast back:
    # .to(dtype) also rounds the RoPE inv_freq buffer, which a fresh float32 model computes exactly.
    model = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()

    tokens = np.random.default_rng(seed).integers(0, config["vocab_size"], n_tokens)
    with torch.no_grad():
        ref = model(torch.tensor(tokens)[None]).logits[0].numpy()  # [T, V]
    ours = load_model(model_dir, get_backend(backend_name))

    full = ours.forward(tokens, ours.new_cache(n_tokens))
    report = compare_logits(ref, full)
    assert report.max_abs_diff <= report.tolerance, report.summary()
    # Where the reference's top two logits are closer than the allowed difference, either order is
    # within tolerance; everywhere else the argmax must be identical.
    clear = _margins(ref) > 2 * report.tolerance
    assert np.array_equal(ref.argmax(-1)[clear], full.argmax(-1)[clear]), report.summary()

    # KV cache: a prefix, then one token at a time, gives the same logits as one pass
    cache = ours.new_cache(n_tokens)
    split = n_tokens // 2 or 1
    steps = [ours.forward(tokens[:split], cache)] + [ours.forward(tokens[t : t + 1], cache) for t in range(split, n_tokens)]
    incremental = compare_logits(ref, np.concatenate(steps))
    assert incremental.max_abs_diff <= incremental.tolerance, incremental.summary()

    with torch.no_grad():
        # an explicit all-ones mask: otherwise generate() masks prompt tokens that equal pad_token_id
        out = model.generate(
            torch.tensor(tokens)[None], attention_mask=torch.ones(1, n_tokens, dtype=torch.long), do_sample=False,
            max_new_tokens=GREEDY_TOKENS, eos_token_id=None, pad_token_id=0, output_scores=True,
            return_dict_in_generate=True,
        )
    expected = out.sequences[0, n_tokens:].tolist()
    step_margins = _margins(torch.stack(out.scores)[:, 0].numpy())
    # compare up to and including the first step whose top-1 is a near-tie (beyond it the runs may fork)
    near_tie = np.flatnonzero(step_margins <= 2 * report.tolerance)
    n_check = GREEDY_TOKENS if len(near_tie) == 0 else int(near_tie[0])
    greedy = list(generate(ours, tokens.tolist(), GREEDY_TOKENS, (), Sampler(GREEDY)))
    assert greedy[:n_check] == expected[:n_check]

