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
    assert saved["positions"].dtype == np.int64 and np.array_equal(saved["positions"], ref["logit_positions"])
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


def _small_with_prompt_files(tmp_path):
    """_small, and beside it prompt files that are wrong in one way each."""
    (tmp_path / "bad_ids.txt").write_text("1, 2\n3 4x\n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "too_long.txt").write_text(" ".join(["1"] * 17))
    return _small(tmp_path)


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
        (_small, ["generate", "--tokens", "1,x"], "--tokens: item 2, 'x', is not a token id"),
        (_small, ["generate", "--tokens", "1", "--max-new-tokens", "0"], "positive integer"),
        (_small, ["generate", "--tokens", "1", "--backend", "cuda"], "invalid choice"),
        (_small, ["generate", "--tokens", "1", "--kv-dtype", "f16"], "argument --kv-dtype: invalid choice: 'f16'"),
        (_small, ["generate", "--prompt", "hi"], "no tokenizer.json"),
        (_small, ["logits", "--tokens", "1", "--out", "/nonexistent/dir/x.npz"], "cannot write"),
        (_small, ["logits", "--tokens-file", "{tmp}/missing.txt", "--out", "{tmp}/x.npz"], "missing.txt: no such file"),
        (_small, ["logits", "--tokens-file", "{tmp}", "--out", "{tmp}/x.npz"], "Is a directory"),
        (_small_with_prompt_files, ["logits", "--tokens-file", "{tmp}/bad_ids.txt", "--out", "{tmp}/x.npz"],
         "bad_ids.txt: item 4, '4x', is not a token id"),
        (_small_with_prompt_files, ["generate", "--prompt-file", "{tmp}/latin1.txt"],
         "latin1.txt: not UTF-8 text (unexpected end of data at byte 3)"),
        (_small_with_prompt_files, ["logits", "--tokens-file", "{tmp}/too_long.txt", "--out", "{tmp}/x.npz"],
         "prompt of 17 tokens exceeds the model's context of 16 tokens (max_position_embeddings)"),
        (_small, ["logits", "--prompt", "hi", "--tokens-file", "x", "--out", "{tmp}/x.npz"], "not allowed with"),
        (_small, ["generate", "--prompt-file", "x", "--tokens", "1"], "not allowed with"),
        (_small, ["generate", "--tokens", "1", "--prefill-chunk", "0"], "positive integer"),
        (_small, ["logits", "--tokens", "1,2", "--out", "{tmp}/x.npz", "--last", "1", "--positions", "0:1"],
         "not allowed with"),
        (_small, ["logits", "--tokens", "1,2,3,4", "--out", "{tmp}/x.npz", "--positions", "5:9"],
         "--positions 5:9 selects no position of the 4-token prompt"),
        (_small, ["logits", "--tokens", "1,2", "--out", "{tmp}/x.npz", "--positions", "1-2"], "wants A:B"),
        (_small, ["logits", "--tokens", "1,2", "--out", "{tmp}/x.npz", "--last", "0"], "positive integer"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(tmp_path, make_model, args, message):
    model = make_model(tmp_path)
    result = qwen_ref(args[0], "--model", model, *[a.replace("{tmp}", str(tmp_path)) for a in args[1:]])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and result.stderr.startswith("qwen-ref: error:")


# --- long prompts: files, standard input, some positions only -----------------------------------------


def _logits(*args, **kwargs):
    result = qwen_ref("logits", *args, **kwargs)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_last_and_positions_are_the_rows_of_the_full_logits_bit_for_bit(tmp_path, backend):
    model = FIXTURES / "long_seq_bf16"  # 320 tokens: 5 chunks of 64, so selections cross chunk boundaries
    tokens = np.load(model / "reference.npz")["prompt_tokens"]
    (tmp_path / "ids.txt").write_text(" ".join(map(str, tokens)))
    common = ["--model", model, "--tokens-file", tmp_path / "ids.txt", "--backend", backend, "--prefill-chunk", 64]
    _logits(*common, "--out", tmp_path / "full.npz")
    full = np.load(tmp_path / "full.npz")
    assert np.array_equal(full["positions"], np.arange(len(tokens)))
    # short selections go through the LM head with other rows than the full run's: the bits must not change
    for name, selection, rows in [
        ("last1", ["--last", 1], slice(-1, None)),
        ("last3", ["--last", 3], slice(-3, None)),
        ("last100", ["--last", 100], slice(-100, None)),
        ("first", ["--positions", "0:1"], slice(0, 1)),
        ("across_a_chunk_end", ["--positions", "62:66"], slice(62, 66)),
        ("negative", ["--positions=-70:-60"], slice(-70, -60)),
    ]:
        _logits(*common, *selection, "--out", tmp_path / f"{name}.npz")
        part = np.load(tmp_path / f"{name}.npz")
        assert np.array_equal(part["tokens"], tokens), name
        assert np.array_equal(part["positions"], np.arange(len(tokens))[rows]), name
        assert np.array_equal(part["logits"], full["logits"][rows]), name


def test_token_file_and_standard_input_give_the_logits_of_the_same_ids_as_tokens(tmp_path):
    model = FIXTURES / "mha_f32_untied"
    tokens = np.load(model / "reference.npz")["prompt_tokens"].tolist()
    _logits("--model", model, "--tokens", ",".join(map(str, tokens)), "--out", tmp_path / "flag.npz")
    # commas, spaces, tabs and newlines mixed, as files written by other tools have them
    text = ",".join(map(str, tokens[:5])) + "\n" + "\t".join(map(str, tokens[5:9])) + " ,\n" + \
        "  ".join(map(str, tokens[9:])) + "\n"
    (tmp_path / "ids.txt").write_text(text)
    _logits("--model", model, "--tokens-file", tmp_path / "ids.txt", "--out", tmp_path / "file.npz")
    _logits("--model", model, "--tokens-file", "-", "--out", tmp_path / "stdin.npz", input=text)
    flag = np.load(tmp_path / "flag.npz")
    for name in ("file", "stdin"):
        other = np.load(tmp_path / f"{name}.npz")
        assert np.array_equal(other["tokens"], tokens) and np.array_equal(other["logits"], flag["logits"]), name


def test_prompt_file_is_the_text_byte_for_byte_and_standard_input_works(text_model, tmp_path):
    text = PROMPT_TEXT + "Hello\n"  # the final newline is part of the prompt
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    common = ["--model", text_model, "--max-new-tokens", 3, "--temperature", 0, "--json", "--quiet"]
    runs = [qwen_ref("generate", *common, "--prompt", text),
            qwen_ref("generate", *common, "--prompt-file", tmp_path / "prompt.txt"),
            qwen_ref("generate", *common, "--prompt-file", "-", input=text)]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    outs = [json.loads(r.stdout) for r in runs]
    assert outs[0]["prompt_tokens"][-1] == 198  # "\n"
    assert outs[1] == outs[0] and outs[2] == outs[0]


@pytest.mark.parametrize("command", ["logits", "generate"])
def test_prefill_progress_bar_on_stderr_for_prompts_of_several_chunks_unless_quiet(tmp_path, command):
    model = FIXTURES / "mha_f32_untied"
    tokens = ",".join(map(str, np.load(model / "reference.npz")["prompt_tokens"]))  # 16 tokens
    args = [command, "--model", model, "--tokens", tokens, "--prefill-chunk", 4]
    args += ["--out", tmp_path / "x.npz"] if command == "logits" else ["--max-new-tokens", 2]
    assert "prefill: " in qwen_ref(*args).stderr
    quiet = qwen_ref(*args, "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    one_chunk = qwen_ref(*args, "--prefill-chunk", 16)  # the last value given counts
    assert one_chunk.returncode == 0 and "prefill: " not in one_chunk.stderr
