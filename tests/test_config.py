import json

import pytest

from qwen_ref.config import QwenConfig, load_generation_config
from qwen_ref.errors import QwenRefError

# The layout of the published Qwen1.5 config.json files (transformers 4.37 wrote them).
QWEN15_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 2816, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.37.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_published_qwen15_config_reads_every_field():
    cfg = QwenConfig.from_dict(QWEN15_05B)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (1024, 2816, 24)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.group_size) == (16, 16, 64, 1)
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6 and cfg.tie_word_embeddings
    assert cfg.eos_token_ids == (151643,) and cfg.bos_token_id == 151643 and cfg.torch_dtype == "bfloat16"


def test_32b_grouped_query_shape_and_4b_rope_theta_are_read_not_assumed():
    cfg32 = QwenConfig.from_dict(
        QWEN15_05B | {"hidden_size": 5120, "intermediate_size": 27392, "num_hidden_layers": 64,
                      "num_attention_heads": 40, "num_key_value_heads": 8, "tie_word_embeddings": False}
    )
    assert (cfg32.head_dim, cfg32.group_size, cfg32.tie_word_embeddings) == (128, 5, False)
    cfg4 = QwenConfig.from_dict(QWEN15_05B | {"hidden_size": 2560, "num_attention_heads": 20,
                                              "num_key_value_heads": 20, "rope_theta": 5000000.0, "rms_norm_eps": 1e-5})
    assert cfg4.rope_theta == 5e6 and cfg4.rms_norm_eps == 1e-5


def test_transformers5_layout_nests_rope_theta_and_allows_explicit_head_dim():
    raw = {k: v for k, v in QWEN15_05B.items() if k not in ("rope_theta", "torch_dtype")}
    raw |= {"rope_parameters": {"rope_theta": 2e6, "rope_type": "default"}, "dtype": "float32",
            "layer_types": ["full_attention"] * 24, "head_dim": 80}
    cfg = QwenConfig.from_dict(raw)
    assert cfg.rope_theta == 2e6 and cfg.head_dim == 80 and cfg.torch_dtype == "float32"


def test_missing_optional_fields_take_transformers_defaults():
    raw = {k: QWEN15_05B[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                      "num_hidden_layers", "num_attention_heads")}
    cfg = QwenConfig.from_dict(raw)
    # Qwen2Config's own defaults: theta 10000, eps 1e-6, MHA, untied, 32768 positions
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.num_key_value_heads) == (10000.0, 1e-6, 16)
    assert (cfg.tie_word_embeddings, cfg.max_position_embeddings, cfg.eos_token_ids) == (False, 32768, ())


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}, "rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"hidden_size": 1000}, "hidden_size"),
        ({"num_key_value_heads": 6}, "num_key_value_heads"),
        ({"layer_types": ["sliding_attention"] * 24}, "layer_types"),
        ({"vocab_size": None}, "vocab_size"),
        ({"eos_token_id": "</s>"}, "eos_token_id"),
        ({"rope_theta": -1}, "rope_theta"),
    ],
)
def test_unsupported_or_broken_settings_raise_naming_the_field(change, field):
    with pytest.raises(QwenRefError, match=field):
        QwenConfig.from_dict(QWEN15_05B | change)


def test_generation_config_eos_list_and_sampling_defaults(tmp_path):
    cfg = QwenConfig.from_dict(QWEN15_05B)
    # Qwen1.5-Chat's generation_config.json: no top_k or temperature, so transformers' defaults apply
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
         "repetition_penalty": 1.1, "top_p": 0.8}
    ))
    gen = load_generation_config(tmp_path, cfg)
    assert gen.eos_token_ids == (151645, 151643) and gen.do_sample
    assert (gen.top_p, gen.repetition_penalty, gen.top_k, gen.temperature) == (0.8, 1.1, 50, 1.0)


def test_generation_config_absent_falls_back_to_config_eos(tmp_path):
    gen = load_generation_config(tmp_path, QwenConfig.from_dict(QWEN15_05B))
    assert gen.eos_token_ids == (151643,) and not gen.do_sample
