"""The logit comparison: its statistics on arrays whose answers are known, its file formats, and
`qwen-ref compare` end to end on qwen-ref's own logits from an intact and an altered checkpoint."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import FIXTURES, write_safetensors
from safetensors.numpy import save_file

from qwen_ref import compare
from qwen_ref.compare import (
    DEFAULT_RTOL,
    assert_logits_close,
    compare_logits,
    load_logits_file,
)
from qwen_ref.verdict import Grade, judge
from qwen_ref.weights import read_safetensors, to_float32

CASE = "mha_f32_untied"  # float32 storage: a scaled weight is written back without rounding


def qwen_ref(*args):
    return subprocess.run([sys.executable, "-m", "qwen_ref", *map(str, args)], capture_output=True, text=True)


def _logits(seed=0, T=8, V=50):
    return np.random.default_rng(seed).normal(0, 3, (T, V)).astype(np.float32)  # [T, V]


def _demote_top1(logits, position):
    """A copy whose argmax at `position` moves to the runner-up (the old top-1 drops below it)."""
    out = logits.copy()
    first, second = np.argsort(out[position])[::-1][:2]
    out[position, first] = out[position, second] - 1.0
    return out, int(first), int(second)


# --- the report on hand-made logits -----------------------------------------------------------------


def test_identical_logits_pass_with_zero_difference_and_zero_kl():
    a = _logits()
    report = compare_logits(a, a.copy())
    assert report.ok and report.max_abs_diff == 0 and report.max_rel_diff == 0
    assert report.argmax_agree == report.positions == 8 and report.first_argmax_mismatch is None
    assert report.top5_overlap == 1.0 and report.kl_max == 0.0 and report.kl_mean == 0.0
    assert report.nmse_max == 0.0 and report.nmse_mean == 0.0 and report.flips == ()


def test_every_argmax_flip_is_listed_with_both_tokens_and_the_reference_margin():
    a = _logits()
    b, first5, second5 = _demote_top1(a, 5)
    b, first6, second6 = _demote_top1(b, 6)
    report = compare_logits(a, b)
    assert not report.ok
    assert report.first_argmax_mismatch == 5 and report.argmax_agree == 6
    assert [(f.position, f.ref_token, f.other_token) for f in report.flips] == [(5, first5, second5),
                                                                                 (6, first6, second6)]
    assert report.flips[0].margin == pytest.approx(a[5, first5] - a[5, second5])
    assert report.flips[1].margin == pytest.approx(a[6, first6] - a[6, second6])
    assert not any(f.near_tie for f in report.flips)  # margins of N(0, 3) draws, far above 2 x tolerance
    assert "first mismatch at position 5" in report.summary()
    text = report.describe()
    assert f"position 5: A picks {first5}, B picks {second5}" in text
    assert f"position 6: A picks {first6}, B picks {second6}" in text


def test_max_difference_reports_its_position_and_token_and_relative_size():
    a = _logits()
    b = a.copy()
    b[3, 17] += 0.5
    b[1, 2] -= 0.25
    report = compare_logits(a, b)
    assert report.max_abs_diff == pytest.approx(0.5, rel=1e-6)
    assert report.max_abs_diff_at == (3, 17)
    assert report.max_rel_diff == pytest.approx(0.5 / max(1.0, float(np.abs(a).max())), rel=1e-6)


def test_tolerance_is_atol_plus_rtol_times_max_of_one_and_largest_reference_logit():
    a = np.array([[0.5, -0.2, 0.1]], dtype=np.float32)  # max |A| < 1: the scale is 1
    assert compare_logits(a, a, rtol=1e-3).tolerance == pytest.approx(1e-3)
    assert compare_logits(a * 40, a * 40, rtol=1e-3, atol=0.5).tolerance == pytest.approx(0.5 + 1e-3 * 20)
    b = a.copy()
    b[0, 1] += 0.01  # argmax unchanged
    assert not compare_logits(a, b, rtol=1e-3).ok
    assert compare_logits(a, b, rtol=1e-3, atol=0.01).ok
    assert compare_logits(a, b, rtol=0.011).ok


def test_a_flip_at_a_near_tie_within_the_tolerance_is_listed_as_one_and_stays_exact():
    # the user's case: margin 1.5e-5 against a tolerance of 3.2e-4; rows 1 and 2 agree
    a = np.array([[3.2, 3.199985, 0.0], [0.0, 1.0, 2.0], [2.0, 1.0, 0.0]], dtype=np.float32)
    b = a.copy()
    b[0, :2] = [3.19999, 3.2]  # both moved by at most 1.5e-5
    report = compare_logits(a, b, rtol=1e-4)
    assert report.tolerance == pytest.approx(3.2e-4)
    (flip,) = report.flips
    assert (flip.position, flip.ref_token, flip.other_token, flip.near_tie) == (0, 0, 1, True)
    assert flip.margin == pytest.approx(1.5e-5, rel=0.1)  # float32 spacing near 3.2 is 2.4e-7
    assert report.ok and judge(report).grade == Grade.EXACT
    assert "1 at near-ties" in report.describe() and "near-tie" in report.describe().splitlines()[-1]


def test_a_flip_beyond_twice_the_tolerance_is_not_a_near_tie():
    a = np.array([[1.0, 0.9, 0.0]], dtype=np.float32)
    b = np.array([[0.9, 1.0, 0.0]], dtype=np.float32)
    (flip,) = compare_logits(a, b, rtol=0.04).flips  # tolerance 0.04: a margin of 0.1 needs more than 2 x 0.04
    assert not flip.near_tie
    (flip,) = compare_logits(a, b, rtol=0.051).flips  # 2 x 0.051 covers the margin (float32 0.9 is 0.1 + 2e-8 below 1)
    assert flip.near_tie


def test_top5_overlap_counts_shared_members_not_order():
    a = np.arange(10, dtype=np.float32)[None].repeat(2, axis=0)  # top-5 of each row: tokens 5..9
    b = a.copy()
    b[0, [9, 8, 7, 6, 5]] = [5, 6, 7, 8, 9]  # same five tokens, reversed order
    b[1, 0] = 100.0  # token 0 pushes token 5 out of the top five
    report = compare_logits(a, b)
    assert report.top5_overlap == pytest.approx((5 + 4) / 2 / 5)


def test_kl_divergence_matches_the_definition_in_float64():
    a, b = _logits(1, T=4, V=7), _logits(2, T=4, V=7)
    p = np.exp(a.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(b.astype(np.float64))
    q /= q.sum(-1, keepdims=True)
    kl = (p * np.log(p / q)).sum(-1)  # [T]
    report = compare_logits(a, b)
    assert report.kl_max == pytest.approx(kl.max(), rel=1e-9)
    assert report.kl_mean == pytest.approx(kl.mean(), rel=1e-9)
    assert report.kl_max_at == int(kl.argmax())


def test_nmse_is_squared_error_over_the_reference_rows_variance_whatever_the_scale():
    a, b = _logits(1, T=4, V=7), _logits(2, T=4, V=7)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    nmse = ((a64 - b64) ** 2).sum(-1) / ((a64 - a64.mean(-1, keepdims=True)) ** 2).sum(-1)  # [T]
    report = compare_logits(a, b)
    assert report.nmse_max == pytest.approx(nmse.max(), rel=1e-9) and report.nmse_mean == pytest.approx(nmse.mean())
    assert report.nmse_max_at == int(nmse.argmax())
    scaled = compare_logits(a * 8, b * 8)  # powers of two: exact in float32
    assert scaled.nmse_max == pytest.approx(report.nmse_max, rel=1e-12)


def test_blocked_computation_equals_one_block(monkeypatch):
    a, b = _logits(3, T=9, V=40), _logits(4, T=9, V=40)
    whole = compare_logits(a, b)
    monkeypatch.setattr(compare, "_BLOCK_ELEMENTS", 2 * 40)  # two rows per block, the last one short
    assert compare_logits(a, b) == whole


def test_nan_in_other_fails_and_json_stays_valid():
    a = _logits()
    b = a.copy()
    b[2, 3] = np.nan
    report = compare_logits(a, b)
    assert not report.ok and report.nonfinite_other == 1 and report.max_abs_diff_at[0] == 2
    out = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert out["ok"] is False and out["max_abs_diff"] is None


def test_shape_mismatch_raises_value_error():
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(_logits(T=3), _logits(T=4))


def test_assert_logits_close_raises_with_the_full_report():
    a = _logits()
    assert assert_logits_close(a, a + 1e-6).ok
    b, _, _ = _demote_top1(a, 3)
    with pytest.raises(AssertionError, match="position 3: A picks") as info:
        assert_logits_close(a, b)
    assert "verdict            WRONG" in str(info.value)
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_logits_close(a, a[:2])


# --- logit files -------------------------------------------------------------------------------------


def test_safetensors_with_int64_tokens_and_bf16_logits_load(tmp_path):
    tokens, logits = np.arange(5, dtype=np.int64), _logits(T=5)
    save_file({"tokens": tokens, "logits": logits}, str(tmp_path / "f32.safetensors"))
    got = load_logits_file(tmp_path / "f32.safetensors")
    assert np.array_equal(got.tokens, tokens) and np.array_equal(got.logits, logits) and got.positions is None

    write_safetensors(tmp_path / "bf16.safetensors", {"logits": ("BF16", logits)})  # no tokens: allowed
    got = load_logits_file(tmp_path / "bf16.safetensors")
    assert got.tokens is None and got.logits.dtype == np.float32
    bf16 = to_float32(read_safetensors(tmp_path / "bf16.safetensors")["logits"])
    assert np.array_equal(got.logits, bf16)
    assert np.abs(got.logits - logits).max() <= np.abs(logits).max() * 2**-8  # bf16 rounding: 8 mantissa bits


# --- the command line --------------------------------------------------------------------------------


def _run_logits(model_dir, out):
    tokens = ",".join(map(str, np.load(FIXTURES / CASE / "reference.npz")["prompt_tokens"]))
    result = qwen_ref("logits", "--model", model_dir, "--tokens", tokens, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Logits of the fixture from two separate runs, and from a copy with layer 1's MLP output scaled."""
    tmp = tmp_path_factory.mktemp("compare")
    altered = tmp / "altered"
    shutil.copytree(FIXTURES / CASE, altered)
    tensors = {name: ("F32", to_float32(w)) for name, w in read_safetensors(altered / "model.safetensors").items()}
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = ("F32", tensors[name][1] * 8.0)
    write_safetensors(altered / "model.safetensors", tensors)
    return {
        "first": _run_logits(FIXTURES / CASE, tmp / "first.npz"),
        "second": _run_logits(FIXTURES / CASE, tmp / "second.npz"),
        "altered": _run_logits(altered, tmp / "altered.npz"),
        "tmp": tmp,
    }


