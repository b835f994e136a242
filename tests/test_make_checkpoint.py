"""tools/make_checkpoint.py: NumPy-written checkpoints load in qwen-ref (one file, shards, layer slices), hold
values of the promised scales, round bf16 to nearest even, and bad input ends in one line.
The live tests (transformers loads the same folders and computes the same logits) are in
test_make_checkpoint_live.py."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import bf16_words, small_config
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_ref.backends import get_backend
from qwen_ref.config import load_config
from qwen_ref.generation import generate
from qwen_ref.model import load_model
from qwen_ref.sampling import GREEDY, Sampler
from qwen_ref.weights import expected_shapes, load_weights, read_safetensors, to_float32

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import make_checkpoint  # noqa: E402

TOKENS = [785, 6722, 315, 9625, 374]  # "The capital of France is"


def make(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_checkpoint.py"), *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    result = make("--shape", "tiny", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def forward_logits(model_dir: Path) -> np.ndarray:
    model = load_model(model_dir, get_backend("numpy"))
    return model.forward(np.array(TOKENS), model.new_cache(len(TOKENS)))  # [T, V]


def test_tiny_checkpoint_loads_in_qwen_ref_and_generates(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["torch_dtype"] == "bfloat16"
    model = load_model(tiny, get_backend("numba"))
    logits = model.forward(np.array(TOKENS), model.new_cache(len(TOKENS)))
    assert logits.shape == (len(TOKENS), 151936) and np.isfinite(logits).all()
    tokens = list(generate(model, TOKENS, 8, (), Sampler(GREEDY)))
    assert len(tokens) == 8 and all(0 <= t < 151936 for t in tokens)


def test_random_values_have_the_promised_scales(tiny):
    weights = {name: to_float32(w) for name, w in load_weights(tiny, load_config(tiny)).items()}
    for name, w in weights.items():
        if name.endswith("norm.weight"):
            assert abs(w.mean() - 1) < 0.1 and abs(w.std() - 0.2) < 0.05, name  # 64 values: loose bounds
        elif name.endswith("bias"):
            assert 0.15 < w.std() < 0.45, name  # 32 or 64 values of N(0, 0.3^2)
        else:  # [out, in] ~ N(0, 1/in): thousands of values, so within 5%
            assert abs(w.std() * math.sqrt(w.shape[1]) - 1) < 0.05 and abs(w.mean()) < 0.01, name
    logits = forward_logits(tiny)
    assert 0.5 < logits.std() < 2  # unit-scale projections keep the logits near unit scale


def test_shards_and_index_load_to_the_same_logits_as_one_file(tiny, tmp_path):
    out = tmp_path / "sharded"
    result = make("--shape", "tiny", "--out", out, "--shard-gb", 0.0001)  # 100 kB: a layer is 86 kB
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n >= 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    config = load_config(out)
    assert set(index["weight_map"]) == set(expected_shapes(config))
    tensors = {name: w for f in files for name, w in read_safetensors(out / f).items()}
    assert all(index["weight_map"][name] == f for f in files for name in read_safetensors(out / f))
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(w.size for w in tensors.values())
    for f in files:  # only a tensor bigger than a shard (the 19 MB embedding) has a bigger shard, alone
        shard = read_safetensors(out / f)
        assert len(shard) == 1 or sum(w.nbytes for w in shard.values()) <= 100_000, f
    # the same seed writes the same values, whatever the file layout
    np.testing.assert_array_equal(forward_logits(out), forward_logits(tiny))


def test_layers_writes_the_first_layers_of_the_whole_model(tiny, tmp_path):
    out = tmp_path / "slice"
    result = make("--shape", "tiny", "--layers", 1, "--out", out)
    assert result.returncode == 0, result.stderr
    config = load_config(out)
    assert config.num_hidden_layers == 1 and load_config(tiny).num_hidden_layers == 2
    sliced = read_safetensors(out / "model.safetensors")
    whole = read_safetensors(tiny / "model.safetensors")
    assert set(sliced) == set(expected_shapes(config))
    for name, w in sliced.items():  # the final norm comes after the layers in the random stream
        if name != "model.norm.weight":
            np.testing.assert_array_equal(w, whole[name], err_msg=name)
    assert np.isfinite(forward_logits(out)).all()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_untied_gqa_config_written_by_the_function_loads_with_its_lm_head(tmp_path, dtype):
    config = small_config(tie_word_embeddings=False, torch_dtype=dtype, vocab_size=10_000)
    written = make_checkpoint.write_checkpoint(tmp_path / "m", config, shard_bytes=10**6)  # embedding: 1.3 MB
    assert len(written["files"]) > 1
    weights = load_weights(tmp_path / "m", load_config(tmp_path / "m"))
    assert "lm_head.weight" in weights and weights["lm_head.weight"].dtype == np.dtype(dtype)
    assert not np.array_equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert np.isfinite(forward_logits(tmp_path / "m")).all()


def test_config_only_writes_no_weights(tmp_path):
    result = make("--shape", "110b", "--config-only", "--out", tmp_path / "c")
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "c").glob("*.safetensors"))
    assert load_config(tmp_path / "c").num_hidden_layers == 80


@settings(max_examples=300)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=64))
def test_bf16_rounding_is_nearest_even(values):
    x = np.array(values, dtype=np.float32)
    assert np.array_equal(make_checkpoint.bf16_words(x.copy()), bf16_words(x))  # helpers: an independent version


def test_ties_round_to_even():
    # 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: it goes to the even 1; 1 + 3 * 2^-8 goes up to 1 + 2^-6
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8], dtype=np.float32)
    assert np.array_equal(make_checkpoint.bf16_words(x), [0x3F80, 0x3F82])


def test_refuses_a_write_the_disk_has_no_room_for_before_writing_anything(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"needs \d+\.\d\d GB in .*, but only \d+\.\d\d GB are free"):
        make_checkpoint.check_free_space(tmp_path, 10**15)  # a petabyte
    # a disk with 10 MB free: the tiny checkpoint needs 27 MB (weights and tokenizer)
    usage = shutil.disk_usage(tmp_path)._replace(free=10**7)
    monkeypatch.setattr(make_checkpoint.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(ValueError, match=r"needs 0\.03 GB in .*, but only 0\.01 GB are free"):
        make_checkpoint.write_checkpoint(tmp_path / "new", make_checkpoint.config_json("tiny", "bfloat16"))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shape", "3b"], "invalid choice: '3b'"),
        (["--shape", "tiny", "--layers", "3"], "--layers 3: tiny has layers 1 to 2"),
        (["--shape", "tiny", "--shard-gb", "0"], "--shard-gb wants a positive size"),
        (["--shape", "tiny", "--out-of-place"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    result = make(*args, "--out", tmp_path / "x")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and not (tmp_path / "x").exists()


def test_unwritable_or_full_out_folder_exits_2_with_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    for out, message in [(tmp_path / "file" / "x", "cannot write"), (tmp_path / "full", "is not an empty folder")]:
        result = make("--shape", "tiny", "--out", out)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr
    assert (tmp_path / "full" / "config.json").read_text() == "{}"
