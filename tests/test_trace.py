"""`qwen-ref trace` and the recorder hook: every named intermediate, in forward order, with the documented
shapes; recording changes no number; selection, chunking and layer-major give the same trace."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import FIXTURES, random_checkpoint, small_config

from qwen_ref.backends import get_backend
from qwen_ref.cli import main
from qwen_ref.fingerprint import checkpoint_hash
from qwen_ref.generation import prefill
from qwen_ref.model import ALL_ROWS, load_model
from qwen_ref.trace import LAYER_NAMES, Recorder, load_trace

TOKENS = [5, 17, 3, 88, 41, 9, 60]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace_model")
    random_checkpoint(path, small_config(num_hidden_layers=3), dtype="BF16")
    return path


def _trace(model_dir, tmp_path, *flags, name="t.safetensors"):
    out = tmp_path / name
    assert main(["trace", "--model", str(model_dir), "--tokens", ",".join(map(str, TOKENS)), "--out", str(out),
                 "--quiet", *flags]) == 0
    return load_trace(out)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_trace_holds_every_name_in_forward_order_with_its_shape(model_dir, tmp_path, backend):
    trace = _trace(model_dir, tmp_path, "--backend", backend)
    L, T = 3, len(TOKENS)
    D, F, V, H, Hkv, hd = 32, 48, 97, 4, 2, 8
    expected = ["inp_embd", *(f"blk.{i}.{n}" for i in range(L) for n in LAYER_NAMES), "result_norm", "result_output"]
    assert list(trace.tensors) == expected
    shapes = {"Qcur": (T, H, hd), "Qcur_rope": (T, H, hd), "Kcur": (T, Hkv, hd), "Kcur_rope": (T, Hkv, hd),
              "Vcur": (T, Hkv, hd), "kqv_out": (T, H * hd), "ffn_gate": (T, F), "ffn_up": (T, F), "ffn_act": (T, F),
              "result_output": (T, V)}
    for key, value in trace.tensors.items():
        assert value.shape == shapes.get(key.rsplit(".", 1)[-1], (T, D)), key
        assert value.dtype == np.float32 and np.isfinite(value).all()
    meta = trace.metadata
    assert meta["backend"] == backend and meta["weights_dtype"] == "BF16" and meta["kv_dtype"] == "float32"
    assert json.loads(meta["tokens"]) == TOKENS and meta["checkpoint_sha256"] == checkpoint_hash(model_dir)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_trace_tensors_are_what_the_forward_pass_computes(model_dir, tmp_path, backend):
    """result_output is `qwen-ref logits` bit for bit (recording changes nothing), and each named tensor is
    its equation applied to the tensors before it."""
    trace = _trace(model_dir, tmp_path, "--backend", backend)
    assert main(["logits", "--model", str(model_dir), "--tokens", ",".join(map(str, TOKENS)), "--backend", backend,
                 "--out", str(tmp_path / "l.npz"), "--quiet"]) == 0
    with np.load(tmp_path / "l.npz") as npz:
        np.testing.assert_array_equal(trace.tensors["result_output"], npz["logits"])
    t = trace.tensors
    for i in range(3):
        b = f"blk.{i}."
        # float32 sums of the same two float32 arrays: exact
        np.testing.assert_array_equal(t[b + "ffn_inp"], (t["inp_embd"] if i == 0 else t[f"blk.{i - 1}.l_out"])
                                      + t[b + "attn_out"])
        np.testing.assert_array_equal(t[b + "l_out"], t[b + "ffn_inp"] + t[b + "ffn_out"])
        gate, up = t[b + "ffn_gate"], t[b + "ffn_up"]
        # silu(gate) * up recomputed in float32 against the fused kernel's: a few ulp of exp and the division
        np.testing.assert_allclose(t[b + "ffn_act"], gate / (1 + np.exp(-gate)) * up, rtol=1e-5, atol=1e-6)


def test_selection_keeps_only_the_chosen_layers_and_names(model_dir, tmp_path):
    trace = _trace(model_dir, tmp_path, "--layers", "0,2", "--names", "Qcur*,l_out,result_output", name="s.npz")
    assert list(trace.tensors) == [f"blk.{i}.{n}" for i in (0, 2) for n in ("Qcur", "Qcur_rope", "l_out")] + [
        "result_output"]
    full = _trace(model_dir, tmp_path)
    for key, value in trace.tensors.items():
        np.testing.assert_array_equal(value, full.tensors[key])


def test_chunks_and_layer_major_record_one_trace(model_dir):
    """A prompt run in chunks is one trace with all its positions; layer-major runs the same operations on
    the same chunks, so its trace equals the chunked one bit for bit."""
    traces = []
    for layer_major in (False, True):
        model = load_model(model_dir, get_backend("numba"), layer_major=layer_major)
        model.recorder = Recorder()
        prefill(model, TOKENS, model.new_cache(len(TOKENS)), ALL_ROWS, chunk=3)
        traces.append(model.recorder.tensors())
    assert traces[0].keys() == traces[1].keys()
    for key in traces[0]:
        assert len(traces[0][key]) == len(TOKENS), key
        np.testing.assert_array_equal(traces[0][key], traces[1][key], err_msg=key)


def test_safetensors_library_reads_a_trace(model_dir, tmp_path):
    from safetensors import safe_open

    trace = _trace(model_dir, tmp_path)
    with safe_open(str(tmp_path / "t.safetensors"), framework="numpy") as f:
        assert f.metadata() == trace.metadata
        np.testing.assert_array_equal(f.get_tensor("blk.1.Kcur_rope"), trace.tensors["blk.1.Kcur_rope"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--layers", "3"], "not within the model's layers 0-2"),
        (["--layers", "2-1"], "not within the model's layers"),
        (["--layers", "x"], "is not a layer or a range"),
        (["--names", "Qkur"], "matches no trace name"),
    ],
)
def test_bad_selection_is_one_line(model_dir, tmp_path, capsys, flags, message):
    code = main(["trace", "--model", str(model_dir), "--tokens", "1,2", "--out", str(tmp_path / "x.npz"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_output_suffix_is_refused_before_running(tmp_path, capsys):
    code = main(["trace", "--model", str(FIXTURES / "mha_f32_untied"), "--tokens", "1", "--out", str(tmp_path / "x.pt")])
    assert code == 2 and "written as .safetensors or .npz" in capsys.readouterr().err
