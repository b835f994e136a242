"""qwen-ref as an lm-evaluation-harness model: the local multiple-choice task end to end through lm-eval's
command line, its per-item log-likelihoods against `qwen-ref score`, loglikelihood_rolling against
`perplexity`, generate_until against `qwen-ref generate`. Needs the `eval` extra; CI sets
QWEN_REF_REQUIRE_EVAL=1 so these cannot skip there."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import PROSE, TESTS

import qwen_ref
from qwen_ref.cli import main
from qwen_ref.perplexity import perplexity

if os.environ.get("QWEN_REF_REQUIRE_EVAL") == "1":
    import lm_eval  # noqa: F401
else:
    pytest.importorskip("lm_eval")

from lm_eval.api.registry import get_model

from qwen_ref.lm_eval_model import QwenRefLM

TASK_DIR = TESTS / "data" / "lm_eval_task"
TEXT = PROSE  # 148 Qwen tokens


@pytest.fixture(scope="module")
def lm(text_model):
    return QwenRefLM(model=str(text_model), backend="numpy")


def test_lm_eval_finds_the_model_by_name_once_the_module_is_imported():
    assert get_model("qwen-ref") is QwenRefLM


def test_local_task_end_to_end_and_its_log_likelihoods_are_those_of_qwen_ref_score(text_model, tmp_path, capsys):
    # lm-eval's own command line, as a user runs it, from another working directory: the task reads its
    # items from beside its YAML
    run = subprocess.run(
        [sys.executable, "-m", "qwen_ref.lm_eval_model", "--model", "qwen-ref",
         "--model_args", f"model={text_model},backend=numpy", "--include_path", str(TASK_DIR),
         "--tasks", "qwen_ref_local", "--output_path", str(tmp_path / "out"), "--log_samples"],
        check=False, capture_output=True, text=True, cwd=tmp_path,
        # the qwen_ref under test, whatever the working directory; no network for `datasets`
        env={**os.environ, "PYTHONPATH": str(Path(qwen_ref.__file__).parents[1]), "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    [samples_file] = (tmp_path / "out").rglob("samples_qwen_ref_local_*.jsonl")
    metrics = json.loads(results_file.read_text())["results"]["qwen_ref_local"]
    acc, acc_norm = metrics["acc,none"], metrics["acc_norm,none"]
    with capsys.disabled():
        print(f"\nlm-eval qwen_ref_local on {text_model.name}: acc {acc:.4f}, acc_norm {acc_norm:.4f}")
    assert 0 <= acc <= 1 and 0 <= acc_norm <= 1
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(samples) == 12

    # the same items through `qwen-ref score`: the prompt's trailing space stands for lm-eval's target
    # delimiter (the split moves it back to the continuation), so per_char divides by the choice alone,
    # as acc_norm does
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"context": f"Question: {s['doc']['question']}\nAnswer: ",
                                         "continuations": s["doc"]["choices"]}) + "\n" for s in samples))
    capsys.readouterr()
    assert main(["score", "--model", str(text_model), str(items), "--json", "--quiet", "--backend", "numpy"]) == 0
    scored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for sample, ours in zip(samples, scored, strict=True):
        theirs = [float(ll) for (ll, _greedy) in sample["filtered_resps"]]
        # the same forward passes, but lm-eval's order shares other prefixes than the file's, so the
        # prefill chunks differ and float32 sums run in another order: ~1e-7 relative
        np.testing.assert_allclose([c["sum"] for c in ours["continuations"]], theirs, rtol=1e-6)
        assert [c["greedy"] for c in ours["continuations"]] == [g == "True" for (_ll, g) in sample["filtered_resps"]]
        gold = sample["doc"]["answer"]
        assert sample["acc"] == float(ours["best"] == gold)
        assert sample["acc_norm"] == float(ours["best_per_char"] == gold)
    assert acc == pytest.approx(np.mean([s["best"] == s_["doc"]["answer"] for s, s_ in zip(scored, samples)]))


def test_loglikelihood_rolling_is_minus_the_perplexity_nll_after_the_end_of_text_token(lm):
    tokens = lm.tok_encode(TEXT)
    assert len(tokens) == 148 == 4 * 37
    ids = [lm.eot_token_id, *tokens]
    # one window; then max_length 37: four full windows, which are perplexity's windows of ctx 38, stride 37
    # over the same ids (each reads 37 tokens and scores the 37 no earlier window scored)
    for max_length, ctx, stride in [(None, 149, 149), (37, 38, 37)]:
        lm._max_length = max_length or lm.model.config.max_position_embeddings
        [rolling] = lm.loglikelihood_rolling([SimpleNamespace(args=(TEXT,))], disable_tqdm=True)
        expected = perplexity(lm.model, ids, ctx, stride)
        assert expected.scored_tokens == 148
        # the same forward passes in the same chunks; only the float64 totals add in another order
        assert rolling == pytest.approx(-expected.nll_sum, rel=1e-9)
    lm._max_length = lm.model.config.max_position_embeddings


def _generate_text(model_dir: Path, prompt: str, max_new: int, stop: list[str], capsys) -> str:
    capsys.readouterr()
    args = ["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", str(max_new),
            "--json", "--quiet", "--backend", "numpy", "--temperature", "0"]
    assert main(args + [a for s in stop for a in ("--stop", s)]) == 0
    return json.loads(capsys.readouterr().out)["text"]


def test_generate_until_equals_qwen_ref_generate_with_the_same_stop_string(lm, text_model, capsys):
    prompts = ["Question: What is the capital of France?\nAnswer:", "Question: What is the capital of Spain?\nAnswer:"]
    full = _generate_text(text_model, prompts[0], 12, [], capsys)
    stop = full[len(full) // 2 :][:3]  # a string the greedy output really reaches, past its start
    assert stop and stop in full
    expected = [_generate_text(text_model, p, 12, [stop], capsys) for p in prompts]
    assert expected[0] == full[: full.index(stop)]
    requests = [SimpleNamespace(args=(p, {"until": [stop], "max_gen_toks": 12, "do_sample": False})) for p in prompts]
    # the two prompts share a prefix: the second request reuses the first's keys and values
    assert lm.generate_until(requests, disable_tqdm=True) == expected


def test_loglikelihood_of_a_choice_shared_context_equals_one_request_alone(lm):
    context = "Question: Which planet is closest to the Sun?\nAnswer:"
    choices = [" Venus", " Mercury", " Mars"]
    together = lm.loglikelihood([SimpleNamespace(args=(context, c)) for c in choices], disable_tqdm=True)
    alone = [lm.loglikelihood([SimpleNamespace(args=(context, c))], disable_tqdm=True)[0] for c in choices]
    assert [g for _, g in together] == [g for _, g in alone]
    np.testing.assert_allclose([s for s, _ in together], [s for s, _ in alone], rtol=1e-9)  # identical passes
