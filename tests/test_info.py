"""`qwen-ref info`: parameter counts and memory arithmetic, checked against numbers computed here
from the config fields, against what transformers wrote, on the published Qwen1.5-32B config, and on
config-only folders of every published shape written by tools/make_checkpoint.py."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FIXTURES, expected_parameters, write_safetensors

from qwen_ref.config import QwenConfig, load_config
from qwen_ref.info import (
    format_info,
    human_bytes,
    model_info,
    parameter_count,
)
from qwen_ref.kv_cache import kv_bytes_per_token
from qwen_ref.paging import read_meminfo
from qwen_ref.published import PUBLISHED
from qwen_ref.weights import read_safetensors, to_float32

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30

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
    assert kv_bytes_per_token(config) == 2 * 64 * 8 * 128 * 4 == 512 * 1024  # K and V, L, Hkv, hd, float32


def test_config_only_folder_estimates_weights_from_torch_dtype(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN15_32B))
    result = qwen_ref("info", "--model", tmp_path, "--context", 4096, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["parameters"]["total"] == 32_512_218_112
    assert out["stored_bytes"] == {"BF16": 2 * 32_512_218_112} and out["weights_source"].startswith("estimated")
    assert out["kv_cache"] == {"dtype": "float32", "bytes_per_token": 524288, "bytes_per_token_16bit": 262144,
                               "context": 4096, "bytes": 4096 * 524288}
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


def meminfo_file(folder: Path, total: int, available: int) -> Path:
    """A /proc/meminfo of a machine with `total` and `available` bytes (the file counts kB)."""
    path = folder / "meminfo"
    path.write_text(f"MemTotal:       {total // 1024} kB\nMemFree:         1000 kB\n"
                    f"MemAvailable:   {available // 1024} kB\nBuffers:          200 kB\n")
    return path


def test_read_meminfo_gives_bytes_and_none_without_the_file(tmp_path):
    assert read_meminfo(meminfo_file(tmp_path, 24 * GIB, 10 * GIB)) == {"MemTotal": 24 * GIB, "MemAvailable": 10 * GIB}
    assert read_meminfo(tmp_path / "missing") is None
    (tmp_path / "old").write_text("MemTotal: 1000 kB\nMemFree: 10 kB\n")  # kernels before 3.14 had no MemAvailable
    assert read_meminfo(tmp_path / "old") is None


def make_config_only(out: Path, shape: str, *args) -> Path:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "make_checkpoint.py"), "--shape", shape,
                             "--config-only", "--out", str(out), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


# On a machine with MemTotal 24 GiB and MemAvailable 10 GiB (a tenth of each kept free), the bf16 weights of the sizes up to 4B
# (7.9 GB) fit, the 7B's (15.4 GB) fit only in MemTotal, and from the 14B (28.3 GB) on, in neither.
FITS = {"0.5b": (True, True), "1.8b": (True, True), "4b": (True, True), "7b": (False, True)}


@pytest.mark.parametrize("shape", list(PUBLISHED))
def test_config_only_folder_of_every_published_shape(tmp_path, shape):
    model = make_config_only(tmp_path / shape, shape)
    raw = json.loads((model / "config.json").read_text())
    info = model_info(model, meminfo=meminfo_file(tmp_path, 24 * GIB, 10 * GIB))

    published = PUBLISHED[shape]
    assert info["published"]["name"] == published.name == f"Qwen1.5-{shape.upper()}"
    digits = len(published.billions.split(".")[1])
    assert f"{info['published']['parameters_as_published'] / 1e9:.{digits}f}" == published.billions
    total = info["parameters"]["total"]
    assert info["stored_bytes"] == {"BF16": 2 * total} and info["weights_bytes"] == 2 * total

    L, Hkv, hd = raw["num_hidden_layers"], raw["num_key_value_heads"], raw["hidden_size"] // raw["num_attention_heads"]
    assert info["kv_cache"]["bytes_per_token"] == 2 * L * Hkv * hd * 4  # K and V, float32
    assert info["kv_cache"]["bytes_per_token_16bit"] == 2 * L * Hkv * hd * 2
    # a pass reads every weight, but of an untied embedding table only the tokens' rows
    embedding = 0 if raw["tie_word_embeddings"] else 2 * raw["vocab_size"] * raw["hidden_size"]
    assert info["disk_reads"]["per_generated_token"] == info["disk_reads"]["per_prompt"] == 2 * total - embedding

    fits = FITS.get(shape, (False, False))
    assert (info["memory"]["weights_fit_MemAvailable"], info["memory"]["weights_fit_MemTotal"]) == fits
    assert info["memory"]["MemTotal"] == 24 * GIB and info["memory"]["MemAvailable"] == 10 * GIB
    text = format_info(info)
    assert f"; {published.name} (published: {published.billions}B" in text
    assert ("disk reads" in text) == (not fits[0])  # only where the weights do not fit


def test_info_text_for_the_32b_and_110b_config_folders(tmp_path):
    for shape, per_token, gib in [("32b", "512.00 KiB", "60.56 GiB"), ("110b", "640.00 KiB", "207.14 GiB")]:
        model = make_config_only(tmp_path / shape, shape)
        text = format_info(model_info(model, meminfo=meminfo_file(tmp_path, 24 * GIB, 10 * GIB)))
        assert f"KV cache        {per_token} per token (float32;" in text  # 2 x L x Hkv x hd x 4: 64 x 8, 80 x 8
        assert f"weights ({gib}) fit in neither MemAvailable nor MemTotal" in text
        assert "MemAvailable 10.00 GiB, MemTotal 24.00 GiB" in text
    assert "111.21B; Qwen1.5-110B (published: 111.21B)" in text


def test_a_layer_slice_is_named_as_layers_of_its_published_model(tmp_path):
    model = make_config_only(tmp_path / "slice", "32b", "--layers", "2")
    text = qwen_ref("info", "--model", model)
    assert text.returncode == 0, text.stderr
    assert "; 2 of the 64 layers of Qwen1.5-32B (published: 32.512B)" in text.stdout


def test_tied_0_5b_is_counted_as_its_published_files_count_it(tmp_path):
    info = model_info(make_config_only(tmp_path / "m", "0.5b"))
    p = info["parameters"]
    # Qwen1.5-0.5B's files store the tied head a second time (1.24 GB in bf16): 0.62B on the Hub, 0.46B unique
    assert p["lm_head"] == 0 and info["published"]["parameters_as_published"] == p["total"] + p["embedding"]
    assert "0.62B; Qwen1.5-0.5B (published: 0.62B, counting the tied LM head twice" in format_info(info)


def test_without_meminfo_the_disk_reads_are_still_given(tmp_path):
    info = model_info(make_config_only(tmp_path / "m", "7b"), meminfo=tmp_path / "missing")
    assert info["memory"] is None and info["disk_reads"]["per_generated_token"] > 0
    text = format_info(info)
    assert "disk reads      if they do not fit (--layer-major on)" in text and "fits in memory" not in text


def test_without_torch_dtype_only_the_kv_cache_is_sized(tmp_path):
    config = PUBLISHED["7b"].config_json()
    del config["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    info = model_info(tmp_path, meminfo=meminfo_file(tmp_path, 24 * GIB, 10 * GIB))
    assert info["weights_bytes"] is None and info["disk_reads"] is None
    assert info["memory"]["kv_cache_fits_MemAvailable"] is False  # 2 x 32 x 32 x 128 x 4 B x 32768 = 32 GiB
    assert "KV cache for 32,768 tokens (32.00 GiB) does not fit in MemAvailable" in format_info(info)


def test_a_shape_not_published_is_said_to_be_none(tmp_path):
    info = model_info(FIXTURES / "gqa40x8_bf16_tied")
    assert info["published"] is None and "; no published Qwen1.5 shape" in format_info(info)
