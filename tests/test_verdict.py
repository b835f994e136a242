"""The graded verdict on the three kinds of difference an engine can show (float32 reordering, 16-bit rounding,
a bug), reproduced without llama.cpp (tools/verdict_cases.py), and `qwen-ref compare`'s exit codes for them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import FIXTURES

from qwen_ref.compare import assert_logits_close, compare_logits
from qwen_ref.verdict import Grade, judge

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import verdict_cases


def qwen_ref(*args):
    return subprocess.run([sys.executable, "-m", "qwen_ref", *map(str, args)], check=False, capture_output=True,
                          text=True)


# mha_f32_untied: float32 weights, 16 positions; long_seq_bf16: 320 positions, where rounding drifts the most
@pytest.mark.parametrize("case", ["mha_f32_untied", "long_seq_bf16"])
def test_reordering_is_exact_16_bit_rounding_drifts_and_bugs_are_wrong(case):
    tokens = np.load(FIXTURES / case / "reference.npz")["prompt_tokens"]
    reports = verdict_cases.run_cases(FIXTURES / case, tokens)
    grades = {name: judge(report).grade.name for name, report in reports.items()}
    expected = {name: grade for name, grade in verdict_cases.EXPECTED.items() if grade is not None}
    assert {name: grades[name] for name in expected} == expected, grades
    drift = judge(reports["kv-float16"])
    assert [c.name for c in drift.failed()] == ["max_abs_diff"]  # the only criterion a 16-bit cache breaks


def test_a_drift_is_accepted_only_when_asked_for():
    case = FIXTURES / "mha_f32_untied"
    tokens = np.load(case / "reference.npz")["prompt_tokens"]
    report = verdict_cases.run_cases(case, tokens, only=("bf16-activations",))["bf16-activations"]
    assert judge(report).accepted(Grade.DRIFT) and not judge(report).accepted(Grade.EXACT)


def test_assert_logits_close_accepts_drift_when_told():
    a = np.random.default_rng(0).normal(0, 3, (8, 50)).astype(np.float32)  # [T, V]
    b = a * np.float32(1 + 2**-9)  # every logit off by half a bf16 unit: beyond rtol, far within drift
    with pytest.raises(AssertionError, match="verdict            DRIFT"):
        assert_logits_close(a, b)
    assert assert_logits_close(a, b, accept="drift").nmse_mean > 0
    with pytest.raises(AssertionError, match="verdict            WRONG"):
        assert_logits_close(a, a[:, ::-1].copy(), accept="drift")
    with pytest.raises(ValueError, match="accept"):
        assert_logits_close(a, b, accept="wrong")


def test_nonfinite_values_are_wrong_whatever_else_holds():
    a = np.random.default_rng(1).normal(0, 3, (4, 20)).astype(np.float32)  # [T, V]
    b = a.copy()
    b[1, 2] = np.inf
    judged = judge(compare_logits(a, b))
    assert judged.grade == Grade.WRONG and "nonfinite" in [c.name for c in judged.failed()]
    assert json.loads(json.dumps(judged.to_dict(), allow_nan=False))["verdict"] == "WRONG"


# --- the command line --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_runs(tmp_path_factory):
    """`qwen-ref logits` of one fixture with a float32 and with a float16 KV cache."""
    tmp = tmp_path_factory.mktemp("verdict")
    tokens = ",".join(map(str, np.load(FIXTURES / "mha_f32_untied" / "reference.npz")["prompt_tokens"]))
    out = {}
    for kv_dtype in ("float32", "float16"):
        out[kv_dtype] = tmp / f"{kv_dtype}.npz"
        result = qwen_ref("logits", "--model", FIXTURES / "mha_f32_untied", "--tokens", tokens, "--kv-dtype",
                          kv_dtype, "--out", out[kv_dtype])
        assert result.returncode == 0, result.stderr
    return out


def test_compare_calls_a_16_bit_cache_drift_names_the_failed_criterion_and_exits_by_accept(cache_runs):
    result = qwen_ref("compare", cache_runs["float32"], cache_runs["float16"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "verdict            DRIFT (failed: max |A - B|)" in result.stdout
    assert "accept it with --accept drift" in result.stdout
    assert qwen_ref("compare", cache_runs["float32"], cache_runs["float16"], "--accept", "drift").returncode == 0
    out = json.loads(qwen_ref("compare", cache_runs["float32"], cache_runs["float16"], "--json").stdout)
    assert out["verdict"] == "DRIFT" and out["failed"] == ["max_abs_diff"] and out["accepted"] is False
    (exact,) = [c for c in out["criteria"] if c["name"] == "max_abs_diff"]
    assert exact["value"] > exact["threshold"] == out["tolerance"] and exact["passed"] is False
    # a tighter drift threshold than the NMSE measured makes it WRONG
    nmse = next(c["value"] for c in out["criteria"] if c["name"] == "nmse_mean")
    tight = qwen_ref("compare", cache_runs["float32"], cache_runs["float16"], "--accept", "drift",
                     "--drift-nmse", nmse / 2)
    assert tight.returncode == 1 and "verdict            WRONG (failed: max |A - B|, NMSE mean)" in tight.stdout


def test_incremental_mode_is_exact_against_the_batched_forward():
    tokens = ",".join(map(str, np.load(FIXTURES / "long_seq_bf16" / "reference.npz")["prompt_tokens"][:40]))
    for backend in ("numpy", "numba"):
        result = qwen_ref("compare", "--incremental", "--model", FIXTURES / "long_seq_bf16", "--tokens", tokens,
                          "--backend", backend, "--quiet", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        out = json.loads(result.stdout)
        assert out["verdict"] == "EXACT" and out["positions"] == 40 and out["mode"] == "incremental"
        assert out["compared_positions"] == list(range(40))


def test_compare_wants_exactly_one_mode(cache_runs):
    a, b = cache_runs["float32"], cache_runs["float16"]
    model = FIXTURES / "mha_f32_untied"
    for args in [(), (a,), ("--incremental",), ("--incremental", "--tokens", "1,2"), ("--model", model),
                 (a, b, "--incremental", "--model", model, "--tokens", "1,2"), (a, b, "--tokens", "1,2"),
                 ("--incremental", "--model", model)]:
        result = qwen_ref("compare", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
