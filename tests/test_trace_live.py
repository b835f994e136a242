"""Live: transformers' intermediates, read by forward hooks (tools/trace_transformers.py), equal qwen-ref's trace.

Runs wherever the `reference` extra is installed; CI requires it (QWEN_REF_REQUIRE_REFERENCE=1).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import small_config, transformers_random_model

from qwen_ref.backends import BACKEND_NAMES, get_backend
from qwen_ref.model import load_model
from qwen_ref.trace import (
    FIRST_NAMES,
    LAST_NAMES,
    LAYER_NAMES,
    Recorder,
    load_trace,
    trace_key,
)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import trace_transformers

# GQA (6 query heads on 2 kv heads), 3 layers, head_dim 8 so RoPE pairs element j with j + 4
CONFIG = small_config(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=40,
                      num_hidden_layers=3, vocab_size=131)
TOKENS = [5, 17, 0, 130, 64, 64, 9, 33, 101, 2, 77]
# float32 on both sides, the same operations in a different order (BLAS blocking, sums): the relative
# squared error of agreeing float32 tensors is about eps^2 ~ 1e-14 per element; a wrong axis, head
# order, RoPE pairing or missing bias gives NMSE of order 1.
NMSE_LIMIT = 1e-10


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    """mean((a - b)^2) / var(a), a the reference."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean((a - b) ** 2) / np.var(a))


@pytest.fixture(scope="module")
def checkpoint(torch_reference, tmp_path_factory):
    torch, transformers = torch_reference
    model_dir = tmp_path_factory.mktemp("trace_live")
    transformers_random_model(torch, transformers, CONFIG, seed=3).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def hf_trace(checkpoint, tmp_path_factory):
    """The tool run as a user runs it, writing a trace file."""
    out = tmp_path_factory.mktemp("hf") / "hf.safetensors"
    subprocess.run([sys.executable, str(REPO / "tools" / "trace_transformers.py"), "--model", str(checkpoint),
                    "--tokens", ",".join(map(str, TOKENS)), "--out", str(out)], check=True, cwd=REPO)
    return load_trace(out)


def _qwen_ref_tensors(checkpoint, backend_name, recorder=None):
    model = load_model(checkpoint, get_backend(backend_name))
    model.recorder = recorder or Recorder()
    model.forward(np.array(TOKENS), model.new_cache(len(TOKENS)))
    return model.recorder.tensors()


def test_transformers_trace_has_every_name_with_the_documented_shapes(hf_trace):
    T, D, F, V = len(TOKENS), CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    H, Hkv, hd = 6, 2, 8
    per_layer = {"attn_norm": (T, D), "Qcur": (T, H, hd), "Kcur": (T, Hkv, hd), "Vcur": (T, Hkv, hd),
                 "Qcur_rope": (T, H, hd), "Kcur_rope": (T, Hkv, hd), "kqv_out": (T, H * hd), "attn_out": (T, D),
                 "ffn_inp": (T, D), "ffn_norm": (T, D), "ffn_gate": (T, F), "ffn_up": (T, F), "ffn_act": (T, F),
                 "ffn_out": (T, D), "l_out": (T, D)}
    assert set(per_layer) == set(LAYER_NAMES)
    expected = {"inp_embd": (T, D), "result_norm": (T, D), "result_output": (T, V)}
    expected |= {trace_key(n, i): s for i in range(CONFIG["num_hidden_layers"]) for n, s in per_layer.items()}
    assert {k: v.shape for k, v in hf_trace.tensors.items()} == expected
    assert list(hf_trace.tensors) == list(_forward_order_keys())
    assert hf_trace.metadata["source"] == "transformers"
    assert json.loads(hf_trace.metadata["tokens"]) == TOKENS
    assert hf_trace.metadata["transformers_version"] and hf_trace.metadata["torch_version"]


def _forward_order_keys():
    yield from FIRST_NAMES
    for i in range(CONFIG["num_hidden_layers"]):
        yield from (trace_key(n, i) for n in LAYER_NAMES)
    yield from LAST_NAMES


@pytest.mark.parametrize("backend_name", BACKEND_NAMES)
def test_every_named_tensor_agrees_with_transformers_nmse_below_1e_10(checkpoint, hf_trace, backend_name):
    ours = _qwen_ref_tensors(checkpoint, backend_name)
    assert list(ours) == list(hf_trace.tensors)
    errors = {key: nmse(ref, ours[key]) for key, ref in hf_trace.tensors.items()}
    worst = max(errors, key=errors.get)
    print(f"{backend_name}: worst NMSE {errors[worst]:.2e} at {worst}")
    assert all(e < NMSE_LIMIT for e in errors.values()), {k: f"{e:.2e}" for k, e in errors.items() if e >= NMSE_LIMIT}


def test_rope_is_not_the_identity_here(hf_trace):
    """Qcur_rope must differ from Qcur beyond position 0, or the RoPE comparison above proves nothing."""
    q, q_rope = hf_trace.tensors["blk.1.Qcur"], hf_trace.tensors["blk.1.Qcur_rope"]
    np.testing.assert_array_equal(q[0], q_rope[0])  # position 0: cos 1, sin 0
    assert nmse(q[1:], q_rope[1:]) > 1e-2


def test_layers_and_names_select_as_qwen_refs_recorder(torch_reference, checkpoint):
    model = trace_transformers.load_float32_eager(checkpoint)
    theirs = Recorder(layers=[1], names=["Kcur*", "l_out", "result_*"])
    trace_transformers.record_transformers(model, TOKENS, theirs)
    ours = _qwen_ref_tensors(checkpoint, "numpy", Recorder(layers=[1], names=["Kcur*", "l_out", "result_*"]))
    assert list(theirs.tensors()) == list(ours) == ["blk.1.Kcur", "blk.1.Kcur_rope", "blk.1.l_out",
                                                    "result_norm", "result_output"]