def test_compare_passes_two_runs_of_qwen_ref(runs):
    result = qwen_ref("compare", runs["first"], runs["second"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict            EXACT" in result.stdout
    assert "positions 0-based; row t predicts token t+1" in result.stdout


def test_compare_fails_on_altered_checkpoint_naming_the_first_diverging_position(runs):
    a, b = np.load(runs["first"])["logits"], np.load(runs["altered"])["logits"]
    differ = np.flatnonzero(a.argmax(-1) != b.argmax(-1))
    assert len(differ), "the scaled weight must change some argmax for this test to mean anything"
    result = qwen_ref("compare", runs["first"], runs["altered"], "--json")
    assert result.returncode == 1, result.stderr
    out = json.loads(result.stdout)
    assert out["ok"] is False and out["first_argmax_mismatch"] == int(differ[0])
    assert out["argmax_agree"] == len(a) - len(differ)
    assert out["max_abs_diff"] == pytest.approx(float(np.abs(a - b).max()), rel=1e-6)


def test_compare_reports_a_known_first_mismatch_from_edited_logits(runs):
    saved = np.load(runs["first"])
    edited, _, _ = _demote_top1(saved["logits"], 4)
    path = runs["tmp"] / "edited.npz"
    np.savez(path, tokens=saved["tokens"], logits=edited)
    result = qwen_ref("compare", runs["first"], path)
    assert result.returncode == 1
    assert "  position 4: A picks" in result.stdout and "verdict            WRONG" in result.stdout


def test_compare_json_is_one_object_with_every_field(runs):
    result = qwen_ref("compare", runs["first"], runs["second"], "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ok"] is True and out["tokens_checked"] is True and out["rtol"] == DEFAULT_RTOL
    fields = {"max_abs_diff", "max_rel_diff", "tolerance", "argmax_agree", "argmax_fraction", "top5_overlap",
              "kl_max", "kl_mean", "nmse_max", "nmse_mean", "first_argmax_mismatch", "positions", "vocab_size",
              "atol", "flips", "verdict", "criteria", "failed", "accept", "accepted"}
    assert fields <= out.keys()
    assert out["verdict"] == "EXACT" and out["accepted"] is True and out["flips"] == [] and out["failed"] == []
    assert {c["name"] for c in out["criteria"]} == {"max_abs_diff", "nonfinite", "nmse_mean", "kl_max",
                                                     "top5_overlap"}
    assert all(c["passed"] and {"value", "threshold", "relation", "for"} <= c.keys() for c in out["criteria"])


def test_compare_accepts_safetensors_against_npz(runs):
    saved = np.load(runs["first"])
    path = runs["tmp"] / "other.safetensors"
    save_file({"tokens": saved["tokens"], "logits": saved["logits"]}, str(path))
    assert qwen_ref("compare", runs["first"], path).returncode == 0


def _unusable_inputs(tmp, first):
    saved = np.load(first)
    tokens, logits = saved["tokens"], saved["logits"]
    other_tokens = tokens.copy()
    other_tokens[7] += 1
    np.savez(tmp / "other_tokens.npz", tokens=other_tokens, logits=logits)
    np.savez(tmp / "short.npz", tokens=tokens[:5], logits=logits[:5])
    np.savez(tmp / "narrow.npz", tokens=tokens, logits=logits[:, :40])
    np.savez(tmp / "unordered.npz", tokens=tokens, positions=[3, 2], logits=logits[2:4])
    np.savez(tmp / "past_the_prompt.npz", tokens=tokens, positions=np.arange(14, 18), logits=logits[:4])
    np.savez(tmp / "no_logits.npz", tokens=tokens)
    (tmp / "corrupt.npz").write_bytes(b"not a zip file")
    (tmp / "logits.txt").write_text("1 2 3")
    return [
        (tmp / "missing.npz", "no such file"),
        (tmp / "other_tokens.npz", "tokens differ at position 7"),
        (tmp / "short.npz", "has 16 tokens, "),
        (tmp / "narrow.npz", "logit shapes differ"),
        (tmp / "unordered.npz", "'positions' must be non-negative and strictly increasing"),
        (tmp / "past_the_prompt.npz", "with T > 17, the last of 'positions'"),
        (tmp / "no_logits.npz", "no 'logits' array"),
        (tmp / "corrupt.npz", "not a readable .npz"),
        (tmp / "logits.txt", "want a .npz or .safetensors"),
    ]


def test_unusable_input_exits_2_with_one_line_naming_the_problem(runs):
    for other, message in _unusable_inputs(runs["tmp"], runs["first"]):
        result = qwen_ref("compare", runs["first"], other)
        assert result.returncode == 2, (other, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert message in result.stderr, result.stderr


def _logits_of_positions(runs, name, *selection):
    out = runs["tmp"] / f"{name}.npz"
    tokens = ",".join(map(str, np.load(runs["first"])["tokens"]))
    result = qwen_ref("logits", "--model", FIXTURES / CASE, "--tokens", tokens, "--out", out, *selection)
    assert result.returncode == 0, result.stderr
    return out


def test_compare_lines_up_the_positions_a_partial_file_holds_and_reports_them(runs):
    last5 = _logits_of_positions(runs, "last5", "--last", 5)
    result = qwen_ref("compare", runs["first"], last5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compared           positions 11..15" in result.stdout and "positions x vocab  5 x" in result.stdout
    assert "comparing the 5 positions both files hold" in result.stderr

    saved = np.load(last5)
    edited, _, _ = _demote_top1(saved["logits"], 2)  # row 2 holds position 13
    path = runs["tmp"] / "last5_edited.npz"
    np.savez(path, tokens=saved["tokens"], positions=saved["positions"], logits=edited)
    for a, b in [(runs["first"], path), (path, runs["first"])]:  # either file may be the partial one
        result = qwen_ref("compare", a, b, "--json")
        assert result.returncode == 1, result.stderr
        out = json.loads(result.stdout)
        assert out["compared_positions"] == [11, 12, 13, 14, 15] and out["first_argmax_mismatch"] == 13


def test_compare_refuses_files_of_which_neither_holds_every_position_of_the_other(runs):
    early = _logits_of_positions(runs, "early", "--positions", "0:5")
    late = _logits_of_positions(runs, "late", "--positions", "3:9")
    result = qwen_ref("compare", early, late)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "holds the logits of positions 0..4" in result.stderr and "of positions 3..8" in result.stderr
    assert "neither holds every position of the other" in result.stderr
