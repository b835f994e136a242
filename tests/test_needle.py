"""`qwen-ref needle` on the full-vocabulary random fixture with the real Qwen1.5 tokenizer and chat template:
prompts of the asked length with the needle at the asked depth in tokens, the JSON and PNG grid, --resume,
KV reuse against fresh prefills, one-line errors."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen_ref.backends import get_backend
from qwen_ref.chat_template import ChatTemplate
from qwen_ref.cli import main
from qwen_ref.model import load_model
from qwen_ref.needle import (
    ANSWER,
    NEEDLE,
    QUESTION,
    PromptBuilder,
    packaged_haystack,
    run_context,
)
from qwen_ref.tokenizer import Tokenizer

EOS = (151643, 151645)
# KV reuse and resumed runs prefill the same tokens in other chunks, so float32 sums run in other orders:
# the answer log-probabilities differed by at most 3.5e-7 nats on this model (contexts 256 and 1000).
LOGPROB_ATOL = 1e-5
GRID = ["--contexts", "128,256", "--depths", "0,50,100", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def builder(text_model):
    return PromptBuilder(Tokenizer.from_model_dir(text_model), ChatTemplate.from_model_dir(text_model),
                         packaged_haystack())


@pytest.fixture(scope="module")
def model(text_model):
    return load_model(text_model, get_backend("numba"))


def longest_sentence_tokens(tokenizer):
    """The most tokens any sentence of the packaged haystack takes, tokenized on its own with its leading space."""
    sentences = re.split(r"(?<=[.!?])\s+", packaged_haystack())
    return max(len(tokenizer.encode(" " + s)) for s in sentences)


@pytest.mark.parametrize("context", [128, 256, 1000, 7000])  # 7000: the haystack text repeated
def test_prompt_is_the_asked_length_with_the_needle_at_the_asked_depth_in_tokens(builder, context):
    tokenizer = builder.tokenizer
    head = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
    tail = f"\n\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    slack = longest_sentence_tokens(tokenizer) / 2 + 1  # nearest sentence boundary; +1 for tokens at the seams
    for depth in range(0, 101, 10):
        prompt = builder.build(context, depth)
        assert len(prompt.tokens) == context
        text = tokenizer.decode(prompt.tokens, skip_special_tokens=False)
        assert text.startswith(head) and text.endswith(tail) and text.count(NEEDLE) == 1
        # the needle, found in the decoded text, starts at token needle_start
        before = tokenizer.decode(prompt.tokens[: prompt.needle_start], skip_special_tokens=False)
        needle = tokenizer.decode(prompt.tokens[prompt.needle_start : prompt.needle_start + prompt.needle_tokens])
        assert needle.strip() == NEEDLE and text.index(NEEDLE) == len(before) + needle.index(NEEDLE)
        haystack_before = prompt.needle_start - len(tokenizer.encode(head))
        haystack_total = context - len(tokenizer.encode(head)) - prompt.needle_tokens - len(tokenizer.encode(tail))
        assert haystack_total == prompt.haystack_tokens
        assert abs(haystack_before - depth / 100 * haystack_total) <= slack, (context, depth, haystack_before)
        after = text[len(before) + len(needle):]
        # between two sentences of the haystack, or at its very start (a paragraph of its own) or end
        assert before.endswith((".", "!", "?")) and after.startswith(" ") or before == head and needle.endswith(
            "\n\n") or after == tail
        assert (before == head) == (haystack_before == 0) and (after == tail) == (haystack_before == haystack_total)
        if depth == 0:
            assert before == head
        if depth == 100:
            assert after == tail


def test_scored_tokens_are_the_answer_alone(builder, text_model):
    assert builder.tokenizer.decode(builder.reply[builder.answer_from:]) == ANSWER
    assert builder.tokenizer.decode(builder.reply) == NEEDLE[: NEEDLE.index(ANSWER) + len(ANSWER)]
    # a word answer: BPE joins it to the space before it (" swordfish"), and that token is scored
    word = PromptBuilder(builder.tokenizer, ChatTemplate.from_model_dir(text_model), "Hay.",
                         "The password of the mill is swordfish today.", "Say the password.", "swordfish")
    assert builder.tokenizer.decode(word.reply) == "The password of the mill is swordfish"
    assert builder.tokenizer.decode(word.reply[word.answer_from:]) == " swordfish"


def test_kv_reuse_gives_the_scores_of_fresh_prefills(builder, model):
    depths = [0, 25, 50, 75, 100]
    reused = run_context(model, builder, 256, depths, EOS, max_new_tokens=4, reuse=True, chunk=64)
    fresh = run_context(model, builder, 256, depths, EOS, max_new_tokens=4, reuse=False, chunk=64)
    assert [c.depth for c in reused] == [c.depth for c in fresh] == depths  # shallowest needle first
    assert all(c.reused_tokens == 0 for c in fresh)
    # each prompt keeps the previous one's tokens up to the previous needle
    assert [c.reused_tokens for c in reused] == [0] + [c.needle_token for c in reused[:-1]]
    for a, b in zip(reused, fresh):
        np.testing.assert_allclose(a.answer_logprobs, b.answer_logprobs, rtol=0, atol=LOGPROB_ATOL)
        assert a.generated == b.generated
    assert len({round(c.answer_logprob, 3) for c in reused}) > 1  # the depth changes the score: not a constant


def needle(capsys, *argv):
    code = main(["needle", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def cell_lines(err):
    return re.findall(r"^context (\d+), depth (\d+)%", err, flags=re.MULTILINE)


def test_needle_prints_the_grid_and_writes_it_as_json(text_model, tmp_path, capsys):
    code, out, err = needle(capsys, "--model", text_model, *GRID, "--out", tmp_path, "--no-plot")
    assert code == 0, err
    assert "exact retrieval" in out and "log-likelihood of the answer" in out
    assert len(cell_lines(err)) == 6
    saved = json.loads((tmp_path / "needle.json").read_text())
    assert saved["contexts"] == [128, 256] and saved["depths"] == [0, 50, 100]
    assert saved["settings"]["answer"] == ANSWER and saved["settings"]["max_new_tokens"] == 4
    assert {(c["context"], c["depth"]) for c in saved["cells"]} == {(c, d) for c in (128, 256) for d in (0, 50, 100)}
    for c in saved["cells"]:
        assert c["prompt_tokens"] == c["context"]
        assert len(c["answer_logprobs"]) == 9  # "4817-2935": Qwen splits digits one by one
        assert all(lp < 0 for lp in c["answer_logprobs"])
        assert c["answer_logprob_sum"] == pytest.approx(sum(c["answer_logprobs"]))
        assert c["exact"] is (ANSWER in c["generated"])
    # the printed log-likelihood grid is the JSON's mean per token, depth rows by context columns
    rows = out.split("log-likelihood of the answer")[1].splitlines()[2:5]
    for line, depth in zip(rows, (0, 50, 100)):
        printed = [float(x) for x in line.split()[1:]]
        by_cell = {(c["context"], c["depth"]): c["answer_logprob_sum"] / 9 for c in saved["cells"]}
        wanted = [by_cell[ctx, depth] for ctx in (128, 256)]
        assert printed == pytest.approx(wanted, abs=6e-4)


def test_needle_writes_a_png_heat_map(text_model, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # CI installs the plot extra, so this runs there
    code, _, err = needle(capsys, "--model", text_model, *GRID, "--out", tmp_path)
    assert code == 0, err
    png = (tmp_path / "needle.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_missing_matplotlib_is_one_line_before_any_cell_runs(text_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = needle(capsys, "--model", text_model, *GRID, "--out", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "pip install 'qwen-ref[plot]'" in err
    assert not (tmp_path / "needle.json").exists()


def test_resume_computes_only_the_missing_cells_and_gives_the_full_runs_grid(text_model, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert needle(capsys, "--model", text_model, *GRID, "--out", full, "--no-plot")[0] == 0
    saved = json.loads((full / "needle.json").read_text())
    kept = [c for c in saved["cells"] if c["context"] == 128 or c["depth"] == 50]  # 4 of 6 done
    part.mkdir()
    (part / "needle.json").write_text(json.dumps({**saved, "cells": kept}))

    code, _, err = needle(capsys, "--model", text_model, *GRID, "--out", part, "--no-plot", "--resume")
    assert code == 0, err
    assert sorted(cell_lines(err)) == [("256", "0"), ("256", "100")]  # only these ran
    resumed = {(c["context"], c["depth"]): c for c in json.loads((part / "needle.json").read_text())["cells"]}
    for c in kept:  # untouched, time included: not recomputed
        assert resumed[c["context"], c["depth"]] == c
    for c in saved["cells"]:
        r = resumed[c["context"], c["depth"]]
        assert (r["needle_token"], r["exact"], r["generated"]) == (c["needle_token"], c["exact"], c["generated"])
        np.testing.assert_allclose(r["answer_logprobs"], c["answer_logprobs"], rtol=0, atol=LOGPROB_ATOL)


def test_resume_refuses_other_settings_and_a_run_does_not_overwrite_a_grid(text_model, tmp_path, capsys):
    assert needle(capsys, "--model", text_model, *GRID[:2], "--depths", "50", "--max-new-tokens", "2", "--out",
                  tmp_path, "--no-plot")[0] == 0
    code, _, err = needle(capsys, "--model", text_model, "--contexts", "128", "--depths", "50", "--max-new-tokens",
                          "2", "--out", tmp_path, "--no-plot", "--resume", "--answer", "2935")
    assert code == 2 and err.count("\n") == 1 and "other settings (answer: '4817-2935' there, '2935' here)" in err
    code, _, err = needle(capsys, "--model", text_model, "--contexts", "128", "--out", tmp_path, "--no-plot")
    assert code == 2 and err.count("\n") == 1 and "exists: pass --resume" in err


@pytest.mark.parametrize("flags, message", [
    (["--contexts", "40000"], "--contexts 40000 exceeds the model's context of 32768 tokens"),
    (["--contexts", "40"], "context 40 leaves no room for the haystack"),
    (["--contexts", "128", "--depths", "0,101"], "wants percentages from 0 to 100"),
    (["--contexts", "128", "--depths=-5"], "wants percentages from 0 to 100"),
    (["--contexts", "128,x"], "wants comma-separated token counts"),
    (["--contexts", "128", "--answer", "1234"], "must appear in the needle"),
])
def test_bad_input_is_one_line(text_model, tmp_path, capsys, flags, message):
    code, out, err = needle(capsys, "--model", text_model, *flags, "--out", tmp_path / "o", "--no-plot")
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_a_haystack_file_replaces_the_packaged_text(builder, text_model, tmp_path, capsys):
    hay = tmp_path / "hay.txt"
    hay.write_text("Grass is green. The sky is blue! Is water wet? Snow is cold.\n")
    code, _, err = needle(capsys, "--model", text_model, "--contexts", "128", "--depths", "50", "--max-new-tokens",
                          "1", "--haystack", hay, "--out", tmp_path / "o", "--no-plot")
    assert code == 0, err
    cell = json.loads((tmp_path / "o" / "needle.json").read_text())["cells"][0]
    tokenizer = builder.tokenizer
    custom = PromptBuilder(tokenizer, ChatTemplate.from_model_dir(text_model), hay.read_text())
    text = tokenizer.decode(custom.build(128, 50).tokens)
    assert "Snow is cold.\n\nGrass is green." in text and "greenhouse is 4817" in text
    assert cell["needle_token"] == custom.build(128, 50).needle_start
    shutil.rmtree(tmp_path / "o")


def test_bench_tool_runs_one_cell_and_writes_its_markdown(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    model, md = tmp_path / "tiny", tmp_path / "needle.md"
    subprocess.run([sys.executable, str(repo / "tools" / "make_checkpoint.py"), "--shape", "tiny", "--out", str(model)],
                   check=True, capture_output=True)
    run = subprocess.run([sys.executable, str(repo / "tools" / "bench_needle_32k.py"), "--model", str(model),
                          "--context", "200", "--depth", "50", "--md", str(md)], check=False, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    text = md.read_text()
    assert "--contexts 200 --depths 50" in text and "| 200 | 50% | 0 |" in text and "of 200 (" in text
    assert re.search(r"\| \d+\.\d\d GB \| [\d.]+ \+ [\d.]+ \+ 1\.07 = [\d.]+ GB \|", text)  # peak RSS and budget
