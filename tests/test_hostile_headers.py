"""Hostile safetensors headers: whatever a mutated header says, `qwen-ref logits` exits 0 or 2, never 3.

Each example takes a valid small checkpoint, rewrites its JSON header (a field given any JSON
value, a field or entry dropped, an entry added, plausible but wrong sizes and offsets, a header
length that lies, bytes cut or added) and runs the command line in this process on it.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import tempfile
from pathlib import Path

import pytest
from helpers import random_checkpoint, small_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_ref.cli import main

# numpy: ~3 s for 400, each kind of mutation tried dozens of times; numba (the default backend, whose
# kernels want one dtype per layer) costs more per run, so fewer
N_MUTATED_HEADERS = {"numpy": 400, "numba": 100}

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)
_FIELDS = ("dtype", "shape", "data_offsets")
# JSON text that parses but strains the parser or printer: nesting about as deep as Python's
# recursion limit, deeper, and an integer longer than Python converts to text by default
_RAW = "\x00raw\x00"
_PATHOLOGICAL = ["[" * n + "]" * n for n in (900, 985, 986, 1000, 100_000)] + ["7" * 5000, "[" + "9" * 4400 + "]"]
_PLAUSIBLE = {
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "F64", "f32", "", "BOOL"]),
    "shape": st.lists(st.integers(-3, 200), max_size=4),
    "data_offsets": st.lists(st.integers(-16, 40_000), min_size=0, max_size=3),
}


def _base_checkpoint() -> tuple[bytes, dict, bytes, bytes]:
    """(config.json, header, data bytes, the file) of a small valid bf16 checkpoint."""
    folder = Path(tempfile.mkdtemp())
    random_checkpoint(folder, small_config(), dtype="BF16")
    blob = (folder / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    return (folder / "config.json").read_bytes(), json.loads(blob[8 : 8 + header_len]), blob[8 + header_len :], blob


CONFIG, HEADER, DATA, _ = _base_checkpoint()
NAMES = sorted(HEADER)


@st.composite
def _mutated_file(draw) -> bytes:
    header = json.loads(json.dumps(HEADER))
    raw = ""
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(NAMES))
        kind = draw(st.sampled_from(
            ["any", "plausible", "pathological", "drop field", "drop entry", "entry", "add", "metadata", "root"]))
        if not isinstance(header, dict):  # an earlier "root" mutation replaced the whole header
            break
        if kind == "any" and isinstance(header.get(name), dict):
            header[name][draw(st.sampled_from(_FIELDS))] = draw(_JSON)
        elif kind == "plausible" and isinstance(header.get(name), dict):
            field = draw(st.sampled_from(_FIELDS))
            header[name][field] = draw(_PLAUSIBLE[field])
        elif kind == "pathological" and isinstance(header.get(name), dict):
            header[name][draw(st.sampled_from(_FIELDS))] = _RAW  # replaced in the text below
            raw = draw(st.sampled_from(_PATHOLOGICAL))
        elif kind == "drop field" and isinstance(header.get(name), dict):
            header[name].pop(draw(st.sampled_from(_FIELDS)), None)
        elif kind == "drop entry":
            header.pop(name, None)
        elif kind == "entry":
            header[name] = draw(_JSON)
        elif kind == "add":
            header[draw(st.text(max_size=8))] = draw(_JSON)
        elif kind == "metadata":
            header["__metadata__"] = draw(_JSON)
        elif kind == "root":
            header = draw(_JSON)
    encoded = json.dumps(header).replace(json.dumps(_RAW), raw).encode()
    blob = struct.pack("<Q", len(encoded)) + encoded + DATA
    damage = draw(st.sampled_from(["none", "none", "length", "cut", "append"]))
    if damage == "length":
        blob = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + blob[8:]
    elif damage == "cut":
        blob = blob[: draw(st.integers(0, len(blob)))]
    elif damage == "append":
        blob += draw(st.binary(min_size=1, max_size=64))
    return blob


def _run(folder: Path, blob: bytes, backend: str) -> tuple[int, str]:
    (folder / "model.safetensors").write_bytes(blob)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["logits", "--model", str(folder), "--tokens", "1,2,3", "--out", str(folder / "out.npz"),
                     "--backend", backend, "--quiet"])
    return code, stderr.getvalue()


@pytest.mark.parametrize("backend", sorted(N_MUTATED_HEADERS))
def test_the_unmutated_checkpoint_runs(backend):
    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_bytes(CONFIG)
    code, stderr = _run(folder, _base_checkpoint()[3], backend)
    assert code == 0, stderr


def _exits_0_or_2_with_one_line_and_no_traceback(backend: str):
    @settings(max_examples=N_MUTATED_HEADERS[backend], deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(blob=_mutated_file())
    def check(blob):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "config.json").write_bytes(CONFIG)
            code, stderr = _run(folder, blob, backend)
        assert code in (0, 2), stderr
        assert "Traceback" not in stderr
        if code == 2:
            assert stderr.startswith("qwen-ref: error: ") and stderr.count("\n") == 1, stderr

    return check


test_mutated_headers_exit_0_or_2_on_the_numpy_backend = _exits_0_or_2_with_one_line_and_no_traceback("numpy")
test_mutated_headers_exit_0_or_2_on_the_numba_backend = _exits_0_or_2_with_one_line_and_no_traceback("numba")
