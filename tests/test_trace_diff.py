"""The trace diff (`qwen-ref compare` on two trace files): its statistics on arrays whose answers are known,
and end to end, the first culprit it names when one operation of one layer of a random model is broken."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import FIXTURES, small_config, write_safetensors

from qwen_ref.backends import get_backend
from qwen_ref.cli import main
from qwen_ref.config import QwenConfig
from qwen_ref.model import load_model
from qwen_ref.npz import save_npz
from qwen_ref.trace import Recorder, Trace, load_trace, save_trace
from qwen_ref.trace_diff import DEFAULT_MAX_NMSE, OPERATIONS, tensor_diff, traced_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from trace_nmse_floor import BREAKAGES, qwen_like_weights

TOKENS = [3, 17, 42, 5, 96, 0, 11, 64, 23, 8, 77, 31]
CONFIG = small_config(num_hidden_layers=3)  # GQA: 4 query heads, 2 kv heads; rms_norm_eps 1e-6 as Qwen's


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 3-layer random checkpoint of Qwen's activation scale (see tools/trace_nmse_floor.py), float32."""
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    weights = qwen_like_weights(QwenConfig.from_dict(CONFIG))
    write_safetensors(folder / "model.safetensors", {k: ("F32", v) for k, v in weights.items()})
    return folder


def _trace(checkpoint, backend="numpy", breakage=None, names=None, tokens=TOKENS, **metadata) -> Trace:
    model = load_model(checkpoint, get_backend(backend))
    if breakage is not None:
        BREAKAGES[breakage][0](model)
    model.recorder = Recorder(names=names)
    model.forward(np.array(tokens), model.new_cache(len(tokens)))
    return Trace(model.recorder.tensors(), {"qwen_ref_version": "0.1.0", "backend": backend, "weights_dtype": "F32",
                                            "checkpoint_sha256": "ab" * 32, "tokens": json.dumps(tokens)} | metadata)


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    save_trace(path, _trace(checkpoint))
    return path


