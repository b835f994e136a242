"""qwen_ref/published.py: the published config.json values of every Qwen1.5 size give the parameter count the
Hugging Face Hub publishes for it (the source of each count is named beside it in published.py), and
`published_shape` names a config's size, or a slice of its layers, and nothing else."""

import dataclasses

import pytest
from helpers import expected_parameters

from qwen_ref.config import QwenConfig
from qwen_ref.info import parameter_count
from qwen_ref.published import PUBLISHED, published_shape


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_published_config_gives_the_published_parameter_count(size):
    shape = PUBLISHED[size]
    config = QwenConfig.from_dict(shape.config_json())
    total = expected_parameters(config)  # the architecture written out in tests/helpers.py
    assert parameter_count(config).total == total
    # The Hub counts what the files hold: Qwen1.5-0.5B's also hold its tied LM head (1.24 GB in bf16).
    assert shape.stores_tied_lm_head == shape.tie_word_embeddings == (size == "0.5b")
    counted = total + (config.vocab_size * config.hidden_size if shape.stores_tied_lm_head else 0)
    digits = len(shape.billions.split(".")[1])
    assert f"{counted / 1e9:.{digits}f}" == shape.billions  # published to the Hub's digits, e.g. "32.512"
    assert shape.counted_as_published(parameter_count(config).total, parameter_count(config).embedding) == counted


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_published_shape_names_a_size_and_its_layer_slices(size):
    raw = PUBLISHED[size].config_json()
    assert published_shape(QwenConfig.from_dict(raw)) is PUBLISHED[size]
    assert published_shape(QwenConfig.from_dict({**raw, "num_hidden_layers": 2})) is PUBLISHED[size]
    assert published_shape(QwenConfig.from_dict({**raw, "num_hidden_layers": raw["num_hidden_layers"] + 1})) is None
    assert published_shape(QwenConfig.from_dict({**raw, "tie_word_embeddings": not raw["tie_word_embeddings"]})) is None


def test_other_qwen2_shapes_are_not_named():
    # Qwen2-0.5B: the same vocabulary, a different shape
    qwen2 = dataclasses.replace(PUBLISHED["0.5b"], hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                num_key_value_heads=2)
    assert published_shape(QwenConfig.from_dict(qwen2.config_json())) is None
