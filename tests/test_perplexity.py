"""Sliding-window perplexity: the windows against transformers' documented recipe, the numbers
against transformers' own loss on the same windows, and `qwen-ref perplexity` end to end."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from helpers import FIXTURES, PROSE, with_tokenizer
from hypothesis import given
from hypothesis import strategies as st

from qwen_ref.errors import QwenRefError
from qwen_ref.model import load_model
from qwen_ref.perplexity import perplexity, sliding_windows, target_log_probs
from qwen_ref.tokenizer import Tokenizer

TEXT = PROSE  # 148 Qwen tokens: several windows at the small --ctx values below
# transformers and qwen-ref both sum in float32 but in different orders; per-token log-probs of a
# random model agree to ~1e-6 relative, so the perplexity (exp of their mean) agrees far inside 1e-4.
PPL_RTOL = 1e-4


def qwen_ref(*args):
    return subprocess.run([sys.executable, "-m", "qwen_ref", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """The full-vocabulary fixture (vocab 151936) with the real Qwen1.5 tokenizer beside it."""
    return with_tokenizer(FIXTURES / "full_vocab_bf16", tmp_path_factory.mktemp("ppl") / "full_vocab")


# --- windows -----------------------------------------------------------------------------------------


def _recipe_targets(n_tokens, ctx, stride):
    """Token indices the documented loop scores, transcribed literally: labels with -100 outside the
    last trg_len positions, then the model's shift (logits t are scored against label t+1)."""
    scored, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        trg_len = end - prev_end
        labels = np.arange(begin, end)  # global index of each input token
        labels[: len(labels) - trg_len] = -100  # target_ids[:, :-trg_len] = -100
        shift_labels = labels[1:]  # the first label of a window has no logits before it
        scored += [int(t) for t in shift_labels if t != -100]
        prev_end = end
        if end == n_tokens:
            break
    return scored


@given(n_tokens=st.integers(2, 300), ctx=st.integers(2, 64), data=st.data())
def test_windows_score_exactly_the_tokens_of_the_transformers_recipe(n_tokens, ctx, data):
    stride = data.draw(st.integers(1, ctx))
    windows = sliding_windows(n_tokens, ctx, stride)
    ours = [t for w in windows for t in range(w.first_target, w.end)]
    assert ours == _recipe_targets(n_tokens, ctx, stride)
    assert all(w.end - w.begin <= ctx and w.first_target > w.begin for w in windows)
    if stride < ctx:  # overlapping windows: every token but the first is scored exactly once
        assert ours == list(range(1, n_tokens))


def test_disjoint_windows_leave_each_window_start_unscored():
    windows = sliding_windows(10, 4, 4)
    assert [(w.begin, w.end, w.first_target) for w in windows] == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]


@pytest.mark.parametrize("ctx, stride", [(1, 1), (4, 0), (4, 5)])
def test_bad_ctx_or_stride_is_refused(ctx, stride):
    with pytest.raises(QwenRefError):
        sliding_windows(10, ctx, stride)


def test_target_log_probs_are_log_softmax_in_float64():
    logits = np.random.default_rng(0).normal(0, 30, (3, 11)).astype(np.float32)  # wide: exp would overflow float32
    targets = np.array([0, 5, 10])
    x = logits.astype(np.float64)
    expected = x[[0, 1, 2], targets] - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) - x.max(-1)
    np.testing.assert_allclose(target_log_probs(logits, targets), expected, rtol=1e-12)


def test_split_window_equals_scoring_rows_of_a_whole_window_forward():
    # window_nll runs context-only tokens without the LM head and scores the rest in chunks; the plain way is
    # one forward pass over each window, log-softmax of every row, keep the rows of the targets.
    model = load_model(FIXTURES / "long_seq_bf16")
    tokens = np.load(FIXTURES / "long_seq_bf16" / "reference.npz")["prompt_tokens"][:150]
    for ctx, stride in [(100, 30), (50, 50), (149, 149)]:  # overlapping; disjoint; a one-token last window
        nll, scored = 0.0, 0
        for w in sliding_windows(len(tokens), ctx, stride):
            ids = tokens[w.begin : w.end]
            logits = model.forward(ids, model.new_cache(len(ids)))  # [L, V]
            rows = np.arange(w.first_target - w.begin - 1, len(ids) - 1)
            nll -= target_log_probs(logits[rows], ids[rows + 1]).sum()
            scored += len(rows)
        result = perplexity(model, tokens, ctx, stride)
        assert result.scored_tokens == scored
        # chunked and whole-window forward passes differ only in float32 summation order
        assert result.nll_sum == pytest.approx(nll, rel=1e-5)


# --- against transformers ----------------------------------------------------------------------------


def _transformers_perplexity(torch, model, ids, ctx, stride):
    """The documented loop, weighting each window's mean loss by the exact number of labels it averaged
    (labels != -100 after the shift). Also returns the documented weighting, num_valid_tokens - 1."""
    nll_exact = nll_documented = 0.0
    n_exact = n_documented = 0
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor(ids[begin:end])[None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        n_loss = int((target_ids[:, 1:] != -100).sum())
        if n_loss:  # a one-token last window has no labels left after the shift: its loss is NaN
            with torch.no_grad():
                loss = model(input_ids, labels=target_ids).loss.item()
            nll_exact, n_exact = nll_exact + loss * n_loss, n_exact + n_loss
            n_doc = int((target_ids != -100).sum()) - target_ids.size(0)
            nll_documented, n_documented = nll_documented + loss * n_doc, n_documented + n_doc
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_exact / n_exact), n_exact, math.exp(nll_documented / n_documented)


