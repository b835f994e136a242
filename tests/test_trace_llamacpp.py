"""llama.cpp's eval-callback output as a trace (tools/trace_llamacpp.py), on a real sample in tests/data/llamacpp/.

The sample is llama-eval-callback run on a tiny random checkpoint with the Qwen1.5 vocabulary, which
tools/make_checkpoint.py rebuilds from its seed (sample.json holds its sha256); tools/make_llamacpp_sample.sh
regenerates both. The printed values must be qwen-ref's at the same entries.
"""

import json
import lzma
import subprocess
import sys

import numpy as np
import pytest
from helpers import TESTS

from qwen_ref.fingerprint import checkpoint_hash
from qwen_ref.model import load_model
from qwen_ref.trace import LAST_NAMES, LAYER_NAMES, Recorder, load_trace, trace_key

REPO = TESTS.parent
sys.path.insert(0, str(REPO / "tools"))
import make_checkpoint
import trace_llamacpp

SAMPLE = TESTS / "data" / "llamacpp"
T, D, H, HKV, HD, F, V = 5, 64, 4, 2, 16, 160, 151936  # the sample: 5 tokens, make_checkpoint's `tiny` shape
# llama.cpp prints "%12.4f": an entry is off by up to half of 1e-4 from its float32 value. Beyond that the
# two engines round differently in float32 (qwen-ref and transformers differ by NMSE ~1e-12, relative
# ~1e-6): 1e-5 of the tensor's largest magnitude leaves ten times that.
PRINT_ROUNDING = 5e-5
FLOAT_RELATIVE = 1e-5


@pytest.fixture(scope="module")
def sample_lines():
    return lzma.decompress((SAMPLE / "eval-callback.txt.xz").read_bytes()).decode().splitlines()


@pytest.fixture(scope="module")
def llamacpp(sample_lines):
    return trace_llamacpp.to_trace(*trace_llamacpp.parse_output(sample_lines))


@pytest.fixture(scope="module")
def qwen_ref_trace(llamacpp, tmp_path_factory):
    """qwen-ref's trace of the sample's checkpoint (rebuilt from its seed) and tokens."""
    model_dir = tmp_path_factory.mktemp("llamacpp") / "tiny-f32"
    make_checkpoint.write_checkpoint(model_dir, make_checkpoint.config_json("tiny", "float32"), seed=0)
    info = json.loads((SAMPLE / "sample.json").read_text())
    assert checkpoint_hash(model_dir) == info["checkpoint_sha256"], "make_checkpoint no longer makes these weights"
    model = load_model(model_dir)
    model.recorder = Recorder()
    tokens = json.loads(llamacpp.metadata["tokens"])
    model.forward(np.array(tokens), model.new_cache(len(tokens)))
    return model.recorder.tensors()


def test_every_trace_name_maps_with_its_shape_and_the_printed_entries(llamacpp):
    per_layer = {"attn_norm": (T, D), "Qcur": (T, H, HD), "Kcur": (T, HKV, HD), "Vcur": (T, HKV, HD),
                 "Qcur_rope": (T, H, HD), "Kcur_rope": (T, HKV, HD), "kqv_out": (T, H * HD), "attn_out": (T, D),
                 "ffn_inp": (T, D), "ffn_norm": (T, D), "ffn_gate": (T, F), "ffn_up": (T, F), "ffn_act": (T, F),
                 "ffn_out": (T, D), "l_out": (T, D)}
    expected = {"inp_embd": (T, D), **{trace_key(n, i): s for i in range(2) for n, s in per_layer.items()},
                "result_norm": (T, D), "result_output": (T, V)}
    assert set(per_layer) == set(LAYER_NAMES)
    assert {k: v.shape for k, v in llamacpp.tensors.items()} == expected
    # after layer 1's attention llama.cpp keeps the last position only (the one eval-callback outputs)
    last_only = {trace_key(n, 1) for n in LAYER_NAMES[LAYER_NAMES.index("ffn_inp"):]} | set(LAST_NAMES)
    for key, value in llamacpp.tensors.items():
        printed = ~np.isnan(value)
        rows = [T - 1] if key in last_only else list(range(T))
        assert np.flatnonzero(printed.any(axis=tuple(range(1, value.ndim)))).tolist() == rows, key
        # the first and last 3 along the last axis (more than 6), every head (4 and 2: no more than 6)
        for row in rows:
            inner = printed[row].reshape(-1, value.shape[-1])
            assert inner.all(axis=0).tolist() == [i < 3 or i >= value.shape[-1] - 3 for i in range(value.shape[-1])]
    assert llamacpp.metadata["missing_values"] == "nan"
    assert llamacpp.metadata["source"] == "llama.cpp eval-callback"
    assert json.loads(llamacpp.metadata["tokens"]) == [9707, 1879, 11, 419, 374]  # "Hello world, this is"


def test_printed_values_equal_qwen_refs_within_the_4_decimal_print(llamacpp, qwen_ref_trace):
    for key, theirs in llamacpp.tensors.items():
        ours = qwen_ref_trace[key]
        printed = ~np.isnan(theirs)
        tolerance = PRINT_ROUNDING + FLOAT_RELATIVE * np.abs(ours).max()
        worst = np.abs(theirs[printed] - ours[printed]).max()
        assert worst <= tolerance, f"{key}: {worst:.2e} > {tolerance:.2e}"


