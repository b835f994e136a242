"""The Python API another project's test suite uses: load, get logits, assert they are close."""

import numpy as np
import pytest
from helpers import FIXTURES

import qwen_ref


def test_other_projects_check_their_logits_in_three_calls():
    ref = np.load(FIXTURES / "mqa_f16" / "reference.npz")
    model = qwen_ref.load_model(FIXTURES / "mqa_f16")
    ours = qwen_ref.logits_for_tokens(model, ref["prompt_tokens"].tolist())
    qwen_ref.assert_logits_close(ref["logits"], ours)

    wrong = ours.copy()
    wrong[3] = np.roll(wrong[3], 1)  # a different engine that is off at position 3
    with pytest.raises(AssertionError, match="position 3"):
        qwen_ref.assert_logits_close(ours, wrong)


def test_empty_or_oversized_token_lists_are_user_errors():
    model = qwen_ref.load_model(FIXTURES / "mqa_f16")
    with pytest.raises(qwen_ref.QwenRefError, match="empty"):
        qwen_ref.logits_for_tokens(model, [])
    with pytest.raises(qwen_ref.QwenRefError, match="context"):
        qwen_ref.logits_for_tokens(model, [1] * (model.config.max_position_embeddings + 1))
