"""`qwen-ref info`: parameter counts and memory arithmetic, checked against numbers computed here
from the config fields, against what transformers wrote, and on the published Qwen1.5-32B config."""

import json
import shutil
import subprocess
import sys

import pytest
from helpers import FIXTURES, expected_parameters, write_safetensors

from qwen_ref.config import QwenConfig, load_config
from qwen_ref.info import (
    human_bytes,
    kv_cache_bytes_per_token,
    model_info,
    parameter_count,
)
from qwen_ref.weights import read_safetensors, to_float32

CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.npz").is_file())
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

# config.json of Qwen/Qwen1.5-32B as published (transformers 4.37 layout).
QWEN15_32B = {
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
    "hidden_size": 5120, "intermediate_size": 27392, "max_position_embeddings": 32768, "max_window_layers": 35,
    "model_type": "qwen2", "num_attention_heads": 40, "num_hidden_layers": 64, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}


def qwen_ref(*args):
    return subprocess.run([sys.executable, "-m", "qwen_ref", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("case", CASES)
def test_fixture_parameter_count_matches_config_arithmetic_and_stored_bytes(case):
    config = load_config(FIXTURES / case)
    count = parameter_count(config)
    assert count.total == expected_parameters(config)
    assert count.embedding == config.vocab_size * config.hidden_size
    assert count.lm_head == (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    info = model_info(FIXTURES / case)
    name = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[config.torch_dtype]
    assert info["stored_bytes"] == {name: count.total * ITEMSIZE[config.torch_dtype]}  # all in the saved dtype


def test_sharded_fixture_total_equals_what_transformers_wrote_in_its_index():
    index = json.loads((FIXTURES / "hd64_sharded_bf16" / "model.safetensors.index.json").read_text())
    info = model_info(FIXTURES / "hd64_sharded_bf16")
    assert info["parameters"]["total"] == index["metadata"]["total_parameters"]
    assert info["weights_bytes"] == index["metadata"]["total_size"]


def test_qwen15_32b_has_32_5_billion_parameters():
    config = QwenConfig.from_dict(QWEN15_32B)
    count = parameter_count(config)
    # per layer: q 5120*5120+5120, k and v 5120*1024+1024 each, o 5120*5120, MLP 3*5120*27392, 2 norms
    layer = (5120 * 5120 + 5120) + 2 * (5120 * 1024 + 1024) + 5120 * 5120 + 3 * 5120 * 27392 + 2 * 5120
    assert count.total == 152064 * 5120 * 2 + 64 * layer + 5120 == 32_512_218_112
    assert count.non_embedding == 64 * layer + 5120
    assert round(count.total / 1e9, 1) == 32.5  # the published size


def test_qwen15_32b_kv_cache_is_512_kib_per_token():
    config = QwenConfig.from_dict(QWEN15_32B)
    assert kv_cache_bytes_per_token(config) == 2 * 64 * 8 * 128 * 4 == 512 * 1024  # K and V, L, Hkv, hd, float32


def test_config_only_folder_estimates_weights_from_torch_dtype(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN15_32B))
    result = qwen_ref("info", "--model", tmp_path, "--context", 4096, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["parameters"]["total"] == 32_512_218_112
    assert out["stored_bytes"] == {"BF16": 2 * 32_512_218_112} and out["weights_source"].startswith("estimated")
    assert out["kv_cache"] == {"dtype": "float32", "bytes_per_token": 524288, "context": 4096,
                               "bytes": 4096 * 524288}
    text = qwen_ref("info", "--model", tmp_path)
    assert text.returncode == 0, text.stderr
    assert "32,512,218,112 total" in text.stdout and "16.00 GiB for 32,768 tokens" in text.stdout


def test_info_text_and_json_on_a_checkpoint():
    model = FIXTURES / "gqa40x8_bf16_tied"
    out = json.loads(qwen_ref("info", "--model", model, "--json").stdout)
    c = load_config(model)
    assert out["architecture"]["num_key_value_heads"] == 2 and out["architecture"]["tie_word_embeddings"] is True
    assert out["kv_cache"]["context"] == c.max_position_embeddings  # the default --context
    assert out["kv_cache"]["bytes_per_token"] == 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    assert out["weights_source"] == "safetensors"
    text = qwen_ref("info", "--model", model)
    assert text.returncode == 0 and "10 heads, 2 kv heads (group 5), head_dim 16" in text.stdout
    assert f"{out['parameters']['total']:,} total" in text.stdout


@pytest.mark.parametrize(
    "n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (3 * 2**29, "1.50 GiB"), (2**50, "1024.00 TiB")]
)
def test_human_bytes_uses_binary_units(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--model", FIXTURES / "mqa_f16", "--context", "0"], "positive integer"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    result = qwen_ref("info", *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_tied_checkpoint_shipping_a_redundant_lm_head_counts_it_once(tmp_path):
    # a tied checkpoint that also ships lm_head.weight: the loader ignores it, and so does the count
    model = tmp_path / "m"
    shutil.copytree(FIXTURES / "gqa40x8_bf16_tied", model)
    tensors = {k: ("BF16", to_float32(v)) for k, v in read_safetensors(model / "model.safetensors").items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    write_safetensors(model / "model.safetensors", tensors)
    info = model_info(model)
    assert info["parameters"]["lm_head"] == 0
    assert info["weights_bytes"] == 2 * info["parameters"]["total"] == 2 * expected_parameters(load_config(model))
