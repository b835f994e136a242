"""`generate` and `chat` as a user runs them: sampling, seeds, stop strings, streaming, chat turns."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from helpers import TOKENIZER_DIR

from qwen_ref.tokenizer import TextStream, Tokenizer

MULTILINGUAL = "Schreib ein Gedicht über 東京の夜 и море 🌊🎉, s'il te plaît"


def qwen_ref(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qwen_ref", *map(str, args)], capture_output=True, text=True,
                          input=stdin)


def generate_json(model, *args):
    result = qwen_ref("generate", "--model", model, *args, "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --quiet: nothing but the answer
    return json.loads(result.stdout)


def test_seeded_sampling_is_reproducible(text_model):
    args = ["--prompt", "Once upon a time", "--max-new-tokens", 20, "--temperature", 0.9, "--top-k", 0]
    first = generate_json(text_model, *args, "--seed", 5)
    assert generate_json(text_model, *args, "--seed", 5)["tokens"] == first["tokens"]
    assert generate_json(text_model, *args, "--seed", 6)["tokens"] != first["tokens"]


def test_stop_string_ends_generation_and_is_cut_from_the_text(text_model):
    free = generate_json(text_model, "--prompt", "Hello", "--max-new-tokens", 24, "--temperature", 0)
    text = free["text"]
    # a stop string that first occurs mid-way through the free-running text
    start = next(i for i in range(len(text) // 3, len(text) - 2) if text.find(text[i : i + 2]) == i)
    stop = text[start : start + 2]
    stopped = generate_json(text_model, "--prompt", "Hello", "--max-new-tokens", 24, "--temperature", 0,
                            "--stop", stop, "--stop", "never-appears")
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == text[:start]
    assert stopped["tokens"] == free["tokens"][: len(stopped["tokens"])] and len(stopped["tokens"]) < 24


def test_streamed_multilingual_text_equals_the_final_decoded_text(text_model):
    args = ["--prompt", MULTILINGUAL, "--chat", "--max-new-tokens", 48, "--temperature", 1.0, "--top-k", 0,
            "--seed", 3]
    final = generate_json(text_model, *args)
    streamed = qwen_ref("generate", "--model", text_model, *args, "--quiet")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == final["text"] + "\n"
    tokenizer = Tokenizer(text_model / "tokenizer.json")
    assert final["text"] == tokenizer.decode(final["tokens"])


def test_text_stream_never_splits_a_character():
    tokenizer = Tokenizer.from_model_dir(_tokenizer_dir())
    ids = tokenizer.encode(MULTILINGUAL)
    assert len(ids) > len(MULTILINGUAL.split())  # emoji and CJK take several byte-level tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == MULTILINGUAL
    assert "" in pieces  # some tokens were held back until their character was whole


def test_text_stream_holds_back_a_possible_stop_string():
    tokenizer = Tokenizer.from_model_dir(_tokenizer_dir())
    stream = TextStream(tokenizer, ("END",))
    pieces = [stream.push(i) for i in tokenizer.encode("abc EN")]
    assert "".join(pieces) == "abc "  # "EN" might become "END"
    pieces += [stream.push(i) for i in tokenizer.encode("D tail")]
    assert stream.stopped and "".join(pieces) + stream.finish() == "abc "


def test_chat_flag_renders_the_template_as_transformers_does(text_model, torch_reference):
    _, transformers = torch_reference
    out = generate_json(text_model, "--prompt", MULTILINGUAL, "--chat", "--system", "Be brief.",
                        "--max-new-tokens", 1)
    hf = transformers.AutoTokenizer.from_pretrained(text_model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": MULTILINGUAL}]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["prompt_tokens"] == list(expected["input_ids"])


def test_timings_line_says_time_to_first_token_and_how_warm_the_checkpoint_was(text_model):
    result = qwen_ref("generate", "--model", text_model, "--prompt", "Hello", "--max-new-tokens", 2)
    assert result.returncode == 0, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    # a cold checkpoint's reads fall in the prompt's time: the line says how much was cached at load
    found = re.search(r"load: ([\d.]+) s \| first token: ([\d.]+) s after start \| checkpoint (\d+)% in page cache at load",
                      line)
    assert found, line
    load, first_token, cached = float(found[1]), float(found[2]), int(found[3])
    assert first_token > load and 0 <= cached <= 100
    if cached in (0, 100):  # the note on disk reads is there exactly when pages were missing
        assert ("includes reading the rest from disk" in line) == (cached == 0), line


def _prefill_counts(stderr):
    return [int(n) for n in re.findall(r"prompt: (\d+) tokens", stderr)]


def test_piped_chat_reuses_the_first_turn_instead_of_recomputing_it(text_model):
    result = qwen_ref("chat", "--model", text_model, "--max-new-tokens", 8, "--temperature", 0,
                      stdin="Hello there\nAnd a second question\n")
    assert result.returncode == 0, result.stderr
    replies = result.stdout.splitlines()
    assert len(replies) >= 2
    first, second = _prefill_counts(result.stderr)
    tokenizer = Tokenizer.from_model_dir(text_model)
    turn1 = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
    assert first == len(tokenizer.encode(turn1 + "<|im_start|>assistant\n"))
    # the second turn computes only what follows the cached first turn, not the whole conversation
    assert 0 < second < first


def test_chat_reset_and_system_commands(text_model):
    result = qwen_ref("chat", "--model", text_model, "--max-new-tokens", 4, "--temperature", 0,
                      stdin="Hi\n/system You are a pirate.\nHi\n/reset\nHi\n/exit\nnever read\n")
    assert result.returncode == 0, result.stderr
    counts = _prefill_counts(result.stderr)
    assert len(counts) == 3  # /exit stopped before the last line
    # after /system the conversation restarts with a new system prompt, so far more is recomputed
    assert counts[1] > 10


def test_chat_shows_the_prefill_of_a_long_turn_unless_quiet(text_model):
    args = ["chat", "--model", text_model, "--max-new-tokens", 2, "--temperature", 0, "--prefill-chunk", 4]
    shown = qwen_ref(*args, stdin="Hello there\n")
    assert shown.returncode == 0 and "prefill: " in shown.stderr, shown.stderr
    quiet = qwen_ref(*args, "--quiet", stdin="Hello there\n")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == shown.stdout


def test_chat_turn_past_the_context_is_one_error_line_and_the_chat_goes_on(text_model, tmp_path):
    model = tmp_path / "short_context"
    shutil.copytree(text_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 40}))
    result = qwen_ref("chat", "--model", model, "--max-new-tokens", 4, "--temperature", 0, "--quiet",
                      stdin="word " * 40 + "\nHi\n")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"qwen-ref: error: the conversation is \d+ tokens, which leaves no room for a reply in the "
                        r"model's context of 40 tokens \(/reset starts over\)\n", result.stderr), result.stderr
    assert result.stdout.strip()  # the second, short turn was answered


def _tokenizer_dir():
    import lzma
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    (folder / "tokenizer.json").write_bytes(lzma.decompress((TOKENIZER_DIR / "tokenizer.json.xz").read_bytes()))
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
        (["--prompt", "x", "--top-p", "1.5"], "--top-p must be in"),
        (["--tokens", "1,2", "--chat"], "--chat needs a text prompt"),
        (["--prompt", ""], "prompt is empty"),
    ],
)
def test_generate_flag_errors(text_model, args, message):
    result = qwen_ref("generate", "--model", text_model, *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_profile_reports_time_per_operation_on_stderr_only(text_model):
    result = qwen_ref("generate", "--model", text_model, "--prompt", "Hi", "--max-new-tokens", 3,
                      "--temperature", 0, "--json", "--profile")
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)  # stdout stays one JSON object
    for operation in ("matmul lm_head", "matmul q_proj+k_proj+v_proj", "matmul gate_proj+up_proj silu",
                      "matmul down_proj", "attention", "rms_norm", "rope", "sampling"):
        assert operation in result.stderr