def test_perplexity_equals_transformers_loss_over_the_same_windows(torch_reference, text_model):
    torch, transformers = torch_reference
    hf = transformers.Qwen2ForCausalLM.from_pretrained(text_model, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    ours = load_model(text_model)
    ids = Tokenizer.from_model_dir(text_model).encode(TEXT)
    # stride < ctx (overlapping, uneven last window), stride == ctx (disjoint; with 148 tokens and ctx 49
    # the last window is the single token 147), stride 1 (on a prefix: one window per token), and one
    # window holding everything
    assert len(ids) == 148
    for ctx, stride, n in [(48, 16, 148), (40, 40, 148), (49, 49, 148), (24, 7, 148), (12, 1, 40), (512, 256, 148)]:
        expected, n_scored, documented = _transformers_perplexity(torch, hf, ids[:n], ctx, stride)
        result = perplexity(ours, ids[:n], ctx, stride)
        assert result.scored_tokens == n_scored
        assert result.perplexity == pytest.approx(expected, rel=PPL_RTOL), (ctx, stride)
        if stride == ctx:  # the documented weighting is exact only when no window overlaps the previous one
            assert documented == pytest.approx(expected, rel=1e-12)


# --- the command line --------------------------------------------------------------------------------


def test_cli_prints_perplexity_and_json(text_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    result = qwen_ref("perplexity", "--model", text_model, text, "--ctx", 64, "--stride", 32, "--json",
                      "--backend", "numpy")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    n = len(Tokenizer.from_model_dir(text_model).encode(TEXT))
    assert out["tokens"] == n and out["scored_tokens"] == n - 1 and out["ctx"] == 64 and out["stride"] == 32
    assert out["perplexity"] == pytest.approx(math.exp(out["mean_nll"]), rel=1e-12)
    expected = perplexity(load_model(text_model), Tokenizer.from_model_dir(text_model).encode(TEXT), 64, 32)
    assert out["perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)

    plain = qwen_ref("perplexity", "--model", text_model, text, "--ctx", 64, "--backend", "numpy")  # default stride
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("perplexity ") and "stride 32)" in plain.stdout
    assert float(plain.stdout.split()[1]) == pytest.approx(out["perplexity"], rel=1e-6)  # printed to 4 decimals


def test_cli_perplexity_with_a_16_bit_kv_cache_is_that_of_the_model_with_that_cache(text_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    result = qwen_ref("perplexity", "--model", text_model, text, "--ctx", 64, "--json", "--backend", "numpy",
                      "--kv-dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    tokens = Tokenizer.from_model_dir(text_model).encode(TEXT)
    assert out["kv_dtype"] == "bfloat16"
    assert out["perplexity"] == pytest.approx(perplexity(load_model(text_model, kv_dtype="bfloat16"), tokens, 64, 32)
                                              .perplexity, rel=1e-9)
    assert out["perplexity"] != pytest.approx(perplexity(load_model(text_model), tokens, 64, 32).perplexity, rel=1e-9)


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ("", [], "is empty"),
        ("Hello", [], "perplexity needs 2"),
        (None, [], "no such file"),
        (TEXT, ["--ctx", "40000"], "exceeds the model's context of 32768"),
        (TEXT, ["--ctx", "8", "--stride", "9"], "--stride 9 must be between 1 and --ctx 8"),
        (TEXT, ["--ctx", "1"], "at least 2 tokens"),
        (TEXT, ["--ctx", "0"], "positive integer"),
        (TEXT, ["--kv-dtype", "half"], "invalid choice: 'half'"),
    ],
)
def test_bad_input_exits_2_with_one_line(text_model, tmp_path, content, extra, message):
    text = tmp_path / "text.txt"
    if content is not None:
        text.write_text(content, encoding="utf-8")
    result = qwen_ref("perplexity", "--model", text_model, text, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_checkpoint_without_tokenizer_exits_2(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    result = qwen_ref("perplexity", "--model", FIXTURES / "mha_f32_untied", text)
    assert result.returncode == 2 and "no tokenizer.json" in result.stderr, result.stderr


def test_cli_reads_the_text_from_standard_input_given_a_dash(text_model, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    common = ["--model", text_model, "--ctx", 64, "--json", "--backend", "numpy"]
    from_file = qwen_ref("perplexity", tmp_path / "text.txt", *common)
    from_stdin = subprocess.run([sys.executable, "-m", "qwen_ref", "perplexity", "-", *map(str, common)],
                                capture_output=True, text=True, input=TEXT)
    assert from_file.returncode == 0 and from_stdin.returncode == 0, from_stdin.stderr
    assert {**json.loads(from_stdin.stdout), "file": None} == {**json.loads(from_file.stdout), "file": None}


def test_cli_shows_a_progress_bar_for_windows_of_several_chunks_and_quiet_hides_everything(text_model, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    args = ["perplexity", "--model", text_model, tmp_path / "text.txt", "--ctx", 64, "--prefill-chunk", 16]
    shown = qwen_ref(*args)
    assert shown.returncode == 0 and "prefill: " in shown.stderr and "window 1/" in shown.stderr, shown.stderr
    quiet = qwen_ref(*args, "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == shown.stdout
