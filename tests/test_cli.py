"""The `qwen-ref` command line, driven through a subprocess as a user would run it."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import FIXTURES, random_checkpoint, small_config

from qwen_ref.compare import compare_logits
from qwen_ref.generation import logits_for_tokens
from qwen_ref.model import load_model

PROMPT_TEXT = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"


def qwen_ref(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "qwen_ref", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


def test_console_script_is_installed():
    exe = shutil.which("qwen-ref", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    assert exe, "pip install should put qwen-ref on PATH"
    assert subprocess.run([exe, "--help"], capture_output=True, text=True).stdout.startswith("usage: qwen-ref")


def test_logits_writes_tokens_and_logits_matching_transformers(tmp_path):
    ref = np.load(FIXTURES / "gqa40x8_bf16_tied" / "reference.npz")
    out = tmp_path / "logits.npz"
    tokens = ",".join(map(str, ref["prompt_tokens"]))
    result = qwen_ref("logits", "--model", FIXTURES / "gqa40x8_bf16_tied", "--tokens", tokens, "--out", out)
    assert result.returncode == 0, result.stderr
    saved = np.load(out)
    assert saved["tokens"].dtype == np.int64 and np.array_equal(saved["tokens"], ref["prompt_tokens"])
    assert saved["logits"].dtype == np.float32 and saved["logits"].shape == ref["logits"].shape
    assert compare_logits(ref["logits"], saved["logits"]).ok


def test_generate_json_is_one_object_with_transformers_greedy_tokens():
    ref = np.load(FIXTURES / "eos_stop_f32" / "reference.npz")
    tokens = ",".join(map(str, ref["prompt_tokens"]))
    result = qwen_ref("generate", "--model", FIXTURES / "eos_stop_f32", "--tokens", tokens,
                      "--max-new-tokens", int(ref["max_new_tokens"]), "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert out["prompt_tokens"] == ref["prompt_tokens"].tolist()
    assert out["tokens"] == ref["greedy_tokens"].tolist()  # ends with the eos id, as transformers returns it
    assert out["text"] is None  # this checkpoint ships no tokenizer


def test_text_prompt_is_tokenized_with_the_real_qwen_tokenizer(text_model):
    ref = np.load(text_model / "reference.npz")
    result = qwen_ref("generate", "--model", text_model, "--prompt", PROMPT_TEXT, "--max-new-tokens",
                      int(ref["max_new_tokens"]), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["prompt_tokens"] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 151645, 198]
    assert out["tokens"] == ref["greedy_tokens"].tolist()
    assert isinstance(out["text"], str)
    plain = qwen_ref("generate", "--model", text_model, "--prompt", PROMPT_TEXT, "--max-new-tokens",
                     int(ref["max_new_tokens"]), "--temperature", "0")
    assert plain.stdout == out["text"] + "\n"


@pytest.mark.parametrize("command", ["logits", "generate", "chat", "perplexity"])
def test_every_command_that_runs_a_checkpoint_offers_kv_dtype_with_its_default(command):
    result = qwen_ref(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "--kv-dtype {float32,bfloat16,float16}" in result.stdout
    assert "(default: float32" in " ".join(result.stdout.split())  # argparse wraps the help text


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_logits_with_a_16_bit_kv_cache_are_those_of_load_model_with_that_cache(tmp_path, kv_dtype):
    case = FIXTURES / "gqa40x8_bf16_tied"
    tokens = np.load(case / "reference.npz")["prompt_tokens"]
    out = tmp_path / "logits.npz"
    result = qwen_ref("logits", "--model", case, "--tokens", ",".join(map(str, tokens)), "--out", out,
                      "--backend", "numpy", "--kv-dtype", kv_dtype)
    assert result.returncode == 0, result.stderr
    saved = np.load(out)["logits"]
    np.testing.assert_array_equal(saved, logits_for_tokens(load_model(case, kv_dtype=kv_dtype), tokens))
    assert not np.array_equal(saved, logits_for_tokens(load_model(case), tokens))  # the option reached the cache


def test_selfcheck_passes_on_the_packaged_checkpoint():
    result = qwen_ref("selfcheck")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selfcheck passed" in result.stdout


def _corrupt_model(tmp_path):
    random_checkpoint(tmp_path, small_config())
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    return tmp_path


def _unsupported_model(tmp_path):
    random_checkpoint(tmp_path, small_config())
    (tmp_path / "config.json").write_text(json.dumps(small_config(use_sliding_window=True)))
    return tmp_path


def _no_config(tmp_path):
    random_checkpoint(tmp_path, small_config())
    (tmp_path / "config.json").unlink()
    return tmp_path


def _small(tmp_path):
    random_checkpoint(tmp_path, small_config(max_position_embeddings=16))
    return tmp_path


@pytest.mark.parametrize(
    "make_model, args, message",
    [
        (lambda p: p / "missing", ["logits", "--tokens", "1", "--out", "{tmp}/x.npz"], "does not exist"),
        (_no_config, ["logits", "--tokens", "1", "--out", "{tmp}/x.npz"], "no config.json"),
        (_corrupt_model, ["logits", "--tokens", "1", "--out", "{tmp}/x.npz"], "corrupt safetensors header"),
        (_unsupported_model, ["generate", "--tokens", "1"], "use_sliding_window"),
        (_small, ["generate", "--tokens", "1,97"], "token id 97 is outside the vocabulary"),
        (_small, ["logits", "--tokens", "-1", "--out", "{tmp}/x.npz"], "outside the vocabulary"),
        (_small, ["generate", "--tokens", ""], "prompt is empty"),
        (_small, ["generate", "--tokens", ",".join(["1"] * 17)], "exceeds the model's context of 16"),
        (_small, ["generate", "--tokens", "1,2", "--max-new-tokens", "15"], "exceeds the model's context"),
        (_small, ["generate", "--tokens", "1,x"], "comma-separated integers"),
        (_small, ["generate", "--tokens", "1", "--max-new-tokens", "0"], "positive integer"),
        (_small, ["generate", "--tokens", "1", "--backend", "cuda"], "invalid choice"),
        (_small, ["generate", "--tokens", "1", "--kv-dtype", "f16"], "argument --kv-dtype: invalid choice: 'f16'"),
        (_small, ["generate", "--prompt", "hi"], "no tokenizer.json"),
        (_small, ["logits", "--tokens", "1", "--out", "/nonexistent/dir/x.npz"], "cannot write"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(tmp_path, make_model, args, message):
    model = make_model(tmp_path)
    result = qwen_ref(args[0], "--model", model, *[a.replace("{tmp}", str(tmp_path)) for a in args[1:]])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and result.stderr.startswith("qwen-ref: error:")