def _compare(capsys, *args):
    code = main(["compare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# --- statistics on hand-made tensors ----------------------------------------------------------------


def test_nmse_max_difference_and_cosine_of_a_known_pair():
    a = np.array([[1, 2], [3, 4]], dtype=np.float32)  # var 1.25
    b = np.array([[1, 2], [3, 5]], dtype=np.float32)
    d = tensor_diff("blk.0.l_out", a, b)
    assert d.nmse == pytest.approx(0.25 / 1.25, rel=1e-12)  # float64 arithmetic on exact float32 inputs
    assert d.max_abs_diff == 1 and d.max_abs_diff_at == (1, 1) and d.compared == 4
    assert d.cosine == pytest.approx(34 / math.sqrt(30 * 39), rel=1e-12)


def test_constant_reference_is_zero_when_matched_and_infinite_when_not():
    a = np.full((3, 4), 2.0, dtype=np.float32)
    assert tensor_diff("inp_embd", a, a.copy()).nmse == 0
    assert tensor_diff("inp_embd", a, a + np.float32(1e-3)).nmse == math.inf


def test_nan_in_the_other_is_an_infinite_error_unless_it_declares_missing_values():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = a.copy()
    b[1, 2] = np.nan
    real = tensor_diff("inp_embd", a, b)
    assert real.nmse == math.inf and real.nonfinite == 1 and real.max_abs_diff_at == (1, 2) and real.cosine is None
    skipped = tensor_diff("inp_embd", a, b, missing_is_nan=True)
    assert skipped.nmse == 0 and skipped.compared == 11 and skipped.cosine == pytest.approx(1.0)
    b[0, 0] = np.inf  # an inf is never a missing value
    assert tensor_diff("inp_embd", a, b, missing_is_nan=True).nmse == math.inf


def test_absent_inputs_are_replaced_by_their_nearest_traced_ancestors():
    held = {"blk.1.attn_norm", "blk.1.Qcur_rope", "blk.1.l_out", "blk.0.l_out"}
    assert traced_inputs("blk.1.Qcur_rope", held, 2) == (("blk.1.attn_norm",), ("blk.1.Qcur",))
    assert traced_inputs("result_norm", held, 2) == (("blk.1.l_out",), ("blk.2.l_out",))
    assert traced_inputs("blk.1.kqv_out", {"blk.1.Vcur"}, 2) == (("blk.1.Vcur",), ("blk.1.Qcur_rope", "blk.1.Kcur_rope"))


# --- the first culprit, end to end --------------------------------------------------------------------


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_one_broken_operation_is_named_as_the_first_culprit_in_its_layer(checkpoint, reference, tmp_path, capsys,
                                                                         breakage):
    expected = BREAKAGES[breakage][1]
    broken = tmp_path / "broken.safetensors"
    save_trace(broken, _trace(checkpoint, breakage=breakage))
    code, out, _ = _compare(capsys, reference, broken)
    assert code == 1, out
    operation = OPERATIONS[expected.rsplit(".", 1)[-1]]
    assert f"first culprit  {expected}: {operation}" in out
    assert f"the error enters at {expected}" in out


def test_json_names_the_culprit_its_inputs_within_the_threshold_and_every_tensor(checkpoint, reference, tmp_path,
                                                                                  capsys):
    broken = tmp_path / "broken.safetensors"
    save_trace(broken, _trace(checkpoint, breakage="k bias dropped"))
    code, out, _ = _compare(capsys, reference, broken, "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    culprit = report["culprit"]
    assert culprit["key"] == "blk.1.Kcur" and culprit["layer"] == 1 and culprit["operation"] == "k_proj with its bias"
    assert list(culprit["inputs"]) == ["blk.1.attn_norm"] and culprit["inputs"]["blk.1.attn_norm"] <= DEFAULT_MAX_NMSE
    assert culprit["nmse"] > DEFAULT_MAX_NMSE
    tensors = {t["key"]: t for t in report["tensors"]}
    assert len(tensors) == 1 + 3 * 15 + 2  # inp_embd, 15 names in each of 3 layers, result_norm, result_output
    assert tensors["blk.0.l_out"]["nmse"] == 0  # layer 0 runs the same operations on the same values
    assert tensors["blk.1.Kcur"]["max_abs_diff_at"][0] in range(len(TOKENS))
    assert report["metadata"]["other"]["backend"] == "numpy"


def test_culprit_with_absent_inputs_says_which_ancestors_stand_in(checkpoint, tmp_path, capsys):
    names = ["attn_norm", "*_rope", "l_out"]
    ref, broken = tmp_path / "ref.npz", tmp_path / "broken.npz"
    save_trace(ref, _trace(checkpoint, names=names))
    save_trace(broken, _trace(checkpoint, breakage="RoPE pairs neighbours", names=names))
    code, out, _ = _compare(capsys, ref, broken)
    assert code == 1
    assert "first culprit  blk.1.Qcur_rope: RoPE on the queries" in out
    assert "not in both traces: blk.1.Qcur; their nearest traced ancestors stand in" in out
    assert "its inputs     blk.1.attn_norm 0.0e+00" in out


# --- correct pairs pass -------------------------------------------------------------------------------


def test_a_trace_against_itself_passes_with_every_nmse_zero(reference, capsys):
    code, out, _ = _compare(capsys, reference, reference, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["culprit"] is None
    assert all(t["nmse"] == 0 and t["max_abs_diff"] == 0 for t in report["tensors"])


def test_numpy_and_numba_backends_agree_within_the_default_threshold(checkpoint, reference, tmp_path, capsys):
    other = tmp_path / "numba.safetensors"
    save_trace(other, _trace(checkpoint, backend="numba"))
    code, out, _ = _compare(capsys, reference, other)
    assert code == 0, out
    assert "verdict        PASS" in out and "backend numba" in out
    lines = out.splitlines()
    table = lines[lines.index("NMSE = mean((A-B)^2) / var(A) per tensor (* the first culprit):") + 1:]
    assert table[0].split() == ["layer", "attn_norm", "Qcur", "Kcur", "Vcur", "Qcur_rope", "Kcur_rope", "kqv_out",
                                "attn_out", "ffn_inp", "ffn_norm", "ffn_gate", "ffn_up", "ffn_act", "ffn_out", "l_out"]
    assert [row.split()[0] for row in table[1:4]] == ["0", "1", "2"]


def test_npz_and_safetensors_traces_hold_the_same_and_compare_alike(checkpoint, reference, tmp_path, capsys):
    as_npz = tmp_path / "ref.npz"
    save_trace(as_npz, load_trace(reference))
    assert _compare(capsys, reference, as_npz)[0] == 0
    broken = tmp_path / "broken.npz"
    save_trace(broken, _trace(checkpoint, breakage="GQA heads round-robin"))
    code, out, _ = _compare(capsys, as_npz, broken)
    assert code == 1 and "first culprit  blk.1.kqv_out" in out


def test_values_an_engine_did_not_print_are_skipped_when_its_metadata_says_so(reference, tmp_path, capsys):
    ref = load_trace(reference)
    rng = np.random.default_rng(0)
    holes = {}
    for key, value in ref.tensors.items():  # an engine printing about half of every tensor
        hole = value.copy()
        hole[rng.random(value.shape) < 0.5] = np.nan
        holes[key] = hole
    declared, undeclared = tmp_path / "declared.safetensors", tmp_path / "undeclared.safetensors"
    save_trace(declared, Trace(holes, ref.metadata | {"missing_values": "nan"}))
    save_trace(undeclared, Trace(holes, ref.metadata))
    code, out, _ = _compare(capsys, reference, declared, "--json")
    report = json.loads(out)
    assert code == 0
    for t in report["tensors"]:
        assert t["compared"] == int((~np.isnan(holes[t["key"]])).sum()) < t["size"]
    code, out, _ = _compare(capsys, reference, undeclared, "--json")
    report = json.loads(out)
    assert code == 1 and report["culprit"]["key"] == "inp_embd" and report["culprit"]["nmse"] is None
    assert report["tensors"][0]["nonfinite"] > 0


# --- unusable input: exit 2, one line -----------------------------------------------------------------


def _one_line_error(result):
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    return result.stderr


def _qwen_ref(*args):
    return subprocess.run([sys.executable, "-m", "qwen_ref", *map(str, args)], check=False, capture_output=True, text=True)


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(reference, tmp_path):
    ref = load_trace(reference)
    other = tmp_path / "short.safetensors"
    save_trace(other, Trace({k: v[:-1] if k == "blk.0.Kcur" else v for k, v in ref.tensors.items()}, ref.metadata))
    err = _one_line_error(_qwen_ref("compare", reference, other))
    assert f"'blk.0.Kcur' has shape [{len(TOKENS)}, 2, 8] in the reference, [{len(TOKENS) - 1}, 2, 8]" in err


def test_a_logits_file_against_a_trace_is_refused(reference, tmp_path):
    logits = tmp_path / "logits.npz"
    save_npz(logits, {"tokens": np.array(TOKENS), "logits": load_trace(reference).tensors["result_output"]})
    err = _one_line_error(_qwen_ref("compare", logits, reference))
    assert f"{reference} is a trace and {logits} a logits file: compare two traces or two logits files" in err


def test_traces_of_different_prompts_are_refused(checkpoint, reference, tmp_path):
    other = tmp_path / "other.safetensors"
    save_trace(other, _trace(checkpoint, tokens=TOKENS[:5] + [1] + TOKENS[6:]))
    err = _one_line_error(_qwen_ref("compare", reference, other))
    assert "different prompts" in err and "first different at position 5" in err


def test_different_checkpoints_are_noted_and_compared(reference, tmp_path, capsys):
    ref = load_trace(reference)
    other = tmp_path / "other.safetensors"
    save_trace(other, Trace(ref.tensors, ref.metadata | {"checkpoint_sha256": "cd" * 32}))
    code, _, err = _compare(capsys, reference, other)
    assert code == 0 and "note: the traces are of different checkpoints (sha256 abababababab and cdcdcdcdcdcd)" in err


def test_trace_options_are_refused_for_logits_files(tmp_path):
    logits = tmp_path / "logits.npz"
    save_npz(logits, {"logits": np.zeros((2, 5), dtype=np.float32)})
    assert "apply to trace files" in _one_line_error(_qwen_ref("compare", logits, logits, "--max-nmse", "1e-3"))


# --- the plot -----------------------------------------------------------------------------------------


def test_plot_writes_a_png(checkpoint, reference, tmp_path, capsys, matplotlib):
    broken, png = tmp_path / "broken.safetensors", tmp_path / "nmse.png"
    save_trace(broken, _trace(checkpoint, breakage="SwiGLU gate and up swapped"))
    assert _compare(capsys, reference, broken, "--plot", png)[0] == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000  # a drawn figure, not a stub


def test_plot_without_matplotlib_is_a_one_line_error(reference, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, out, err = _compare(capsys, reference, reference, "--plot", tmp_path / "nmse.png")
    assert code == 2 and out == "" and err.strip() == "qwen-ref: error: --plot needs matplotlib: pip install 'qwen-ref[plot]'"


# --- what the report will not claim -------------------------------------------------------------------


def test_a_culprit_past_untraced_layers_is_not_pinned_on_one_operation(checkpoint, tmp_path, capsys):
    """k bias dropped in layer 1, only layer 2 traced: the error entered somewhere before blk.2.attn_norm."""
    layer2 = [f"blk.2.{n}" for n in ("attn_norm", "l_out")]
    ref, broken = tmp_path / "ref2.safetensors", tmp_path / "broken2.safetensors"
    save_trace(ref, Trace({k: v for k, v in _trace(checkpoint).tensors.items() if k in layer2}, {}))
    save_trace(broken, Trace({k: v for k, v in _trace(checkpoint, breakage="k bias dropped").tensors.items()
                              if k in layer2}, {}))
    code, out, _ = _compare(capsys, ref, broken)
    assert code == 1
    assert "the error enters after the start and by blk.2.attn_norm" in out and "blk.1.l_out" in out
    assert "the error enters at" not in out


def test_a_printed_only_trace_must_be_b(reference, tmp_path):
    printed = tmp_path / "printed.safetensors"
    ref = load_trace(reference)
    save_trace(printed, Trace(ref.tensors, ref.metadata | {"missing_values": "nan", "value_decimals": "4"}))
    assert "give it as B" in _one_line_error(_qwen_ref("compare", printed, reference))
    assert _qwen_ref("compare", reference, printed).returncode == 0


@pytest.mark.parametrize("flags", [["--rtol", "1"], ["--accept", "drift"], ["--drift-kl", "1"], ["--tokens", "1,2"]])
def test_options_of_the_logits_verdict_are_refused_with_two_traces(reference, flags):
    assert "not to traces" in _one_line_error(_qwen_ref("compare", reference, reference, *flags))


@pytest.mark.parametrize("names", ["", ",", " , "])
def test_an_empty_name_selection_is_refused(tmp_path, names):
    result = _qwen_ref("trace", "--model", FIXTURES / "mha_f32_untied", "--tokens", "1,2", "--names", names,
                       "--out", tmp_path / "t.npz")
    assert "no pattern given" in _one_line_error(result)