def test_printed_sums_equal_qwen_refs_sums(llamacpp, qwen_ref_trace):
    """eval-callback's sum covers every element, the ones not printed too."""
    sums = json.loads(llamacpp.metadata["sums"])
    assert set(sums) == set(llamacpp.tensors)
    u = 2.0**-24  # float32 unit roundoff
    for key, (start, stop, total) in sums.items():
        x = qwen_ref_trace[key][start:stop].astype(np.float64)
        # printed with 6 decimals; llama.cpp adds in float32 one element after another (error about
        # u sqrt(n) sum|x|, Higham's probabilistic bound), and each element differs between the engines
        # by about u |x|: twice the two together
        tolerance = 5e-7 + 2 * u * (np.sqrt(x.size) + 1) * np.abs(x).sum()
        assert abs(x.sum() - total) <= tolerance, f"{key}: sum {x.sum()} against printed {total}"


def test_the_comparison_tells_rope_apart(llamacpp, qwen_ref_trace):
    """Had the mapping put ROPE's Qcur where the bias ADD's belongs, the value check would fail."""
    theirs = llamacpp.tensors["blk.0.Qcur_rope"][1:]
    ours = qwen_ref_trace["blk.0.Qcur"][1:]  # position 0 is not rotated
    printed = ~np.isnan(theirs)
    assert np.abs(theirs[printed] - ours[printed]).max() > 100 * PRINT_ROUNDING


def _print_like_eval_callback(name: str, values: np.ndarray) -> list[str]:
    """common_debug_print_tensor's layout for a float32 array [ne3, ne2, ne1, ne0]."""
    ne = values.shape[::-1]
    shape = "{" + ", ".join(map(str, ne)) + "}"
    lines = [f"common_debug_cb_eval: {name:>24} = (f32) {'ADD':>10}(x{shape}, }}) = {shape}"]
    for i3 in range(ne[3]):
        lines.append("    [")
        for n2, i2 in enumerate(trace_llamacpp.printed_indices(ne[2])):
            if n2 == 3 and ne[2] > 6:
                lines.append("        ..., ")
            lines.append("        [")
            for n1, i1 in enumerate(trace_llamacpp.printed_indices(ne[1])):
                if n1 == 3 and ne[1] > 6:
                    lines.append("            ..., ")
                row = [f"{values[i3, i2, i1, i0]:12.4f}" for i0 in trace_llamacpp.printed_indices(ne[0])]
                if ne[0] > 6:
                    row[3] = "   ..., " + row[3]
                lines.append("            [" + ", ".join(row) + "  ],")
            lines.append("        ],")
        lines.append("    ]")
        lines.append(f"    sum = {values.sum():f}")
    return lines


def test_elided_rows_and_heads_are_nan_and_the_rest_in_place():
    """Heads and positions past 6 (not in the sample): eval-callback prints '..., ' lines between them."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 9, 8, 10)).round(4).astype(np.float32)  # ggml {hd 10, H 8, T 9, 1}
    nodes = trace_llamacpp.parse_output(_print_like_eval_callback("Qcur-0", q))[1]
    assert len(nodes) == 1 and nodes[0].ne == (10, 8, 9, 1)
    expected = np.full_like(q, np.nan)
    printed = np.ix_([0], [0, 1, 2, 6, 7, 8], [0, 1, 2, 5, 6, 7], [0, 1, 2, 7, 8, 9])
    expected[printed] = q[printed]
    np.testing.assert_array_equal(nodes[0].values, expected)  # NaN where not printed


def test_cli_writes_the_trace_and_lists_what_it_skips(sample_lines, tmp_path):
    (tmp_path / "eval.txt").write_text("\n".join(sample_lines) + "\n")
    run = subprocess.run([sys.executable, str(REPO / "tools" / "trace_llamacpp.py"), str(tmp_path / "eval.txt"),
                          "--out", str(tmp_path / "l.safetensors"), "--verbose"],
                         capture_output=True, text=True, check=True)
    assert "skipped kq_soft_max-0 SOFT_MAX" in run.stderr and "skipped norm-0 RMS_NORM" in run.stderr
    written = load_trace(tmp_path / "l.safetensors")
    assert len(written.tensors) == 1 + 2 * len(LAYER_NAMES) + 2
    assert written.metadata["missing_values"] == "nan"


def test_compare_passes_llamacpp_at_the_default_threshold_and_names_a_broken_bias(llamacpp, qwen_ref_trace):
    """The printed decimals widen each tensor's limit (value_decimals): llama.cpp agrees with qwen-ref at the
    float32 default, which the 4-decimal print alone would exceed at inp_embd; a k bias dropped from layer 1
    of qwen-ref's side is still named."""
    from qwen_ref.trace import Trace
    from qwen_ref.trace_diff import diff_traces

    reference = Trace(qwen_ref_trace, {})
    assert diff_traces(reference, llamacpp).culprit is None
    without_decimals = Trace(llamacpp.tensors, {k: v for k, v in llamacpp.metadata.items() if k != "value_decimals"})
    assert diff_traces(reference, without_decimals).culprit.key == "inp_embd"

    broken = dict(llamacpp.tensors)
    broken["blk.1.Kcur"] = broken["blk.1.Kcur"] - 0.5  # a constant offset per entry, as a lost bias leaves
    found = diff_traces(reference, Trace(broken, llamacpp.metadata)).culprit
    assert found is not None and found.key == "blk.1.Kcur"
